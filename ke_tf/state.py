"""Where a run stands, as data: what `checkpoints/last/state.json` holds and a resume restores.

The GenerationRunner's loop reads and advances a `RunState`; checkpointing saves it whole
(`to_json`) and resuming loads it back (`from_json`) and continues the same loop from
`generation`, `epoch` and `evaluated`. The arrays of a run (weights, optimizer, masks) are not
part of it: `ke_tf.checkpoint` stores them next to it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, List


@dataclasses.dataclass
class RunState:
    """generation: the generation being trained (1-based); epoch: its epochs done; evaluated:
    it was evaluated and checkpointed but the next generation's weights are not drawn yet;
    finished: the whole run is done (exported). rows / hypotheses: results.csv and
    hypotheses.csv so far; train: the last epoch's training metrics ("train_loss", ...);
    seconds: time spent on this generation before `since` (a resumed generation's earlier
    time). selected: {shipped network ("dense", "slim"): the generation it ships so far}
    (`ke_tf.selection`); stopped: why the run stopped early ("" while it goes on, and when it
    trained every generation)."""

    generation: int = 1
    epoch: int = 0
    evaluated: bool = False
    finished: bool = False
    rows: List[Dict] = dataclasses.field(default_factory=list)
    hypotheses: List[Dict] = dataclasses.field(default_factory=list)
    train: Dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    selected: Dict[str, int] = dataclasses.field(default_factory=dict)
    stopped: str = ""
    since: float = dataclasses.field(default_factory=time.time, compare=False, repr=False)

    def elapsed(self) -> float:
        """Seconds spent on the current generation (training and evaluation), so far."""
        return self.seconds + time.time() - self.since

    def end_epoch(self, epochs_done: int, logs: Dict[str, float]) -> None:
        self.epoch, self.train = epochs_done, {f"train_{k}": v for k, v in logs.items()}

    def record(self, rows: List[Dict], hypotheses: Dict[str, tuple]) -> None:
        """The evaluated generation: its rows of results.csv (with the seconds it took) and the
        mean |w| of its fit and reset hypotheses per variable."""
        seconds = self.elapsed()
        for row in rows:
            row["seconds"] = seconds
        self.rows += rows
        self.hypotheses += [
            {"generation": self.generation, "variable": k, "fit_mean_abs": float(f.mean()) if f.size else "",
             "reset_mean_abs": float(r.mean()) if r.size else ""}
            for k, (f, r) in hypotheses.items()]
        self.evaluated = True

    def next_generation(self) -> None:
        self.generation, self.epoch, self.evaluated = self.generation + 1, 0, False
        self.seconds, self.since = 0.0, time.time()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["seconds"] = self.elapsed()
        del out["since"]
        return out

    @classmethod
    def from_json(cls, saved: dict) -> "RunState":
        """The state of a `to_json` dict (extra keys, e.g. the class names, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"since"}
        return cls(**{k: v for k, v in saved.items() if k in names})
