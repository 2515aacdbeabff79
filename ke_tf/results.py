"""The run's tables: results.csv (one row per generation and network) and hypotheses.csv.

Both are rewritten whole and atomically after every generation (the `Tables` hook), so a reader
(a plotting tool, a spreadsheet, another run) never sees a half-written file.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Sequence, Tuple

from ke_tf import atomic
from ke_tf.hooks import Hook

RESULTS = "results.csv"
HYPOTHESES = "hypotheses.csv"
HYPOTHESES_COLUMNS = ("generation", "variable", "fit_mean_abs", "reset_mean_abs")
HEAD_COLUMNS = ("generation", "net", "method", "split_mode", "split_rate")
COST_COLUMNS = ("params", "macs", "seconds")
# Which rows the run ships (`ke_tf.selection`: 1 on the selected generation's row of the dense
# and of the shipped slim network) and, on the last generation's rows of a run stopped by
# --patience, why it stopped.
SELECTION_COLUMNS = ("selected", "stopped")


def columns(task) -> List[str]:
    """results.csv's columns for a `ke_tf.tasks.Task`: which generation and network, the task's
    evaluation columns, the last epoch's training metrics, the network's cost and the seconds,
    and the selection marks."""
    return list(HEAD_COLUMNS + task.columns + task.train_columns + COST_COLUMNS
                + SELECTION_COLUMNS)


def marked(rows: List[Dict], selected_rows: Dict[str, int], stopped: str) -> List[Dict]:
    """Copies of `rows` with their selection cells: "selected" 1 on the row of every
    {row name: generation} of `selected_rows`, "stopped" the early stop's reason on the last
    generation's rows."""
    last = max((int(r["generation"]) for r in rows), default=0)
    return [dict(r, selected=1 if selected_rows.get(r["net"]) == int(r["generation"]) else "",
                 stopped=stopped if stopped and int(r["generation"]) == last else "")
            for r in rows]


def row(columns: Sequence[str], *, generation: int, net: str, method, train: Dict,
        cost: Tuple[int, int], scores: Sequence[Dict]) -> Dict:
    """One row of results.csv, every cell but "seconds" (`RunState.record` adds the time the
    generation took): the network `net` of `generation`, the method's name and split cells,
    the last epoch's `train` metrics, its (params, MACs) `cost` and its `scores` on each split
    (`Task.evaluate`); columns it has no value for are empty."""
    out = dict.fromkeys(columns, "")
    out.update(generation=generation, net=net, method=method.name, **train,
               **method.split_columns())
    for split_scores in scores:
        out.update(split_scores)
    out["params"], out["macs"] = cost
    return out


def cell(column: str, value):
    """Accuracies (percent) with 4 decimals, seconds with 1, mean |w| with 6 digits."""
    if not isinstance(value, float) or column == "split_rate":
        return value
    if column == "seconds":
        return f"{value:.1f}"
    return f"{value:.6g}" if column.endswith("_abs") else f"{value:.4f}"


def csv_text(rows: List[Dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(k, v) for k, v in row.items()})
    return buf.getvalue()


def write_csv(path: str, rows: List[Dict], columns: Sequence[str]) -> None:
    with atomic.open_atomic(path) as f:
        f.write(csv_text(rows, columns))


class Tables(Hook):
    """Rewrites results.csv and hypotheses.csv of `run_dir` when a generation was evaluated."""

    def __init__(self, run_dir: str, columns: Sequence[str]):
        self.run_dir, self.columns = run_dir, list(columns)

    def generation_end(self, run, state, evaluation) -> None:
        write_csv(os.path.join(self.run_dir, RESULTS), run.rows(), self.columns)
        write_csv(os.path.join(self.run_dir, HYPOTHESES), state.hypotheses, HYPOTHESES_COLUMNS)
