"""tools/plot_generations.py: accuracy against generation for several runs, as a PNG."""
import csv
import os
import struct
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plot_generations.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_results(run_dir, generations, nets, metric="test_top1", base=80.0):
    os.makedirs(run_dir)
    columns = ["generation", "net", "method", "split_mode", "split_rate", metric, "seconds"]
    with open(os.path.join(run_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for g in range(1, generations + 1):
            for i, net in enumerate(nets):
                writer.writerow({"generation": g, "net": net, "method": "ke", "split_mode": "kels",
                                 "split_rate": 0.8, metric: f"{base - 5 * i + g:.4f}",
                                 "seconds": 1.0})


def plot(args, cwd):
    return subprocess.run([sys.executable, TOOL] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def png_size(path):
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_two_runs_overlaid(tmp_path):
    write_results(tmp_path / "ke-s0", 5, ("dense", "slim", "slim_recal"))
    write_results(tmp_path / "long-s0", 1, ("dense", "slim", "slim_recal"), base=85.0)
    proc = plot(["ke-s0", "long-s0", "--out", "fig.png", "--title", "digits"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "fig.png"
    assert png_size(out) == (800, 500)  # 8 x 5 inches at 100 dpi
    assert 10_000 < os.path.getsize(out) < 1_000_000
    assert sorted(os.listdir(tmp_path)) == ["fig.png", "ke-s0", "long-s0"]  # no temporary left


def test_legend_and_metric_learning_runs(tmp_path):
    """The labels are '<run dir name> <net>'; metric runs plot Recall@1."""
    sys.path.insert(0, os.path.dirname(TOOL))
    try:
        import plot_generations as tool
    finally:
        sys.path.pop(0)
    write_results(tmp_path / "cls", 3, ("dense", "slim"))
    write_results(tmp_path / "metric", 2, ("dense",), metric="recall_at_1", base=60.0)
    runs = [(label,) + tool.read_results(str(tmp_path / d))
            for label, d in zip(tool.run_labels(["cls", "metric"]), ["cls", "metric"])]
    assert runs[1][1] == "recall_at_1" and runs[1][2] == {"dense": [(1, 61.0), (2, 62.0)]}
    fig = tool.plot(runs, tool.NETS, None)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "cls dense", "cls slim", "metric dense"]
    assert ax.get_ylabel() == "test top-1 (%) / Recall@1 (%)"
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(ax.lines[1].get_ydata()) == [76.0, 77.0, 78.0]
    assert tool.run_labels(["a/run", "b/run", "c"]) == ["a/run", "b/run", "c"]


@pytest.mark.parametrize("content", [
    None,  # no results.csv
    "generation,net,method\n1,dense,ke\n",  # no accuracy column
    "generation,net,test_top1\none,dense,50\n",  # not a number
    "",  # empty
])
def test_bad_results_csv_exits_2_naming_the_file(tmp_path, content):
    write_results(tmp_path / "good", 2, ("dense",))
    os.makedirs(tmp_path / "bad")
    if content is not None:
        (tmp_path / "bad" / "results.csv").write_text(content)
    proc = plot(["good", "bad", "--out", "fig.png"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert os.path.join("bad", "results.csv") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fig.png").exists()


def test_usage_errors_exit_2(tmp_path):
    write_results(tmp_path / "run", 2, ("dense",))
    assert plot(["run"], cwd=tmp_path).returncode == 2  # --out is required
    proc = plot(["run", "--out", "missing_dir/fig.png"], cwd=tmp_path)
    assert proc.returncode == 2 and "missing_dir" in proc.stderr
