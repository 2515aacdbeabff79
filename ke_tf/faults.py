"""Fault injection, for the crash tests: die or fail at a named point of a run, on purpose.

`KE_TF_FAULT="<action>:<point>[:<n>]"` makes the n-th passage (default: the first) through
`point(<point>)` either SIGKILL this process (action `kill`: no cleanup, no exception handler,
exactly like a crash or the OOM killer), raise a full-disk `OSError` (action `enospc`), or, at
`batch` only, turn the network's first weight into NaN (action `nan`: a diverging run).
Unset (always, outside tests), `point` costs one dictionary lookup.

Points of a run: `batch` (after a training batch: mid-epoch), `epoch` (after an epoch's
checkpoint), `evaluated` (a generation boundary: evaluated and checkpointed, not yet
re-initialized; these two are the `FaultPoints` hook, last of a run's hooks), `export` (between the dense and the slim export), `checkpoint` (inside the
temporary directory of a checkpoint being written).
"""
from __future__ import annotations

import errno
import os
import signal
from typing import Dict

import keras

from ke_tf.hooks import Hook

ENV = "KE_TF_FAULT"
_passages: Dict[str, int] = {}


def _spec():
    spec = os.environ.get(ENV)
    if not spec:
        return None
    action, point_name, *n = spec.split(":")
    if action not in ("kill", "enospc", "nan") or len(n) > 1:
        raise ValueError(f"{ENV} must be kill|enospc|nan:<point>[:<n>]. Received: {spec!r}")
    return action, point_name, int(n[0]) if n else 1


def point(name: str) -> bool:
    """Mark passage through `name`; dies or fails here if KE_TF_FAULT says so. Returns True
    when a `nan` fault is due here (the caller injects it)."""
    spec = _spec()
    if spec is None or spec[1] != name:
        return False
    _passages[name] = _passages.get(name, 0) + 1
    if _passages[name] != spec[2]:
        return False
    if spec[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec[0] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return True


def active(name: str) -> bool:
    spec = _spec()
    return spec is not None and spec[1] == name


class BatchFaults(keras.callbacks.Callback):
    """`point("batch")` after every training batch (added to `fit` only when it is armed)."""

    def on_train_batch_end(self, batch, logs=None):
        if point("batch"):
            weight = self.model.trainable_variables[0]
            weight.assign(weight * float("nan"))


class FaultPoints(Hook):
    """`point("epoch")` after every epoch's hooks, `point("evaluated")` after a generation's."""

    def epoch_end(self, run, state) -> None:
        point("epoch")

    def generation_end(self, run, state, evaluation) -> None:
        point("evaluated")
