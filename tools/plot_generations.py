"""Plot accuracy against generation for one or more runs (paper Fig. 1, 8).

    python tools/plot_generations.py RUN_DIR [RUN_DIR ...] --out fig.png [--nets=dense,slim_recal]

Reads every RUN_DIR/results.csv and draws, for each run and network (`dense` N_g, `slim` H_g as
extracted, `slim_recal` H_g with re-estimated BatchNorm), test top-1 (Recall@1 for metric-learning
runs) against the generation; one colour per run, one line style per network, the legend says
"<run dir name> <net>". The PNG is written atomically. Exit status 2, with a message naming the
file, for a missing or unreadable results.csv. No TensorFlow: it starts in a second.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ke_tf import atomic  # noqa: E402

NETS = ("dense", "slim", "slim_recal")
METRICS = (("test_top1", "test top-1 (%)"), ("recall_at_1", "Recall@1 (%)"))
STYLES = {"dense": ("-", "o"), "slim": (":", "v"), "slim_recal": ("--", "s")}
USAGE_ERROR = 2


class InputError(Exception):
    """A results.csv that cannot be plotted; the message names the file."""


Series = Dict[str, List[Tuple[int, float]]]  # net -> [(generation, value)]


def read_results(run_dir: str) -> Tuple[str, Series]:
    """(metric column, {net: [(generation, value), ...]}) of RUN_DIR/results.csv."""
    path = os.path.join(run_dir, "results.csv")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror}); is {run_dir} a ke_tf run "
                         f"directory?") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a CSV file ({err})") from None
    columns = set(rows[0]) if rows else set()
    metric = next((c for c, _ in METRICS if c in columns), None)
    if not rows or not {"generation", "net"} <= columns or metric is None:
        raise InputError(f"{path}: not a ke_tf results.csv (needs a header with generation, net "
                         f"and test_top1 or recall_at_1, and at least one row)")
    series: Series = {}
    for line, row in enumerate(rows, start=2):
        value = row.get(metric) or ""
        if value == "":
            continue
        try:
            point = (int(row["generation"]), float(value))
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {line}: generation {row['generation']!r} or "
                             f"{metric} {value!r} is not a number") from None
        if not math.isnan(point[1]):
            series.setdefault(row["net"], []).append(point)
    if not series:
        raise InputError(f"{path}: no {metric} values to plot")
    return metric, series


def run_labels(run_dirs: List[str]) -> List[str]:
    """The run directories' names; the paths as given where two names are the same."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


def plot(runs: List[Tuple[str, str, Series]], nets, title: str | None):
    """A figure of every (label, metric, series) run; one line per network in `nets`."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    generations = set()
    for i, (label, _, series) in enumerate(runs):
        for net in nets:
            points = sorted(series.get(net, []))
            if not points:
                continue
            xs, ys = zip(*points)
            generations.update(xs)
            style, marker = STYLES.get(net, ("-.", "x"))
            ax.plot(xs, ys, linestyle=style, marker=marker, color=colors[i % len(colors)],
                    label=f"{label} {net}")
    metrics = {metric for _, metric, _ in runs}
    ax.set_ylabel(" / ".join(name for c, name in METRICS if c in metrics))
    ax.set_xlabel("generation")
    if generations and max(generations) <= 20:
        ax.set_xticks(sorted(generations))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="ke_tf run directories")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--nets", default=",".join(NETS),
                        help=f"comma-separated networks to draw (default: {','.join(NETS)})")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    try:
        runs = [(label,) + read_results(d) for label, d in
                zip(run_labels(args.run_dirs), args.run_dirs)]
        if not any(net in series for _, _, series in runs for net in nets):
            raise InputError(f"--nets={args.nets}: none of these networks is in the results")
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return USAGE_ERROR
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        sys.stderr.write(f"error: --out {args.out}: directory {out_dir} does not exist\n")
        return USAGE_ERROR
    fig = plot(runs, nets, args.title)
    with atomic.open_atomic(args.out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
