"""The side work of a run, behind hooks the GenerationRunner calls at named points.

Points, in the order of a generation: `generation_start` (before its first epoch is trained,
also when a resumed generation goes on), `epoch_end` (after every epoch; `state.epoch` and
`state.train` hold it), `generation_end` (evaluated and recorded in the state), `run_end`
(after the export, `state.finished` set). A hook reads the runner (`run.network`, `run.masks`,
`run.nets`, ...), the `RunState` and the generation's `Evaluation`; it changes neither.

The hooks of a run, in order: `monitor.Monitor` (TensorBoard, progress bars, console table),
`results.Tables` (results.csv, hypotheses.csv), `checkpoint.Checkpoints` (checkpoints/),
`faults.FaultPoints` (the crash tests' named points). That order is what makes a crash at any
instant resumable: a generation's point is logged, then its rows written, then its checkpoint.
Under --strategy=multi_worker, `multi_worker.SameOnEveryWorker` comes first on every worker, and
only the chief has the three hooks that write (Monitor, Tables, Checkpoints).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What evaluating one generation produced: its rows of results.csv, the last epoch's
    training metrics (as in the rows) and {variable: (fit |w|, reset |w|)} of the hypotheses."""

    generation: int
    rows: List[Dict]
    train: Dict[str, float]
    hypotheses: Dict[str, Tuple[np.ndarray, np.ndarray]]


class Hook:
    """Does nothing at every point; a hook overrides the points it needs."""

    def generation_start(self, run, state) -> None:
        pass

    def epoch_end(self, run, state) -> None:
        pass

    def generation_end(self, run, state, evaluation: Evaluation) -> None:
        pass

    def run_end(self, run, state) -> None:
        pass

    def close(self) -> None:
        pass


class Hooks(Hook):
    """Calls each hook of `hooks` in order at every point; `close` closes them all."""

    def __init__(self, hooks: Sequence[Hook]):
        self.hooks = list(hooks)

    def generation_start(self, run, state) -> None:
        for hook in self.hooks:
            hook.generation_start(run, state)

    def epoch_end(self, run, state) -> None:
        for hook in self.hooks:
            hook.epoch_end(run, state)

    def generation_end(self, run, state, evaluation: Evaluation) -> None:
        for hook in self.hooks:
            hook.generation_end(run, state, evaluation)

    def run_end(self, run, state) -> None:
        for hook in self.hooks:
            hook.run_end(run, state)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()
