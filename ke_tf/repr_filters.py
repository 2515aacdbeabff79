"""Filter ranking and orthogonal re-initialisation of RePr (Prakash, Storer, Florencio & Zhang,
"RePr: Improved Training of Convolutional Filters", CVPR 2019), a baseline of the KE paper.

RePr trains the full network, drops the most redundant filters for a few epochs, then brings
them back re-initialised orthogonally to the filters that were kept, and repeats. The ranking
metric is the inter-filter orthogonality of each layer: with W_hat the layer's filters
flattened and normalised to unit length (one row each),

    O = |W_hat W_hat^T - I|,   rank_f = sum_j O[f, j]   (higher = more redundant),

and the filters of ALL layers are ranked together, globally, which the KE paper criticises.
This module is pure numpy and knows nothing of Keras models: a kernel is an array whose LAST
axis indexes the filters (Keras layout, [kh, kw, in, out] for a Conv2D, also [in, out] for a
Dense layer), each filter being `kernel[..., f]` flattened in C order.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _filters(kernel) -> np.ndarray:
    """The filters of `kernel` as float64 rows, [out, prod(other axes)]."""
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"A kernel needs at least 2 axes, the last one the filters. "
                         f"Received: shape={kernel.shape}")
    return kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64)


def filter_ranks(kernel) -> np.ndarray:
    """RePr's inter-filter orthogonality rank of every filter of one layer.

    Each filter `kernel[..., f]` is flattened and normalised to unit length (a zero filter
    stays zero), O = |W_hat W_hat^T - I| ([out, out]) and the rank of filter f is the sum of
    row f of O: the summed |cosine| with the other filters, higher for a more redundant
    filter. The diagonal of O is ~0 for a non-zero filter but exactly 1 for a zero filter
    (0 - 1), so a dead filter ranks 1 plus nothing from the others (it is orthogonal to all).

    Args:
      kernel: array [..., out] (Keras layout, e.g. [kh, kw, in, out]).

    Returns:
      float64 array [out].
    """
    w = _filters(kernel)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    w_hat = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    overlap = np.abs(w_hat @ w_hat.T - np.eye(w.shape[0]))
    return overlap.sum(axis=1)


def drop_masks(kernels: Mapping[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    """Which filters RePr drops: one GLOBAL ranking over all filters of all `kernels`.

    The ranks of `filter_ranks` of every layer are pooled (as RePr does, and the KE paper
    criticises: a layer with more filters sums more terms and so ranks higher) and the
    k = round(share * total number of filters) highest-ranked are dropped (Python's round,
    half to even). Ties are broken stably by order: the layer's position in `kernels` (its
    iteration order), then the filter index; the earlier filter is dropped first. A layer may
    lose all its filters.

    Args:
      kernels: {path: kernel [..., out]}.
      share: the fraction of all filters to drop, in [0, 1].

    Returns:
      {path: bool array [out]}, False for a dropped filter, True for a kept one.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1]. Received: share={share!r}")
    paths = list(kernels)
    ranks = [filter_ranks(kernels[p]) for p in paths]
    sizes = [len(r) for r in ranks]
    pooled = np.concatenate(ranks) if ranks else np.zeros(0)
    num_dropped = int(round(share * pooled.size))
    order = np.argsort(-pooled, kind="stable")
    keep = np.ones(pooled.size, bool)
    keep[order[:num_dropped]] = False
    return dict(zip(paths, np.split(keep, np.cumsum(sizes)[:-1]))) if paths else {}


def _project_out(v: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """v minus its projection on the orthonormal columns of `basis`, done twice (the second
    pass removes the rounding left by the first, "twice is enough")."""
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    return v


def orthogonal_filters(kernel, dropped, rng: np.random.Generator) -> np.ndarray:
    """RePr's re-initialisation of the dropped filters of one layer, in the null space of the
    kept filters of that layer.

    With the kept filters as the columns of K ([d, k], d = the flattened filter size), the
    reduced QR decomposition K = Q R gives an orthonormal Q whose columns span (at least) the
    kept filters' span. For each dropped filter, in index order, a standard normal vector is
    drawn from `rng`, projected onto the orthogonal complement of Q and normalised; it is then
    rescaled to the mean L2 norm of the kept filters. The new filters are also mutually
    orthogonal while the complement has room: within a run of r = d - k new filters each is
    orthogonal to Q and to the earlier ones of the run; the next run starts afresh from Q
    (orthogonal to the kept filters again, not to the earlier new ones).

    When the kept filters leave no room (k >= d: Q spans the whole space, as for a layer with
    more filters than weights per filter), no nonzero direction is orthogonal to them all; the
    dropped filter then gets the normalised random normal vector itself, i.e. a plain random
    re-initialisation of the same norm, without any orthogonality.

    If no filter is kept the norm is the mean norm of all the layer's filters before
    re-initialisation; if that mean norm is 0 the new filters have unit length.

    Kept filters are returned unchanged, bit for bit, and the result has the kernel's dtype
    and shape. The same `rng` state gives the same result.

    Args:
      kernel: array [..., out] (Keras layout, e.g. [kh, kw, in, out]).
      dropped: bool array [out], True for a filter to re-initialise (the negation of a
        `drop_masks` entry).
      rng: the numpy Generator to draw the random directions from.

    Returns:
      A new array like `kernel`.
    """
    kernel = np.asarray(kernel)
    w = _filters(kernel)
    dropped = np.asarray(dropped)
    if dropped.dtype != bool or dropped.shape != (w.shape[0],):
        raise ValueError(f"dropped must be a bool array of shape ({w.shape[0]},). "
                         f"Received: dtype={dropped.dtype}, shape={dropped.shape}")
    result = kernel.copy()
    if not dropped.any():
        return result
    kept = w[~dropped]
    d = w.shape[1]
    norms = np.linalg.norm(kept if len(kept) else w, axis=1)
    target_norm = float(norms.mean()) if norms.size and norms.mean() > 0 else 1.0
    kept_basis = np.linalg.qr(kept.T, mode="reduced")[0] if len(kept) else np.zeros((d, 0))
    room = d - kept_basis.shape[1]
    basis = kept_basis
    for f in np.flatnonzero(dropped):
        v = rng.standard_normal(d)
        if room > 0:
            if basis.shape[1] == d:  # the run used up the complement: start a new one
                basis = kept_basis
            v = _project_out(v, basis)
            v /= np.linalg.norm(v)
            basis = np.concatenate([basis, v[:, None]], axis=1)
        else:
            v /= np.linalg.norm(v)
        result[..., f] = (target_norm * v).reshape(kernel.shape[:-1]).astype(kernel.dtype)
    return result
