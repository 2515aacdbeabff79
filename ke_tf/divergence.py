"""A run whose training diverged: NaN or infinite losses, metrics or weights stop it (exit 1).

`check_finite` runs after every epoch, before the epoch is checkpointed, so that the last
checkpoint a diverged run leaves is a good one.
"""
from __future__ import annotations

import os
from typing import Dict

import keras
import numpy as np

from ke_tf import checkpoint
from ke_tf.config import RunError


def check_finite(run_dir: str, generation: int, epoch: int, logs: Dict[str, float],
                 network: keras.Model) -> None:
    """RunError (exit 1) if the epoch's loss or metrics, or the weights, are NaN or infinite:
    the run stops before checkpointing them, and the last good checkpoint stays."""
    where = f"generation {generation}, epoch {epoch}"
    last = checkpoint.last_dir(run_dir)
    kept = (f"the last good checkpoint (the epoch before) is kept in {last}"
            if os.path.isdir(last) else "no checkpoint was written before it")
    kept = (f"; the run stopped, and {kept}. Lower --lr or check the data, and start again "
            "with --overwrite")
    bad = ", ".join(f"{k}={v}" for k, v in logs.items() if not np.isfinite(v))
    if bad:
        raise RunError(f"{where}: training diverged ({bad}){kept}")
    weights = [v.path for v in network.variables if not np.isfinite(v.numpy()).all()]
    if weights:
        raise RunError(f"{where}: the weights are no longer finite ({weights[0]}, ...){kept}")
