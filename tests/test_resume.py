"""Crashes and resumes with real processes: `python -m ke_tf.main` killed with SIGKILL at chosen
instants (ke_tf.faults), then run again with the same flags, must end exactly where a run that
never stopped ends (with --deterministic): same results.csv, same masks.npz bytes, one row per
generation and network, nothing half-written left behind."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import conftest
from ke_tf import checkpoint
from ke_tf import config as C

TINY = ["--image_size=16", "--width_multiplier=0.0625", "--generations=2", "--epochs=3",
        "--batch_size=20", "--digits_per_class=4", "--deterministic", "--quiet"]
KELS = TINY + ["--split_mode=kels", "--split_rate=0.5"]
WELS_RAND = TINY + ["--split_mode=wels", "--split_rate=0.5", "--wels_rand", "--noexport"]
# The runs of the matrix: {name: (flags, generations of the run)}. RePr and DSD-on-its-own train
# one generation of 2 x 3 = 6 epochs and change weights inside it (after epochs 2/3 and 3/4).
# A run that --patience stops after generation 2 of 3 (min_delta 1000: nothing after the first
# gains), shipping generation 1.
STOPPING = [f for f in KELS if f != "--generations=2"] + [
    "--generations=3", "--val_fraction=0.1", "--select_by=val_top1", "--patience=1",
    "--min_delta=1000"]
RUNS = {"kels": (KELS, 2), "wels_rand": (WELS_RAND, 2), "stopping": (STOPPING, 2),
        "repr": (TINY + ["--method=repr", "--repr_s1=2", "--repr_s2=1", "--noexport"], 1),
        "dsd_only": (TINY + ["--method=dsd_only", "--noexport"], 1)}


def start(run_dir, flags, fault=None):
    """`python -m ke_tf.main --run_dir=RUN_DIR FLAGS`, started, with KE_TF_FAULT=`fault`."""
    env = dict(os.environ)
    env.pop("KE_TF_FAULT", None)
    if fault:
        env["KE_TF_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "ke_tf.main", f"--run_dir={run_dir}"] + flags,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ke_main(run_dir, flags, fault=None, timeout=300):
    return finish(start(run_dir, flags, fault), timeout)


def results(run_dir):
    """results.csv without the wall-clock column."""
    with open(os.path.join(run_dir, "results.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def leftovers(run_dir):
    return [os.path.join(d, n) for d, dirs, files in os.walk(run_dir) for n in dirs + files
            if n.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, all started at once in the background: `reference(name)` waits for
    that run (the tests do their own killing and resuming first) and returns its directory."""
    dirs = {name: str(tmp_path_factory.mktemp(f"reference_{name}")) for name in RUNS}
    procs = {name: start(dirs[name], flags) for name, (flags, _) in RUNS.items()}

    def wait(name):
        if procs[name] is not None:
            done = finish(procs.pop(name))
            procs[name] = None
            assert done.returncode == 0, done.stderr
        return dirs[name]

    yield wait
    for proc in procs.values():
        if proc is not None:
            proc.kill()
            proc.communicate()


def state(run_dir):
    """(generation, epochs done, evaluated) of the run's checkpoints/last."""
    with open(os.path.join(checkpoint.last_dir(run_dir), "state.json")) as f:
        s = json.load(f)
    return s["generation"], s["epoch"], s["evaluated"]


# Every instant of the issue, as chains: a run is killed (SIGKILL, ke_tf.faults) at the first
# instant of its chain, the same command resumes it and is killed at the next instant, and so
# on; a last command runs it to the end. Each resume starts where the previous kill left the
# run, so the end equals the uninterrupted run only if every one of them restored it exactly.
# The fault counts passages within one process: a resumed process counts from its own start.
# 40 images / batch 20 = 2 batches per epoch. Each instant: (name, fault, where the run stands
# afterwards in checkpoints/last: (generation, epochs done, evaluated)).
CHAINS = {
    "kels": ("kels", [
        ("mid_epoch", "kill:batch:3", (1, 1, False)),  # epoch 2's first batch done, not epoch 2
        ("after_epoch", "kill:epoch:1", (1, 2, False)),  # resumed: just after epoch 2's checkpoint
        ("generation_boundary", "kill:evaluated:1", (1, 3, True)),  # not yet re-initialized
        # re-initialized, generation 2's first epoch trained, its checkpoint half-written
        ("inside_checkpoint_write", "kill:checkpoint:1", (1, 3, True)),
        ("during_export", "kill:export:1", (2, 3, True)),  # dense exported, slim not yet
    ]),
    "repr": ("repr", [
        ("sparse_phase", "kill:batch:5", (1, 2, False)),  # filters dropped after epoch 2, held
        ("after_restore", "kill:epoch:2", (1, 4, False)),  # re-initialized orthogonally after 3
    ]),
    "early_stop": ("stopping", [
        ("stopping_generation", "kill:evaluated:2", (2, 3, True)),  # stop decided, not exported
        ("during_export", "kill:export:1", (2, 3, True)),  # the selected dense exported
    ]),
    "dsd_only": ("dsd_only", [
        ("sparse_phase", "kill:batch:7", (1, 3, False)),  # pruned after epoch 3, held
    ]),
}


