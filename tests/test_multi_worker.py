"""--strategy=multi_worker: TF_CONFIG, the global batch shared by the replicas, and two worker
processes on 127.0.0.1 (CPU, one thread each) that train what one process trains, write only on
the chief, and resume together after one of them is killed."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from ke_tf import config as C, distribution, rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny run with random masks re-drawn every generation (WELS-Rand) and reset draws: 40 digits,
# batch 20 (10 a replica), 2 generations x 3 epochs, bit-identical reruns (--deterministic).
FLAGS = ["--image_size=16", "--width_multiplier=0.0625", "--generations=2", "--epochs=3",
         "--batch_size=20", "--digits_per_class=4", "--recal_images=20", "--split_mode=wels",
         "--split_rate=0.5", "--wels_rand", "--deterministic", "--quiet"]
TIMEOUT = 300  # seconds, for any one process
# One process of a run, from the command line's flags (argv[1], JSON): the run through the
# GenerationRunner, then the worker's final weights, optimizer state and masks (argv[2], .npz,
# outside the run directory), and on stdout the losses of every epoch and the weights' sum when
# each generation starts (after the reset draws). argv[3] == "two_devices": two logical CPUs.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ke_tf import main
    if sys.argv[3:] == ["two_devices"]:
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration(),
                                                         tf.config.LogicalDeviceConfiguration()])
    main.FLAGS(["worker"] + json.loads(sys.argv[1]))
    cfg = main.config_from_flags(main.flag_values())
    from ke_tf import distribution
    distribution.strategy(cfg)  # first: MultiWorkerMirroredStrategy precedes every other op
    from ke_tf.generations import GenerationRunner
    from ke_tf.hooks import Hook
    out = {"losses": [], "starts": []}

    class Record(Hook):
        def generation_start(self, run, state):
            out["starts"].append(float(sum(np.abs(v.numpy().astype(np.float64)).sum()
                                           for v in run.network.variables)))

        def epoch_end(self, run, state):
            out["losses"].append(state.train["train_loss"])

    runner = GenerationRunner(cfg, verbose=False, hooks=[Record()])
    runner.run()
    arrays = {f"network/{v.path}": v.numpy() for v in runner.network.variables}
    arrays.update({f"optimizer/{v.path}": v.numpy() for v in runner.model.optimizer.variables})
    arrays.update({f"masks/{k}": v for k, v in runner.masks.items()})
    np.savez(sys.argv[2], **arrays)
    out.update(replicas=runner.strategy.num_replicas_in_sync, chief=runner.chief)
    print(json.dumps(out))
""")


# --- TF_CONFIG and the global batch (no process started) ---------------------------------------

def tf_config(ports, index, job="worker", chief=None):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    if chief:
        cluster["chief"] = [f"127.0.0.1:{chief}"]
    return json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})


def test_tf_config_gives_the_cluster_and_the_chief():
    two = distribution.cluster_from_env({"TF_CONFIG": tf_config([1000, 1001], 1)})
    assert (two.task_type, two.task_index, two.num_workers, two.is_chief) == ("worker", 1, 2, False)
    assert distribution.cluster_from_env({"TF_CONFIG": tf_config([1000, 1001], 0)}).is_chief
    # with a "chief" job, the chief is that task and worker 0 is not
    with_chief = {"TF_CONFIG": tf_config([1000], 0, chief=999)}
    assert not distribution.cluster_from_env(with_chief).is_chief
    assert distribution.cluster_from_env({"TF_CONFIG": tf_config([1000], 0, "chief", 999)}).is_chief
    assert distribution.cluster_from_env(with_chief).num_workers == 2


@pytest.mark.parametrize("value, message", [
    (None, "the environment variable TF_CONFIG is not set"),
    ("{cluster", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster" object'),
    ('{"cluster": {"worker": ["127.0.0.1:1000"], "ps": ["127.0.0.1:1001"]}, '
     '"task": {"type": "worker", "index": 0}}', "TF_CONFIG has the job 'ps'"),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}',
     'cluster.worker must be a list of "host:port" addresses'),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
     "lists an address twice"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}}', 'TF_CONFIG has no "task" object'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}',
     "task.type 'chief' is not a job of its cluster"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     "task.index 2 is not one of the 2 worker tasks"),
])
def test_a_bad_tf_config_is_a_usage_error_naming_it(value, message):
    with pytest.raises(C.ConfigError, match="--strategy=multi_worker") as err:
        distribution.cluster_from_env({} if value is None else {"TF_CONFIG": value})
    assert message in str(err.value) and "TF_CONFIG" in str(err.value)


def test_only_the_chief_writes_under_multi_worker(monkeypatch):
    cfg = C.RunConfig(strategy="multi_worker")
    monkeypatch.setenv("TF_CONFIG", tf_config([1000, 1001], 1))
    assert not distribution.is_chief(cfg)
    assert distribution.is_chief(C.RunConfig(strategy="mirrored"))  # one process: it writes
    monkeypatch.setenv("TF_CONFIG", tf_config([1000, 1001], 0))
    assert distribution.is_chief(cfg)


