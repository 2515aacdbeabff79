"""KE+DSD (appendix C.1): Han et al.'s dense-sparse-dense training turned into generations.

Odd generations train dense; before each even generation the --dsd_sparsity (30%) smallest-
magnitude weights of every kernel, taken from the previous generation's trained weights, are
set to zero and held at zero after every optimizer step (0/1 multipliers that are variables of
the compiled train step, `KEModel.hold_at_zero`); the next (dense) generation frees them,
starting from zero. Nothing is re-initialized randomly, and the learning-rate schedule restarts
every generation like KE's.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from ke_tf import masks as masks_lib
from ke_tf.methods.base import Method, Setting


def dsd_keep(model: keras.Model, sparsity: float) -> masks_lib.Masks:
    """Per kernel, False for its round(sparsity * n) smallest-magnitude entries (DSD's prune)."""
    keep = {}
    for _, roles in masks_lib.masked_layers(model):
        for var, role in roles:
            if role == "bias":
                continue
            w = np.abs(var.numpy()).ravel()
            mask = np.ones(w.size, bool)
            mask[np.argsort(w, kind="stable")[:int(round(sparsity * w.size))]] = False
            keep[var.path] = mask.reshape(tuple(var.shape))
    return keep


SPARSITY = Setting(0.3, "--method=dsd: share of each kernel held at zero in the sparse generations.",
                   ok=lambda v: 0 < v < 1, rule="must be in (0, 1)")


class DenseSparseDense(Method):
    name = "dsd"
    settings = {"dsd_sparsity": SPARSITY}

    def held_at_zero(self, network: keras.Model) -> Sequence[str]:
        return list(dsd_keep(network, self.setting("dsd_sparsity")))

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        """Generation g+1 is sparse if even (prune and hold), dense if odd (free)."""
        sparse = (generation + 1) % 2 == 0
        run.model.hold_at_zero(
            dsd_keep(run.network, self.setting("dsd_sparsity")) if sparse else None)
        return run.masks
