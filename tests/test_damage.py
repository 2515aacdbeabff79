"""Whatever the disk holds, a run says what is wrong or goes on (docs/reliability.md, "Damaged
files"): one table, each row a damage done to a run directory or a dataset, the command run
then (`python -m ke_tf.main` in this process, or the export command), its exit status, the line
the user reads, and what the run directory holds afterwards. Resumes from damage end exactly as
the uninterrupted run (--deterministic). The other bad inputs are tests/test_bad_input.py's."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

import conftest
from ke_tf import checkpoint, faults

FLAGS = ["--image_size=16", "--width_multiplier=0.0625", "--generations=1", "--epochs=3",
         "--batch_size=20", "--digits_per_class=4", "--deterministic", "--noexport"]


def main(args, capsys, fault=None, monkeypatch=None):
    """`python -m ke_tf.main ARGS` here, with KE_TF_FAULT=`fault` (counted afresh)."""
    monkeypatch.setattr(faults, "_passages", {})
    if fault:
        monkeypatch.setenv(faults.ENV, fault)
    else:
        monkeypatch.delenv(faults.ENV, raising=False)
    code, out, err = conftest.ke_main_in_process(args, capsys)
    monkeypatch.delenv(faults.ENV, raising=False)
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """"reference": a run never interrupted; "interrupted": the same run stopped by a full disk
    while writing its third checkpoint (exit 2, the message below): `last` holds epoch 2,
    `previous` epoch 1, and nothing half-written is left."""
    import contextlib
    import io

    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("damage")
    dirs = {name: str(root / name) for name in ("reference", "interrupted")}
    stderr = io.StringIO()
    try:
        assert main(FLAGS + ["--quiet", f"--run_dir={dirs['reference']}"], _Capture(stderr),
                    monkeypatch=monkeypatch)[0] == 0
        with contextlib.redirect_stderr(stderr):
            code, _, err = main(FLAGS + ["--quiet", f"--run_dir={dirs['interrupted']}"],
                                _Capture(stderr), "enospc:checkpoint:3", monkeypatch)
    finally:
        monkeypatch.undo()
    assert code == 2 and err.startswith("error: no space left on the device while writing the "
                                        "checkpoint ") and err.rstrip().endswith(
        "the previous checkpoint is intact: free some space and run the same command again to "
        "resume")
    for path, epoch in ((checkpoint.last_dir, 2), (checkpoint.previous_dir, 1)):
        state, _ = checkpoint.load(path(dirs["interrupted"]))
        assert (state["generation"], state["epoch"]) == (1, epoch)
    assert not [n for _, ds, fs in os.walk(dirs["interrupted"]) for n in ds + fs
                if n.startswith((".tmp-", ".old-"))]
    return dirs


class _Capture:
    """capsys for a module fixture: what the in-process command wrote to `stderr`."""

    def __init__(self, stderr):
        self.stderr = stderr

    def readouterr(self):
        import collections

        err, _ = self.stderr.getvalue(), self.stderr.truncate(0)
        self.stderr.seek(0)
        return collections.namedtuple("Out", "out err")("", err)


def rows(run_dir, name="results.csv"):
    with open(os.path.join(run_dir, name)) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def cut(path):  # a file cut short (a full disk, a copy interrupted)
    data = read(path)
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def shorten(path):  # a table that lost its last rows
    with open(path, "r+") as f:
        f.truncate(300)


def garbage(path):  # a file overwritten with something else
    with open(path, "wb") as f:
        f.write(b"not what it was\n")


def last(run_dir, name):
    return os.path.join(checkpoint.last_dir(run_dir), name)


def like_reference(run_dir, runs):
    """The run ended as the uninterrupted one: results.csv, hypotheses.csv, masks.npz and
    config.json, and its checkpoints verify."""
    ref = runs["reference"]
    assert rows(run_dir) == rows(ref)
    assert rows(run_dir, "hypotheses.csv") == rows(ref, "hypotheses.csv")
    assert read(os.path.join(run_dir, "masks.npz")) == read(os.path.join(ref, "masks.npz"))
    flags = [json.loads(read(os.path.join(d, "config.json"))) for d in (run_dir, ref)]
    assert [dict(f, run_dir="") for f in flags] == [dict(flags[1], run_dir="")] * 2
    assert checkpoint.problem(checkpoint.last_dir(run_dir)) is None


def unchanged(run_dir, before):
    assert snapshot(run_dir) == before


def snapshot(run_dir):
    return {os.path.relpath(os.path.join(d, n), run_dir): read(os.path.join(d, n))
            for d, _, files in os.walk(run_dir) for n in files}


# Run-directory damage: (start from, damage, exit status, the line the user reads (a fragment),
# what the run directory holds afterwards: "reference" = `like_reference`, "unchanged").
RUN_DIR_CASES = {
    "full_disk_then_space_freed": (  # the interrupted run as the full disk left it
        "interrupted", lambda d: None, 0, "results: ", "reference"),
    "last_checkpoint_truncated": (
        "interrupted", lambda d: cut(last(d, "network.npz")), 0,
        "checkpoints/last was damaged (network.npz has ", "reference"),
    "last_state_not_json": (
        "interrupted", lambda d: garbage(last(d, "state.json")), 0,
        "going on from the checkpoint before it (generation 1 after epoch 1); the work after it "
        "(at most one epoch and an evaluation) is done again", "reference"),
    "last_manifest_missing": (
        "interrupted", lambda d: os.unlink(last(d, "manifest.json")), 0,
        "checkpoints/last was damaged (it has no manifest.json)", "reference"),
    "both_checkpoints_damaged": (
        "interrupted", lambda d: (cut(last(d, "network.npz")), garbage(os.path.join(
            checkpoint.previous_dir(d), "optimizer.npz"))), 2,
        "checkpoints/last is damaged (network.npz has ", "unchanged"),
    "masks_overwritten": (
        "interrupted", lambda d: garbage(os.path.join(d, "masks.npz")), 0,
        "masks.npz did not match ", "reference"),
    "config_not_json": (
        "interrupted", lambda d: garbage(os.path.join(d, "config.json")), 0,
        "config.json was unreadable (", "reference"),
    "finished_results_lost_rows": (
        "reference", lambda d: shorten(os.path.join(d, "results.csv")), 0,
        "results.csv did not match ", "reference"),
    "finished_hypotheses_deleted": (
        "reference", lambda d: os.unlink(os.path.join(d, "hypotheses.csv")), 0,
        "hypotheses.csv did not match ", "reference"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RUN_DIR_CASES))
def test_damaged_run_directory(case, runs, tmp_path, capsys, monkeypatch):
    start, damage, status, line, after = RUN_DIR_CASES[case]
    run_dir = str(tmp_path / "run")
    shutil.copytree(runs[start], run_dir)
    damage(run_dir)
    before = snapshot(run_dir)
    code, out, err = main(FLAGS + [f"--run_dir={run_dir}"], capsys, monkeypatch=monkeypatch)
    assert code == status, err
    assert "Traceback" not in err
    said = [l for l in (out + err).splitlines() if line in l]
    assert said, out + err
    if status == 2:
        assert said[0].startswith("error: ")
    if after == "reference":
        like_reference(run_dir, runs)
    else:
        unchanged(run_dir, before)


@pytest.mark.slow
def test_damaged_generation_checkpoint_is_refused_by_the_export_command(runs, tmp_path, capsys):
    from ke_tf import export

    run_dir = str(tmp_path / "run")
    shutil.copytree(runs["reference"], run_dir)
    damaged = os.path.join(checkpoint.generation_dir(run_dir, 1), "dense.npz")
    cut(damaged)
    code, _, err = conftest.cli_in_process(export.run, [run_dir, "--generation=1"], capsys)
    assert code == 2 and err.startswith("error: the checkpoint ") and "Traceback" not in err
    assert "generation_001 is damaged: dense.npz has " in err
    assert not os.path.exists(os.path.join(run_dir, "export"))
    shutil.copy(os.path.join(checkpoint.generation_dir(runs["reference"], 1), "dense.npz"),
                damaged)  # the file restored: the same command exports
    code, _, err = conftest.cli_in_process(export.run, [run_dir, "--generation=1"], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    code, _, err = main(FLAGS + [f"--run_dir={run_dir}"], capsys, "nan:batch:1", monkeypatch)
    assert code == 1 and "Traceback" not in err
    assert ("generation 1, epoch 1: training diverged (loss=nan" in err
            and "the run stopped, and no checkpoint was written before it" in err)
    assert not os.path.exists(checkpoint.last_dir(run_dir))


def damaged_body(path):
    """Bytes in the middle of an image changed, its header and trailer intact: only decoding
    finds it (`image_problem` does not)."""
    data = bytearray(read(path))
    middle = len(data) // 3
    data[middle:middle + 40] = b"\xff" * 40 if path.endswith(".jpg") else b"\xaa" * 40
    with open(path, "wb") as f:
        f.write(bytes(data))


def jpeg(path):
    import tensorflow as tf

    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(tf.io.encode_jpeg(image).numpy())


def dataset(root, change=None):
    root = conftest.image_folder(root, classes=("cat", "dog"), sizes=(("train", 4), ("test", 2)))
    if change:
        change(str(root))
    return str(root)


# Dataset damage: (what is done to a 2-class folder dataset, extra flags, exit status, the line
# the user reads (a fragment; {root} is the dataset)). Exit 2 writes no run directory.
DATA_CASES = {
    "png_body_damaged": (lambda r: damaged_body(f"{r}/train/dog/2.png"), [], 2,
                         "error: --dataset=folder:{root}: {root}/train/dog/2.png does not decode "
                         "(Invalid PNG data, size "),
    "jpeg_body_damaged": (lambda r: (jpeg(f"{r}/test/cat/x.jpg"),
                                     damaged_body(f"{r}/test/cat/x.jpg")), [], 2,
                          "{root}/test/cat/x.jpg does not decode (jpeg::Uncompress failed. "
                          "Invalid JPEG data or crop window.); remove it or pass "
                          "--skip_corrupt_images"),
    "damaged_skipped": (lambda r: (damaged_body(f"{r}/train/dog/2.png"),
                                   jpeg(f"{r}/test/cat/x.jpg"), damaged_body(f"{r}/test/cat/x.jpg"),
                                   cut(f"{r}/train/cat/0.png")),
                        ["--skip_corrupt_images"], 0,
                        "--skip_corrupt_images: left out 3 corrupt or non-image files:"),
    "class_name_with_newline": (lambda r: os.rename(f"{r}/train/dog", f"{r}/train/d\nog"), [], 2,
                                "error: --dataset=folder:{root}: the class folder "
                                "'{root}/train/d\\nog' has a control character in its name "
                                "('\\n'); class names become the lines of class_names.txt"),
    "one_class": (lambda r: shutil.rmtree(f"{r}/train/dog"), [], 2,
                  "{root}/train has 1 class folder (cat); a classifier needs two classes or "
                  "more"),
    "empty_class_folder": (lambda r: os.mkdir(f"{r}/train/emu"), [], 2,
                           "the class folder {root}/train/emu holds no images; every class "
                           "needs training images: add some or remove the folder"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_damaged_dataset(case, tmp_path, capsys, monkeypatch):
    change, extra, status, line = DATA_CASES[case]
    root = dataset(tmp_path / "images", change)
    run_dir = str(tmp_path / "run")
    args = ["--image_size=16", "--width_multiplier=0.0625", "--generations=1", "--epochs=1",
            "--batch_size=4", f"--dataset=folder:{root}", f"--run_dir={run_dir}"] + extra
    code, out, err = main(args, capsys, monkeypatch=monkeypatch)
    assert code == status, err
    assert line.format(root=root) in out + err and "Traceback" not in err
    if status == 2:
        assert not os.path.exists(run_dir) and err.startswith("error: ")
    else:  # every damaged file listed, and left out of the splits the run reports
        for name in ("train/dog/2.png", "test/cat/x.jpg", "train/cat/0.png"):
            assert f"  {root}/{name}\n" in out
        with open(os.path.join(run_dir, "export", "class_names.txt")) as f:
            assert f.read() == "cat\ndog\n"


def test_a_missing_flagfile_is_one_plain_line(tmp_path, capsys):
    code, _, err = conftest.ke_main_in_process([f"--flagfile={tmp_path}/none.flags"], capsys)
    assert code == 2
    assert err.splitlines()[0] == (f"error: Unable to open flagfile: [Errno 2] No such file or "
                                   f"directory: '{tmp_path}/none.flags'")


def test_the_expected_retracing_warning_is_dropped_and_nothing_else():
    import logging

    import tensorflow as tf

    from ke_tf import cli

    def record(message):
        return logging.LogRecord("tensorflow", logging.WARNING, "x.py", 1, message, (), None)

    assert cli._expected_retracing in tf.get_logger().filters
    assert not cli._expected_retracing(record(
        "5 out of the last 7 calls to <function f at 0x1> triggered tf.function retracing. ..."))
    assert cli._expected_retracing(record("any other warning"))