def test_the_global_batch_must_divide_by_the_replicas():
    def check(batch, replicas, **train):
        cfg = C.RunConfig(data=C.DataConfig(batch_size=batch), train=C.TrainConfig(**train),
                          strategy="multi_worker")
        rules.check_replicas(cfg, replicas, workers=2)

    check(20, 2), check(24, 4), check(20, 2, regularizer="cskd")
    with pytest.raises(C.ConfigError, match=r"--batch_size must divide by the 2 replicas of "
                       r"--strategy=multi_worker \(2 workers x 1 device each\).*Received: "
                       r"batch_size=25"):
        check(25, 2)
    with pytest.raises(C.ConfigError, match="2 x the 2 replicas with --regularizer=cskd"):
        check(18, 2, regularizer="cskd")


def test_cskd_batches_give_each_replica_its_anchors_then_their_partners():
    labels = tf.constant([0, 1, 2, 3, 0, 1, 2, 3])  # anchors of 4 classes, then their partners
    images = tf.range(8)
    shuffled, ordered = distribution.replica_pairs(images, labels, replicas=2)
    assert ordered.numpy().tolist() == [0, 1, 0, 1, 2, 3, 2, 3]  # replica 0 | replica 1
    assert shuffled.numpy().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    _, one = distribution.replica_pairs(images, labels, replicas=1)
    assert one.numpy().tolist() == labels.numpy().tolist()


def test_predict_on_one_worker_is_keras_predict():
    import keras

    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    data = tf.data.Dataset.from_tensor_slices((np.arange(21, dtype="float32").reshape(7, 3),
                                               np.zeros(7))).batch(3)
    np.testing.assert_allclose(distribution.predict(net, data), net.predict(data, verbose=0),
                               rtol=1e-6)


# --- two worker processes on 127.0.0.1 --------------------------------------------------------

def free_ports(n):
    """`n` distinct free TCP ports of the loopback interface (bound, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def environment(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("KE_TF_FAULT", "TF_CONFIG")}
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
    env.update(extra or {})
    return env


def start_workers(commands, ports, faults=None):
    """One process per command, worker i of the cluster `ports` (all on 127.0.0.1)."""
    procs = []
    for i, command in enumerate(commands):
        extra = {"TF_CONFIG": tf_config(ports, i)}
        if faults and faults.get(i):
            extra["KE_TF_FAULT"] = faults[i]
        procs.append(subprocess.Popen(command, env=environment(extra), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def finish(procs):
    """(returncode, stdout, stderr) of every process; all killed if one outlives TIMEOUT."""
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def results(run_dir):
    """results.csv without the wall-clock column."""
    with open(os.path.join(run_dir, "results.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def script(flags, npz, *extra):
    return [sys.executable, "-c", SCRIPT, json.dumps(flags), str(npz), *extra]


def outputs(tmp, names, done):
    """({name: the JSON line a process printed}, {name: its arrays}) of finished `script`s."""
    for returncode, _, stderr in done:
        assert returncode == 0, stderr[-3000:]
    out = {name: json.loads(stdout.strip().splitlines()[-1])
           for name, (_, stdout, _) in zip(names, done)}
    return out, {name: dict(np.load(tmp / f"{name}.npz")) for name in names}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two workers of a run, each with its own run directory (the non-chief's must stay
    empty): (directory, {worker: printed}, {worker: arrays})."""
    tmp = tmp_path_factory.mktemp("multi_worker")
    names = ["worker0", "worker1"]
    done = finish(start_workers(
        [script(FLAGS + ["--strategy=multi_worker", f"--run_dir={tmp / name}"], tmp / f"{name}.npz")
         for name in names], free_ports(2)))
    return (tmp,) + outputs(tmp, names, done)


