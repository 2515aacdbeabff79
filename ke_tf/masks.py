"""Split masks: which weights form the fit hypothesis (1) and which the reset hypothesis (0).

Paper sec. 3.1-3.2 and Algorithm 1 (lines 1-15). A mask is a boolean numpy array of its
variable's shape, keyed by the Keras 3 `variable.path` (e.g. "conv1/kernel"). Masks are data:
they are computed here by pure functions of the model's graph and a seed, saved with a run as
`masks.npz`, and never hidden inside layers.

KELS (kernel-level, Fig. 3): a layer that mixes channels keeps the first ceil(s*C_out) filters
over the fit input channels, which `ke_tf.graph` follows through the graph (the first conv keeps
all image channels; concatenations offset each input's channels, appendix B). The layer that
produces the model's output (classifier or embedding) keeps all its outputs (Alg. 1 l.13), and
its bias is all fit (sec. 3.1); so does every layer whose output must reach a layer that mixes
all channels whole (LayerNormalization: `graph.whole_producers`); other biases follow their
layer's output channels.
DepthwiseConv2D kernels follow their input channels. MultiHeadAttention keeps the first
ceil(s*heads) attention heads (their query, key, value and output projections), its input
and output channels whole (the residual stream). BatchNorm is never masked (its learned
statistics transfer across generations, sec. 3.1).

WELS (weight-level, sec. 3.2): every kernel weight is fit with probability s, drawn from a
generator seeded by (seed, variable path); biases stay fit. The mask is fixed for the run unless
the caller re-draws it with another seed.
"""
from __future__ import annotations

import io
import math
import zipfile
import zlib
from typing import Dict, Sequence, Union

import keras
import numpy as np

from ke_tf import atomic, graph
from ke_tf.config import SPLIT_MODES

Masks = Dict[str, np.ndarray]
MODES = SPLIT_MODES


def kept_channels(n: int, split_rate: float) -> int:
    """ceil(s * n) of Fig. 3, immune to float noise (0.7 * 10 = 7.000000000000001 keeps 7)."""
    return max(1, math.ceil(round(split_rate * n, 9)))


