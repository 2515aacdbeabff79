"""Born-Again Networks (--method=bans): the distilled train step, the teacher handed over and the
student born again between generations, whole runs, the command line and resuming."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import conftest
from ke_tf import config as C, rules
from ke_tf import reinit
from ke_tf.generations import GenerationRunner
from ke_tf.hooks import Hook, Hooks
from ke_tf.methods import bans
from ke_tf.state import RunState


def runner(tmp_path, hooks=(), **train):
    cfg = conftest.tiny_config(tmp_path, method="bans", train=dict(generations=3, **train),
                               export=False)
    return GenerationRunner(cfg, verbose=False, hooks=hooks)


def snapshot(net):
    return {v.path: v.numpy().copy() for v in net.weights}


class WeightAtStart(Hook):
    """The distillation weight as every generation starts training."""

    def __init__(self):
        self.weights = []

    def generation_start(self, run, state):
        self.weights.append(float(run.method.distillation_weight.numpy()))


def small_network():
    import keras

    i = keras.Input((6, 6, 3))
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(
        keras.layers.Conv2D(4, 3, name="conv")(i))
    return keras.Model(i, keras.layers.Dense(4, name="fc")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_train_step_with_a_teacher_is_ce_plus_lambda_t2_kl(label_smoothing):
    import keras
    import tensorflow as tf

    from ke_tf import losses
    from ke_tf.model import KEModel

    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    net, teacher = small_network(), small_network()
    conftest.randomize_batchnorm_and_biases(teacher, seed=1)  # inference mode uses these
    teacher.trainable = False
    teacher_before = snapshot(teacher)
    ref = keras.models.clone_model(net)
    ref.set_weights(net.get_weights())
    T, lam = 2.0, 0.7
    weight = tf.Variable(lam, trainable=False)
    model = KEModel(net, weight_decay=0.0, teacher=(teacher, T, weight))
    assert len(model.trainable_variables) == len(net.trainable_variables)
    assert len(model.variables) == len(net.variables)  # the teacher is not a part of it
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=losses.SparseCrossEntropy(label_smoothing))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    t = teacher(x, training=False).numpy().astype("float64") / T  # frozen, inference mode
    p_t = np.exp(t - t.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    with tf.GradientTape() as tape:
        s = ref(x, training=True)
        ce = losses.sparse_cross_entropy(y, s, label_smoothing)
        log_p_s = tf.nn.log_softmax(tf.cast(s, tf.float64) / T)
        kl = tf.reduce_mean(tf.reduce_sum(p_t * (np.log(p_t) - log_p_s), axis=1))
        loss = ce + tf.cast(lam * T**2 * kl, tf.float32)
    for v, g in zip(ref.trainable_variables, tape.gradient(loss, ref.trainable_variables)):
        v.assign(v - 0.1 * g)
    for a, b in zip(net.weights, ref.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    for path, value in snapshot(teacher).items():  # no gradient, no BatchNorm update
        np.testing.assert_array_equal(value, teacher_before[path], err_msg=path)


def test_zero_weight_trains_exactly_as_without_a_teacher():
    import keras
    import tensorflow as tf

    from ke_tf import losses
    from ke_tf.model import KEModel

    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    nets = [small_network() for _ in range(2)]
    nets[1].set_weights(nets[0].get_weights())
    models = [KEModel(nets[0], weight_decay=1e-3),
              KEModel(nets[1], weight_decay=1e-3,
                      teacher=(small_network(), 1.0, tf.Variable(0.0, trainable=False)))]
    for m in models:
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=losses.SparseCrossEntropy())
        m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(*(n.weights for n in nets)):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_between_generations_hands_over_the_weights_and_the_student_is_born_again(tmp_path):
    r = runner(tmp_path, bans_lambda=0.5)
    assert r.method.distillation_weight.numpy() == 0.0  # generation 1: plain training
    initial = snapshot(r.network)
    r.train(RunState(generation=1), Hooks([]))
    trained = snapshot(r.network)
    masks = r.masks
    r.between_generations(1)
    assert r.masks is masks and masks == {}
    for path, value in snapshot(r.method.teacher_network).items():  # exactly the trained N_1
        np.testing.assert_array_equal(value, trained[path], err_msg=path)
    after = snapshot(r.network)
    fresh = reinit.fresh_values(r.network, bans.all_reset(r.network), seed=(r.config.seed, 1))
    assert {p for p in after if p.endswith(("kernel", "bias"))} == set(fresh)
    for path, value in fresh.items():  # from the layer's own initializer, seed (run seed, 1)
        np.testing.assert_array_equal(after[path], value, err_msg=path)
        assert not np.array_equal(after[path], trained[path]), path
        if path.endswith("kernel"):
            assert (after[path] != trained[path]).all(), path
            assert not np.array_equal(after[path], initial[path]), path  # a fresh seed
    bn = [p for p in after if p.split("/")[-1] in ("gamma", "beta", "moving_mean",
                                                    "moving_variance")]
    assert bn and len(bn) + len(fresh) == len(after)
    for path in bn:
        expected = 1.0 if path.endswith(("gamma", "moving_variance")) else 0.0
        np.testing.assert_array_equal(after[path], np.full_like(after[path], expected))
        assert not np.array_equal(trained[path], after[path]), path
    assert r.method.distillation_weight.numpy() == 0.5

    r.between_generations(2)  # a new seed again; the teacher is the network of generation 2
    np.testing.assert_array_equal(r.method.teacher_network.get_layer("conv1").kernel.numpy(),
                                  after["conv1/kernel"])
    assert not np.array_equal(r.network.get_layer("conv1").kernel.numpy(), after["conv1/kernel"])


def test_arrays_restore_the_teacher_and_the_weight(tmp_path):
    r = runner(tmp_path / "a")
    r.network.get_layer("conv1").kernel.assign(
        np.random.default_rng(0).normal(size=r.network.get_layer("conv1").kernel.shape).astype("float32"))
    r.between_generations(1)
    arrays = r.method.arrays(r)
    other = runner(tmp_path / "b")
    other.method.restore(other, arrays)
    for path, value in snapshot(r.method.teacher_network).items():
        np.testing.assert_array_equal(snapshot(other.method.teacher_network)[path], value)
    assert other.method.distillation_weight.numpy() == 1.0
    with pytest.raises(C.ConfigError, match="no Born-Again teacher"):
        other.method.restore(other, {})


@pytest.mark.slow
def test_three_generations_on_digits_rows_of_the_dense_network(tmp_path):
    weights = WeightAtStart()
    rows = runner(tmp_path / "bans", hooks=[weights], bans_lambda=0.5, bans_temperature=2.0).run()
    assert [(row["generation"], row["net"], row["method"]) for row in rows] == [
        (g, "dense", "bans") for g in (1, 2, 3)]
    assert all(row["split_mode"] == "" and row["split_rate"] == "" for row in rows)
    assert all(np.isfinite(row["train_loss"]) and 0 <= row["test_top1"] <= 100 for row in rows)
    assert weights.weights == [0.0, 0.5, 0.5]
    with open(tmp_path / "bans" / "results.csv") as f:
        assert [(r["generation"], r["net"]) for r in csv.DictReader(f)] == [
            (str(g), "dense") for g in (1, 2, 3)]
    # generation 1 is plain training: the dense network of KE's first generation, to the bit
    ke = GenerationRunner(conftest.tiny_config(tmp_path / "ke", train=dict(generations=1),
                                               export=False), verbose=False).run()
    for column in ("train_loss", "train_top1", "test_top1", "test_top5", "params", "macs"):
        assert rows[0][column] == ke[0][column], column


@pytest.mark.slow
def test_folder_dataset(tmp_path):
    conftest.image_folder(tmp_path / "imgs")
    cfg = conftest.tiny_config(
        tmp_path / "run", data=dict(dataset=f"folder:{tmp_path / 'imgs'}", batch_size=6,
                                    recal_images=12),
        train=dict(generations=2, regularizer="none"), method="bans", export=False)
    rows = GenerationRunner(cfg, verbose=False).run()
    assert [(row["generation"], row["net"]) for row in rows] == [(1, "dense"), (2, "dense")]
    assert [row["test_top5"] for row in rows] == [100.0] * 2  # top-3 of 3 classes


def test_flags_bans_refuses():
    rules.check(C.RunConfig(method="bans"))
    rules.check(C.RunConfig(method="bans", train=C.TrainConfig(regularizer="cskd")))
    with pytest.raises(C.ConfigError, match="--method bans distills"):
        rules.check(C.RunConfig(method="bans", data=C.DataConfig(task="metric", batch_size=125),
                                model=C.ModelConfig(head="embedding")))
    with pytest.raises(C.ConfigError, match="--loss must be ce with --method=bans"):
        rules.check(C.RunConfig(method="bans", train=C.TrainConfig(loss="adacos")))
    with pytest.raises(C.ConfigError, match="--evolve_mode"):
        rules.check(C.RunConfig(method="bans", split=C.SplitConfig(evolve_mode="zero")))


# --- processes: the command line, killed and resumed ----------------------------------------------

TINY = ["--method=bans", "--image_size=16", "--width_multiplier=0.0625", "--generations=2",
        "--epochs=3", "--batch_size=20", "--digits_per_class=4", "--deterministic", "--quiet",
        "--noexport"]


def ke_main(run_dir, flags, fault=None):
    env = dict(os.environ)
    env.pop("KE_TF_FAULT", None)
    if fault:
        env["KE_TF_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "ke_tf.main", f"--run_dir={run_dir}"] + flags,
                          capture_output=True, text=True, env=env, timeout=600)


def results(run_dir):
    with open(os.path.join(run_dir, "results.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("bans_reference")
    proc = ke_main(run_dir, TINY)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.slow
def test_killed_in_generation_2_resumes_to_the_uninterrupted_result(reference, tmp_path):
    """kill:evaluated:1 at the boundary, before the student was born again (resuming hands over
    the restored network of generation 1); the same command then killed after generation 2's
    first epoch was checkpointed (kill:epoch:1, this process's first epoch: the teacher and the
    weight come back from checkpoints/last); the same command once more ends as the
    uninterrupted run."""
    for fault in ("kill:evaluated:1", "kill:epoch:1"):
        killed = ke_main(tmp_path / "run", TINY, fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert len(results(tmp_path / "run")) == 1
        with open(tmp_path / "run" / "checkpoints" / "last" / "state.json") as f:
            state = json.load(f)
        assert (state["generation"], state["epoch"], state["evaluated"]) == (
            (1, 3, True) if fault == "kill:evaluated:1" else (2, 1, False)), fault
    resumed = ke_main(tmp_path / "run", TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert results(tmp_path / "run") == results(reference)
    assert [r["generation"] for r in results(tmp_path / "run")] == ["1", "2"]
