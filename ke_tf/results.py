"""The run's tables: results.csv (one row per generation and network) and hypotheses.csv.

Both are rewritten whole and atomically after every generation (the `Tables` hook), so a reader
(a plotting tool, a spreadsheet, another run) never sees a half-written file.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Sequence

from ke_tf import atomic
from ke_tf.hooks import Hook

RESULTS = "results.csv"
HYPOTHESES = "hypotheses.csv"
HYPOTHESES_COLUMNS = ("generation", "variable", "fit_mean_abs", "reset_mean_abs")


def cell(column: str, value):
    """Accuracies (percent) with 4 decimals, seconds with 1, mean |w| with 6 digits."""
    if not isinstance(value, float) or column == "split_rate":
        return value
    if column == "seconds":
        return f"{value:.1f}"
    return f"{value:.6g}" if column.endswith("_abs") else f"{value:.4f}"


def write_csv(path: str, rows: List[Dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(k, v) for k, v in row.items()})
    with atomic.open_atomic(path) as f:
        f.write(buf.getvalue())


class Tables(Hook):
    """Rewrites results.csv and hypotheses.csv of `run_dir` when a generation was evaluated."""

    def __init__(self, run_dir: str, columns: Sequence[str]):
        self.run_dir, self.columns = run_dir, list(columns)

    def generation_end(self, run, state, evaluation) -> None:
        write_csv(os.path.join(self.run_dir, RESULTS), state.rows, self.columns)
        write_csv(os.path.join(self.run_dir, HYPOTHESES), state.hypotheses, HYPOTHESES_COLUMNS)