def _prefix(n: int, split_rate: float, groups: int = 1) -> np.ndarray:
    """The first ceil(s * n) of n channels; with `groups`, the first of every group's."""
    out = np.zeros((groups, n // groups), bool)
    out[:, :kept_channels(n // groups, split_rate)] = True
    return out.reshape(-1)


def masked_layers(model: keras.Model):
    """(layer, [(variable, role)]) for every layer whose weights KE splits.

    role is "kernel" (input x output channels), "depthwise" (input channels), "grouped" (a
    convolution with one input channel a group: output channels), "pointwise" (the 1x1 half
    of a separable conv) or "bias" (output channels); MultiHeadAttention's projections:
    "heads_in" ([D, heads, dim]: its query, key and value kernels), "head_bias" ([heads, dim])
    and "heads_out" ([heads, dim, D]: the output kernel), split by attention head."""
    for layer in graph.layers_in_order(model):
        if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
            roles = [(layer.depthwise_kernel, "depthwise"), (layer.pointwise_kernel, "pointwise")]
        elif isinstance(layer, graph.DEPTHWISE):
            roles = [(layer.kernel, "depthwise")]
        elif graph.channel_wise_groups(layer):
            roles = [(layer.kernel, "grouped")]
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            v = graph.attention_variables(layer)
            roles = [(v[f"{p}/kernel"], "heads_in") for p in ("query", "key", "value")]
            roles += [(v[f"{p}/bias"], "head_bias") for p in ("query", "key", "value")
                      if f"{p}/bias" in v]
            roles.append((v["attention_output/kernel"], "heads_out"))
            if "attention_output/bias" in v:
                roles.append((v["attention_output/bias"], "bias"))
            yield layer, roles
            continue
        elif isinstance(layer, graph.MIXING):
            roles = [(layer.kernel, "kernel")]
        else:
            continue
        if getattr(layer, "bias", None) is not None:
            roles.append((layer.bias, "bias"))
        yield layer, roles


def compute(model: keras.Model, mode: str = "kels", split_rate: float = 0.8,
            seed: Union[int, Sequence[int]] = 0) -> Masks:
    """Masks for every conv/dense kernel and bias of `model` (Alg. 1 lines 1-15).

    Args:
      model: a Keras functional model (channels-last).
      mode: "kels" (kernel-level, the slim fit hypothesis) or "wels" (weight-level, random).
      split_rate: s in (0, 1]; the fraction of channels (KELS) or weights (WELS) kept.
      seed: an int or a sequence of ints seeding the WELS draws (KELS is deterministic and
        ignores it). WELS-Rand (appendix D(1)) re-draws the mask before every generation:
        `compute(model, "wels", s, seed=(run_seed, generation))`.
    Returns:
      {variable.path: bool array of the variable's shape}, True = fit hypothesis.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    if not 0.0 < split_rate <= 1.0:
        raise ValueError(f"split_rate must be in (0, 1]. Received: split_rate={split_rate!r}")
    if mode == "wels":
        return _wels(model, split_rate, seed)
    return _kels(model, split_rate)


def _kels(model, split_rate) -> Masks:
    outputs = set(graph.output_layers(model)) | graph.whole_producers(model)
    forced: Dict[str, np.ndarray] = {}  # filters chosen to make a merge's branches agree

    def choose_out(layer, in_set):
        n = layer.output.shape[-1]
        if layer.name in forced:
            return forced[layer.name]
        groups = getattr(layer, "groups", 1)
        return np.ones(n, bool) if layer.name in outputs else _prefix(n, split_rate, groups)

    flows = _solve(model, choose_out, forced, split_rate)
    masks: Masks = {}
    for layer, roles in masked_layers(model):
        flow = flows[layer.name]
        cin, cout = flow.inputs[0], flow.output
        heads = _prefix(layer.num_heads, split_rate) if hasattr(layer, "num_heads") else None
        for var, role in roles:
            shape = tuple(var.shape)
            groups = getattr(layer, "groups", 1)
            if role == "kernel" and groups > 1:  # [kh, kw, C_in / groups, C_out]
                m = np.outer(cin[:len(cin) // groups], cout)
            elif role == "heads_in":  # the first ceil(s * heads) heads, all input channels
                m = heads[None, :, None]
            elif role == "head_bias":
                m = heads[:, None]
            elif role == "heads_out":
                m = heads[:, None, None]
            elif role == "kernel":
                m = np.outer(cin, cout)
            elif role == "depthwise":
                m = np.repeat(cin[:, None], shape[-1], axis=1)
            elif role == "grouped":  # [kh, kw, 1, C_out]: output j*m+k is input j's
                m = cout.copy()
            elif role == "pointwise":
                m = np.outer(np.repeat(cin, layer.depth_multiplier), cout)
            else:
                m = cout.copy()
            masks[var.path] = np.broadcast_to(m, shape).copy()
    return masks


def _solve(model, choose_out, forced: Dict[str, np.ndarray], split_rate: float):
    """`graph.channel_flow` where every merge (Add, Multiply, ...) gets one fit set for all its
    inputs: a branch whose channels only its own filters decide (`graph.free_producers`)
    takes the set of a branch that something else decides (a concatenation's offsets, the
    image), so that the slim network stays exact (NASNet, InceptionResNetV2); and where what
    feeds a grouped convolution keeps the first filters of every group. Each conflict fixes at
    least one layer's filters for good, so this ends."""
    while True:
        try:
            return graph.channel_flow(model, choose_out)
        except graph.GroupConflict as conflict:
            free = graph.free_producers(model, conflict.tensor)
            if not free or any(name in forced for name in free):
                raise
            groups, width = conflict.layer.groups, int(conflict.tensor.shape[-1])
            for name in free:
                forced[name] = _prefix(width, split_rate, groups)
        except graph.MergeConflict as conflict:
            branches = [graph.free_producers(model, t) for t in conflict.tensors]
            # decided elsewhere: by the graph, or by filters an earlier merge already chose
            branches = [None if free is not None and all(n in forced for n in free) else free
                        for free in branches]
            decided = [s for s, free in zip(conflict.sets, branches) if free is None]
            target = decided[0] if decided else conflict.sets[0]
            if any((s != target).any() for s in decided):
                raise  # two branches decided elsewhere, differently: no choice of filters
            changed = False
            for s, free in zip(conflict.sets, branches):
                for name in free or ():
                    if (s != target).any() and name not in forced:
                        forced[name], changed = target.copy(), True
            if not changed:
                raise


def _wels(model, split_rate, seed) -> Masks:
    masks: Masks = {}
    for _, roles in masked_layers(model):
        for var, role in roles:
            shape = tuple(var.shape)
            if role == "bias":
                masks[var.path] = np.ones(shape, bool)
            else:
                words = [seed] if np.isscalar(seed) else list(seed)
                rng = np.random.default_rng(words + [zlib.crc32(var.path.encode())])
                masks[var.path] = rng.random(shape) < split_rate
    return masks


def save(path: str, masks: Masks) -> None:
    """Write masks to an .npz file atomically (a crash never leaves a half-written file)."""
    with atomic.open_atomic(path, "wb") as f:
        f.write(encode(masks))


def encode(masks: Masks) -> bytes:
    """The .npz bytes of `masks`: a function of the masks alone (sorted keys, fixed zip
    timestamps), so equal masks give equal files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as npz:
        for key in sorted(masks):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with npz.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(masks[key]), allow_pickle=False)
    return buffer.getvalue()


def load(path: str) -> Masks:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k].astype(bool) for k in data.files}


def hypothesis_magnitudes(model: keras.Model, masks: Masks) -> Dict[str, tuple]:
    """|w| of the fit and of the reset hypothesis of every masked kernel (sec. 5, Fig. 7).

    Returns {variable path: (|w| of fit entries, |w| of reset entries)} as flat arrays; their
    means are the paper's H^Delta-hat and H^nabla-hat."""
    out = {}
    for v in model.weights:
        if v.path in masks and not v.path.endswith("bias"):
            w, m = np.abs(v.numpy()), masks[v.path]
            out[v.path] = (w[m], w[~m])
    return out