@pytest.fixture(scope="module")
def one_process(runs):
    """The same run in one process, over two logical CPU devices (MirroredStrategy: the global
    batch split in two) and on one device: ({name: printed}, {name: arrays})."""
    tmp = runs[0]
    refs = {"two_devices": ["--strategy=mirrored"], "one_device": ["--strategy=none"]}
    procs = [subprocess.Popen(script(FLAGS + flags + [f"--run_dir={tmp / name}"],
                                     tmp / f"{name}.npz", *([name] if name == "two_devices"
                                                            else [])),
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for name, flags in refs.items()]
    return outputs(tmp, list(refs), finish(procs))


@pytest.mark.slow
def test_two_workers_end_with_the_same_weights_masks_and_reset_draws(runs):
    tmp, out, arrays = runs
    assert (out["worker0"]["chief"], out["worker1"]["chief"]) == (True, False)
    assert out["worker0"]["replicas"] == out["worker1"]["replicas"] == 2
    assert out["worker0"]["starts"] == out["worker1"]["starts"]  # the same reset draws
    assert out["worker0"]["losses"] == out["worker1"]["losses"]
    first, other = arrays["worker0"], arrays["worker1"]
    assert sorted(first) == sorted(other) and any(k.startswith("masks/") for k in first)
    for key in first:  # weights, optimizer state and the random WELS masks of generation 2
        np.testing.assert_array_equal(first[key], other[key], err_msg=key)


@pytest.mark.slow
def test_only_the_chief_writes_the_run_directory(runs):
    tmp, _, _ = runs
    chief = tmp / "worker0"
    assert (chief / "results.csv").is_file() and (chief / "checkpoints" / "last").is_dir()
    assert (chief / "export" / "dense").is_dir() and (chief / "tensorboard").is_dir()
    assert not (tmp / "worker1").exists()  # the other worker wrote nothing at all


@pytest.mark.slow
def test_two_workers_train_what_one_process_trains_on_the_same_global_batch(runs, one_process):
    tmp, workers, worker_arrays = runs
    out, arrays = dict(workers, **one_process[0]), dict(worker_arrays, **one_process[1])
    # One process splitting the same global batch over two devices (MirroredStrategy, Keras's
    # fit): the same numbers to the last bit (measured: max |difference| 0.0), results.csv too.
    assert results(tmp / "worker0") == results(tmp / "two_devices")
    for key, value in arrays["two_devices"].items():
        np.testing.assert_array_equal(arrays["worker0"][key], value, err_msg=key)
    # One device, the whole batch at once: the same math in another summation order (BatchNorm
    # statistics summed over the replicas vs one fused kernel). The first two epochs agree to
    # float32 rounding (measured 9e-8 relative on Intel AVX-512 with oneDNN, 1.8e-6 on AMD AVX2
    # without it: Eigen's kernels sum in another order); later ones drift apart on these
    # 4-channel networks as on two devices (tests/test_distribute.py).
    one = out["one_device"]["losses"]
    assert len(one) == len(out["worker0"]["losses"]) == 6
    np.testing.assert_allclose(out["worker0"]["losses"][:2], one[:2], rtol=1e-5)
    assert [(r["generation"], r["net"]) for r in results(tmp / "worker0")] == [
        (r["generation"], r["net"]) for r in results(tmp / "one_device")]


@pytest.mark.slow
def test_a_killed_worker_and_the_same_command_again_resume_the_run(runs, tmp_path):
    """Worker 1 is killed mid-epoch in generation 2; worker 0, the chief, then fails (exit 1)
    within seconds; the same command on both resumes from the chief's last checkpoint, in the
    one run directory they share, and ends where the uninterrupted run ended."""
    reference, _, _ = runs
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ke_tf.main", "--strategy=multi_worker",
               f"--run_dir={run_dir}"] + FLAGS
    ports = free_ports(2)
    # 2 batches an epoch: the 9th is the first of generation 2's second epoch
    (chief_rc, _, chief_err), (killed_rc, _, _) = finish(
        start_workers([command, command], ports, faults={1: "kill:batch:9"}))
    assert killed_rc == -signal.SIGKILL
    assert chief_rc == 1, chief_err[-3000:]
    assert "another worker of the cluster stopped" in chief_err and "Traceback" not in chief_err
    with open(run_dir / "checkpoints" / "last" / "state.json") as f:
        state = json.load(f)
    assert (state["generation"], state["epoch"]) == (2, 1)  # the chief's last checkpoint
    assert not (run_dir / "export").exists()

    again = finish(start_workers([command, command], ports))
    for returncode, _, stderr in again:
        assert returncode == 0, stderr[-3000:]
    assert "(written by the chief)" in again[1][1]
    rows = results(run_dir)
    assert rows == results(reference / "worker0")  # --deterministic: to the last digit
    assert [(r["generation"], r["net"]) for r in rows] == [("1", "dense"), ("2", "dense")]
    with open(run_dir / "masks.npz", "rb") as mine, \
            open(reference / "worker0" / "masks.npz", "rb") as theirs:
        assert mine.read() == theirs.read()  # generation 2's random masks, restored
    assert (run_dir / "export" / "dense").is_dir()


@pytest.mark.slow
def test_a_missing_or_bad_tf_config_exits_2_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    for value in (None, '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", '
                        '"index": 3}}'):
        env = environment({} if value is None else {"TF_CONFIG": value})
        proc = subprocess.run([sys.executable, "-m", "ke_tf.main", "--strategy=multi_worker",
                               f"--run_dir={run_dir}"] + FLAGS, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "TF_CONFIG" in proc.stderr and "Traceback" not in proc.stderr
        assert not run_dir.exists()


@pytest.mark.slow
def test_a_batch_the_replicas_cannot_share_exits_2_on_every_worker(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ke_tf.main", "--strategy=multi_worker",
               f"--run_dir={run_dir}"] + FLAGS + ["--batch_size=25"]
    for returncode, _, stderr in finish(start_workers([command, command], free_ports(2))):
        assert returncode == 2, stderr[-2000:]
        assert "--batch_size must divide by the 2 replicas" in stderr
        assert "Traceback" not in stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_benchmark_details_time_two_local_workers_against_one_process():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--quick",
                           "--details", "--only=multi_worker", "--json"], capture_output=True,
                          text=True, timeout=2 * TIMEOUT, cwd=ROOT, env=environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("two_workers_step_ms", "one_process_step_ms", "two_workers_vs_one_process"):
        assert isinstance(result[key], float) and 0 < result[key] < float("inf"), key