@pytest.mark.slow
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_killed_run_resumes_to_the_uninterrupted_result(chain, reference, tmp_path):
    name, instants = CHAINS[chain]
    flags, _ = RUNS[name]
    run_dir = str(tmp_path / "run")
    for instant, fault, where in instants:
        killed = ke_main(run_dir, flags, fault)
        assert killed.returncode == -signal.SIGKILL, (instant, killed.stderr)
        assert state(run_dir) == where, instant  # killed where the instant says
        assert not os.path.exists(os.path.join(run_dir, "export", "slim"))  # not finished
        if instant == "inside_checkpoint_write":
            assert any(".tmp-" in path for path in leftovers(run_dir))  # half-written, aside
        if instant == "during_export":
            assert os.path.isdir(os.path.join(run_dir, "export", "dense"))

    ends_as_uninterrupted(run_dir, name, reference)


def ends_as_uninterrupted(run_dir, name, reference):
    """The same command resumes the killed run in `run_dir` to its end, which must be the
    uninterrupted run `name`'s: results.csv, masks.npz, kept checkpoints, exported networks."""
    flags, generations = RUNS[name]
    resumed = ke_main(run_dir, flags)
    assert resumed.returncode == 0, resumed.stderr
    ref = reference(name)
    rows = results(run_dir)
    assert rows == results(ref)  # --deterministic: the same accuracies, to the last digit
    kels = name in ("kels", "stopping")
    nets = ("dense", "slim", "slim_recal") if kels else ("dense",)
    assert [(r["generation"], r["net"]) for r in rows] == [
        (str(g), n) for g in range(1, generations + 1) for n in nets]  # one row each
    assert digest(os.path.join(run_dir, "masks.npz")) == digest(os.path.join(ref, "masks.npz"))
    assert checkpoint.kept_generations(run_dir) == list(range(1, generations + 1))
    if kels:  # the shipped networks are the uninterrupted run's, weight for weight
        import tensorflow as tf

        x = tf.random.stateless_normal((4, 16, 16, 3), seed=(1, 2))
        for net in ("dense", "slim"):
            mine, theirs = (tf.saved_model.load(os.path.join(d, "export", net))
                            .signatures["serving_default"](images=x)["logits"].numpy()
                            for d in (run_dir, ref))
            np.testing.assert_array_equal(mine, theirs)
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_resume_restores_masks_and_weights_exactly(reference, tmp_path):
    """WELS-Rand killed in its second generation (its masks re-drawn after the first): the last
    checkpoint holds the new masks, the resumed run ends as the uninterrupted one, and its
    generation 2 checkpoint holds the very arrays of the uninterrupted run's."""
    run_dir = str(tmp_path / "run")
    killed = ke_main(run_dir, WELS_RAND, "kill:epoch:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert state(run_dir) == (2, 1, False)  # just after generation 2's first epoch
    assert not os.path.exists(os.path.join(run_dir, "export"))  # --noexport, and not finished
    _, partial = checkpoint.load(checkpoint.last_dir(run_dir))
    _, ref_g1 = checkpoint.load(checkpoint.generation_dir(reference("wels_rand"), 1))
    _, ref_g2 = checkpoint.load(checkpoint.generation_dir(reference("wels_rand"), 2))
    # WELS-Rand: generation 2 trains with a new random mask; the checkpoint holds it
    assert any((partial["masks"][k] != ref_g1["masks"][k]).any() for k in ref_g1["masks"])
    assert all((partial["masks"][k] == ref_g2["masks"][k]).all() for k in ref_g2["masks"])
    ends_as_uninterrupted(run_dir, "wels_rand", reference)
    _, mine = checkpoint.load(checkpoint.generation_dir(run_dir, 2))
    for key, value in ref_g2["dense"].items():
        np.testing.assert_array_equal(mine["dense"][key], value)


@pytest.mark.slow
def test_finished_run_is_left_as_it_is(reference, capsys):
    run_dir = reference("kels")
    before = digest(os.path.join(run_dir, "results.csv"))
    code, out, err = conftest.ke_main_in_process(
        [f"--run_dir={run_dir}"] + [f for f in KELS if f != "--quiet"], capsys)
    assert code == 0, err
    assert "finished run" in out
    assert digest(os.path.join(run_dir, "results.csv")) == before


@pytest.mark.slow
def test_other_flags_are_refused_with_the_differences(reference, capsys):
    run_dir = reference("kels")
    code, _, err = conftest.ke_main_in_process(
        [f"--run_dir={run_dir}"] + KELS + ["--lr=0.1", "--epochs=4"], capsys)
    assert code == 2
    assert "--epochs: 3 -> 4" in err and "--lr: 0.05 -> 0.1" in err
    assert "Traceback" not in err
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["lr"] == 0.05  # untouched


@pytest.mark.slow
def test_nan_loss_stops_with_status_1_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = ke_main(run_dir, KELS, "nan:batch:3")  # weights poisoned during epoch 2
    assert proc.returncode == 1, proc.stderr
    assert "generation 1, epoch 2: training diverged (loss=nan" in proc.stderr
    assert "Traceback" not in proc.stderr
    state, arrays = checkpoint.load(checkpoint.last_dir(run_dir))
    assert (state["generation"], state["epoch"]) == (1, 1)
    assert all(np.isfinite(v).all() for v in arrays["network"].values())
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_keep_generations_and_load_networks(tmp_path):
    from ke_tf.generations import GenerationRunner

    cfg = conftest.tiny_config(tmp_path, data=dict(batch_size=20, recal_images=20),
                               train=dict(generations=3), export=False, keep_generations=2, seed=7)
    runner = GenerationRunner(cfg, verbose=False)
    runner.run()
    assert checkpoint.kept_generations(str(tmp_path)) == [2, 3]
    loaded = checkpoint.load_networks(str(tmp_path))
    assert loaded.generation == 3 and loaded.class_names == tuple("0123456789")
    assert loaded.output_name == "logits" and loaded.config == cfg
    x = next(iter(runner.data.test))[0]
    np.testing.assert_allclose(loaded.nets["dense"](x).numpy(),
                               runner.nets["dense"](x).numpy(), atol=1e-5)
    np.testing.assert_allclose(loaded.nets["slim"](x).numpy(),
                               runner.nets["slim_recal"](x).numpy(), atol=1e-5)
    with pytest.raises(C.ConfigError, match="keeps the checkpoints of generations 2, 3"):
        checkpoint.load_networks(str(tmp_path), generation=1)


@pytest.mark.slow
def test_resume_in_the_same_python_process(tmp_path):
    """A second GenerationRunner in one process (a notebook cell run again) resumes the run
    the first one left: the optimizer state keys do not depend on how many exist."""
    from ke_tf.generations import GenerationRunner

    cfg = conftest.tiny_config(tmp_path, data=dict(batch_size=20, recal_images=20),
                               train=dict(epochs=2), export=False)
    first = GenerationRunner(cfg, verbose=False)
    first.run()
    state, arrays = checkpoint.load(checkpoint.last_dir(str(tmp_path)))
    state["finished"], state["evaluated"], state["generation"] = False, False, 2
    state["epoch"], state["rows"] = 1, state["rows"][:3]  # as if stopped after epoch 1 of g 2
    checkpoint.save(checkpoint.last_dir(str(tmp_path)), state, arrays)
    second = GenerationRunner(cfg, verbose=False)
    rows = second.run()
    assert [(r["generation"], r["net"]) for r in rows] == [
        (g, n) for g in (1, 2) for n in ("dense", "slim", "slim_recal")]
