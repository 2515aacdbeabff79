"""Run every `flags/compare_digits_*.flags` preset over several seeds and tabulate the methods.

    python tools/compare_methods.py --seeds=0,1,2 [--out=runs/compare] [--only=ke,long]

Each preset trains the same total number of epochs (the fair comparison). The table gives, per
method, the last generation's test top-1 of the dense network (for slim_scratch: the slim
network it trains) and of the slim KELS network with re-estimated BatchNorm where the method has
one, as mean +- standard deviation over the seeds, with the seconds per run. Runs already in
--out are read, not repeated.
"""
import csv
import glob
import os
import subprocess
import sys

from ke_tf import cli  # first: exit statuses, TensorFlow's start-up noise filtered

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run each preset with.")
flags.DEFINE_string("out", "runs/compare", "Directory of the runs.")
flags.DEFINE_list("only", [], "Run only these presets (names after compare_digits_).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_rows(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["generation"]) for r in rows)
    return {r["net"]: r for r in rows if int(r["generation"]) == last}


def main(_):
    presets = sorted(glob.glob(os.path.join(ROOT, "flags", "compare_digits_*.flags")))
    names = [os.path.basename(p)[len("compare_digits_"):-len(".flags")] for p in presets]
    table = []
    for name, preset in zip(names, presets):
        if FLAGS.only and name not in FLAGS.only:
            continue
        dense, slim, seconds = [], [], []
        for seed in FLAGS.seeds:
            run_dir = os.path.join(FLAGS.out, f"{name}-s{seed}")
            results = os.path.join(run_dir, "results.csv")
            if not os.path.exists(results):
                print(f"running {name} seed {seed}", flush=True)
                subprocess.run([sys.executable, "-m", "ke_tf.main", f"--flagfile={preset}",
                                f"--seed={seed}", f"--run_dir={run_dir}", "--quiet",
                                "--noexport"], check=True)
            rows = last_rows(results)
            main_net = rows.get("dense", rows.get("slim"))
            dense.append(float(main_net["test_top1"]))
            seconds.append(float(main_net["seconds"]))
            if "slim_recal" in rows:
                slim.append(float(rows["slim_recal"]["test_top1"]))
        table.append((name, dense, slim, seconds))
    print(f"\n{'method':16s} {'test top-1 (last gen.)':>24s} {'slim recalibrated':>20s} "
          f"{'per seed':>28s}")
    for name, dense, slim, seconds in table:
        s = f"{np.mean(slim):6.2f} +- {np.std(slim):4.2f}" if slim else "-"
        print(f"{name:16s} {np.mean(dense):14.2f} +- {np.std(dense):4.2f} {s:>20s} "
              f"{' / '.join(f'{d:.2f}' for d in dense):>28s}")


if __name__ == "__main__":
    cli.run(main)
