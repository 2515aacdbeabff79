"""RePr (Prakash, Storer, Florencio & Zhang, CVPR 2019), a baseline of the KE paper (sec. 4.1):
one training run of g*e epochs with one lr schedule, in cycles of S1 dense epochs and S2 sparse
ones. At the end of a dense phase every conv filter of the network is ranked by inter-filter
orthogonality within its layer and the --repr_prune (30%) most redundant filters over the
WHOLE network are dropped (one global ranking, which the KE paper criticises: on small datasets
it empties early layers): held at zero for S2 epochs. Then they come back re-initialized
orthogonally to the kept filters of their layer (QR: a direction in the null space of the kept
ones) and the next cycle starts. The KE paper used S1 = 50, S2 = 10 in 200 epochs: the
defaults are those proportions of the run (a quarter, a twentieth). The ranking and the
re-initialization are pure functions of `ke_tf.repr_filters`; biases and BatchNorm are never
dropped. The network is dense at the end unless the run ends inside a sparse phase.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np

from ke_tf import masks as masks_lib, repr_filters
from ke_tf.config import ConfigError
from ke_tf.methods.base import Method, Setting


def phase_lengths(total_epochs: int, s1: Optional[int], s2: Optional[int]) -> Tuple[int, int]:
    """(S1, S2): the flags, or the paper's 50 and 10 of 200 epochs as shares of the run."""
    return (s1 or max(1, round(total_epochs / 4)), s2 or max(1, round(total_epochs / 20)))


def phase_change(epoch: int, total_epochs: int, s1: int, s2: int) -> Optional[str]:
    """What happens after 1-based `epoch`: "drop" (a dense phase ended), "restore" (a sparse
    phase ended) or None; nothing after the last epoch."""
    if epoch >= total_epochs:
        return None
    position = epoch % (s1 + s2)
    return "drop" if position == s1 else "restore" if position == 0 else None


def conv_kernels(network: keras.Model) -> Dict[str, keras.Variable]:
    """{path: kernel} of every Conv2D layer (the filters RePr ranks), in graph order."""
    return {var.path: var for layer, roles in masks_lib.masked_layers(network)
            if isinstance(layer, keras.layers.Conv2D) for var, role in roles if role == "kernel"}


class RePr(Method):
    name = "repr"
    settings = {
        "repr_s1": Setting(None, "--method=repr: dense epochs of a cycle [default: a quarter of the "
                           "run, 50 of 200 as the paper].", kind="integer",
                           ok=lambda v: v >= 1, rule="must be >= 1 (or unset)"),
        "repr_s2": Setting(None, "--method=repr: sparse epochs of a cycle [default: a twentieth of "
                           "the run, 10 of 200].", kind="integer",
                           ok=lambda v: v >= 1, rule="must be >= 1 (or unset)"),
        "repr_prune": Setting(0.3, "--method=repr: share of all conv filters dropped in a sparse "
                              "phase.", ok=lambda v: 0 < v < 1, rule="must be in (0, 1)"),
    }

    def schedule(self) -> Tuple[int, int]:
        t = self.config.train
        return 1, t.generations * t.epochs

    def phases(self) -> Tuple[int, int]:
        return phase_lengths(self.schedule()[1], self.setting("repr_s1"),
                             self.setting("repr_s2"))

    def held_at_zero(self, network: keras.Model) -> Sequence[str]:
        kernels = conv_kernels(network)
        if not kernels:
            raise ConfigError(f"--method=repr drops convolution filters: --arch="
                              f"{self.config.model.arch} has no Conv2D layer")
        return list(kernels)

    def after_epoch(self, run, epoch: int) -> masks_lib.Masks:
        change = phase_change(epoch, self.schedule()[1], *self.phases())
        kernels = conv_kernels(run.network)
        if change == "drop":
            keep = repr_filters.drop_masks({p: v.numpy() for p, v in kernels.items()},
                                           self.setting("repr_prune"))
            run.model.hold_at_zero({p: np.broadcast_to(k, kernels[p].shape)
                                    for p, k in keep.items()})
        elif change == "restore":
            dropped = {p: ~held.reshape(-1, held.shape[-1]).any(axis=0)
                       for p, held in run.model.held().items()}
            run.model.hold_at_zero(None)
            rng = np.random.default_rng([self.config.seed, epoch])
            for path, var in kernels.items():  # graph order: the same draws on every run
                if dropped[path].any():
                    var.assign(repr_filters.orthogonal_filters(var.numpy(), dropped[path], rng))
        return run.masks
