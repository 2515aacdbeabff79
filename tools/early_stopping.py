"""What --select_by and --patience buy: the measurement of docs/guide.md (Choosing the generation
to ship).

    python tools/early_stopping.py --seeds=0,1,2 [--out=runs/early_stopping]

For every seed, two runs of the digits default with a validation split (--val_fraction=0.2,
drawn from digits' non-training images, so the test split shrinks to 1358 images):
`--generations=10 --select_by=val_top1` (every generation trained: the last generation and the
best in hindsight are read from it) and the same with `--patience=3` (what a user gets). The
table gives, per seed and network (dense N_g, slim H_g with re-estimated BatchNorm), the
generations trained, the test top-1 of the shipped network against the last generation's and
the best generation's in hindsight (test top-1 chosen on the test split itself: not a method,
the ceiling), and the seconds of the stopped run against the full one. A second table replays
`ke_tf.selection` on the full runs' rows for other --patience and --min_delta values (what
those runs would have trained and shipped, had their rows been the same: a replay, not a run).
Runs already in --out are read, not repeated; `--extra` passes more flags to every run (the
tests' tiny sizes).
"""
import csv
import os
import subprocess
import sys

from ke_tf import cli  # first: exit statuses, TensorFlow's start-up noise filtered

from absl import flags  # noqa: E402

from ke_tf import selection  # noqa: E402
from ke_tf.config import RunConfig  # noqa: E402

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
flags.DEFINE_string("out", "runs/early_stopping", "Directory of the runs.")
flags.DEFINE_integer("generations", 10, "Generations of the full run (the most the stopped "
                     "one trains).")
flags.DEFINE_integer("patience", 3, "--patience of the stopped run.")
flags.DEFINE_float("val_fraction", 0.2, "--val_fraction of both runs.")
flags.DEFINE_list("extra", [], "More flags for every run, e.g. --extra=--epochs=1,--lr=0.1.")
flags.DEFINE_list("replay", ["1:0", "2:0", "3:0", "2:0.3", "3:0.3"], "PATIENCE:MIN_DELTA "
                  "pairs to replay on the full runs' rows.")
FLAGS = flags.FLAGS
NETS = (("dense", "dense"), ("slim_recal", "slim"))


def run(run_dir, seed, patience):
    """results.csv's rows of the run in `run_dir`, run first unless it is there."""
    path = os.path.join(run_dir, "results.csv")
    if not os.path.exists(path):
        print(f"running {run_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "ke_tf.main", f"--run_dir={run_dir}", f"--seed={seed}",
                        f"--generations={FLAGS.generations}", f"--val_fraction={FLAGS.val_fraction}",
                        "--select_by=val_top1", f"--patience={patience}", "--quiet",
                        "--noexport"] + FLAGS.extra, check=True)
    with open(path) as f:
        return list(csv.DictReader(f))


def seconds(rows):
    """The run's training and evaluation time: one `seconds` per generation."""
    return sum(float(r["seconds"]) for r in rows if r["net"] == "dense")


def main(argv):
    print(f"\n| seed | network | generations trained | shipped (selected) | last generation "
          f"| best in hindsight | seconds, stopped / full |\n|---|---|---|---|---|---|---|")
    for seed in FLAGS.seeds:
        name = os.path.join(FLAGS.out, f"s{seed}")
        full = run(f"{name}-full", seed, 0)
        stopped = run(f"{name}-patience{FLAGS.patience}", seed, FLAGS.patience)
        trained = max(int(r["generation"]) for r in stopped)
        for row_name, label in NETS:
            mine = [r for r in full if r["net"] == row_name]
            if not mine:
                continue
            shipped = next(float(r["test_top1"]) for r in stopped
                           if r["net"] == row_name and r["selected"] == "1")
            selected = next(r["generation"] for r in stopped
                            if r["net"] == row_name and r["selected"] == "1")
            last = float(mine[-1]["test_top1"])
            best = max(mine, key=lambda r: float(r["test_top1"]))
            print(f"| {seed} | {label} | {trained} of {FLAGS.generations} | {shipped:.2f} "
                  f"(g{selected}) | {last:.2f} | {float(best['test_top1']):.2f} "
                  f"(g{best['generation']}) | {seconds(stopped):.0f} / {seconds(full):.0f} |")
    print_replays()


def replay(full, patience, min_delta):
    """(generations trained, {net: test top-1 shipped}) had `full`'s run used --patience and
    --min_delta: `ke_tf.selection` applied generation by generation, as the runner does."""
    config = RunConfig(select_by="val_top1", patience=patience, min_delta=min_delta)
    rows_of = {net: name for name, net in NETS}
    last = max(int(r["generation"]) for r in full)
    for g in range(1, last + 1):
        seen = [r for r in full if int(r["generation"]) <= g]
        selected = selection.select(seen, {net: name for name, net in NETS}, config)
        if selection.stop_reason(selected, g, last, config) or g == last:
            return g, {net: next(float(r["test_top1"]) for r in seen if r["net"] == rows_of[net]
                                 and int(r["generation"]) == selected[net]) for net in selected}


def print_replays():
    print(f"\n| --patience | --min_delta | generations trained (seeds {', '.join(FLAGS.seeds)}) "
          f"| dense shipped, mean | slim shipped, mean |\n|---|---|---|---|---|")
    fulls = [run(os.path.join(FLAGS.out, f"s{seed}-full"), seed, 0) for seed in FLAGS.seeds]
    for pair in FLAGS.replay:
        patience, min_delta = int(pair.split(":")[0]), float(pair.split(":")[1])
        outcomes = [replay(full, patience, min_delta) for full in fulls]
        means = {net: sum(o[1][net] for o in outcomes) / len(outcomes) for net in outcomes[0][1]}
        print(f"| {patience} | {min_delta:g} | {', '.join(str(o[0]) for o in outcomes)} | "
              + " | ".join(f"{means[net]:.2f}" for _, net in NETS if net in means) + " |")


if __name__ == "__main__":
    cli.run(main)
