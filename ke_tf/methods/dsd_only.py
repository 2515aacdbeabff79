"""Dense-Sparse-Dense (Han et al., ICLR 2017) once, the KE paper's DSD baseline row (sec. 4.1,
Tables 2-3): one run of T = g*e epochs with one lr schedule (DSD resumes it across phases),
dense for T/2 epochs, then the --dsd_sparsity (30%) smallest-magnitude weights of every kernel
held at zero for T/4 epochs, then dense again, from zero, for the last T/4 (the paper's 200,
100 and 100 epochs). KE+DSD (`--method=dsd`, `dsd.py`) is the variant that turns the phases
into generations with restarted schedules; the pruning rule is the same (`dsd.dsd_keep`).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import keras

from ke_tf import masks as masks_lib
from ke_tf.methods.base import Method, require
from ke_tf.methods.dsd import SPARSITY, dsd_keep


def phase_ends(total_epochs: int) -> Tuple[int, int]:
    """The 1-based epochs after which the dense phase and the sparse phase end."""
    dense = total_epochs // 2
    return dense, dense + total_epochs // 4


class DSDOnly(Method):
    name = "dsd_only"
    settings = {"dsd_sparsity": SPARSITY}

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        t = config.train
        require(t.generations * t.epochs >= 4, "epochs",
                "times --generations must be >= 4 with --method=dsd_only (dense, sparse and "
                "dense phases of T/2, T/4, T/4 epochs)", t.epochs)

    def schedule(self) -> Tuple[int, int]:
        t = self.config.train
        return 1, t.generations * t.epochs

    def held_at_zero(self, network: keras.Model) -> Sequence[str]:
        return list(dsd_keep(network, self.setting("dsd_sparsity")))

    def after_epoch(self, run, epoch: int) -> masks_lib.Masks:
        dense_end, sparse_end = phase_ends(self.schedule()[1])
        if epoch == dense_end:  # prune the smallest weights of the trained dense network
            run.model.hold_at_zero(dsd_keep(run.network, self.setting("dsd_sparsity")))
        elif epoch == sparse_end:  # free them, from zero
            run.model.hold_at_zero(None)
        return run.masks
