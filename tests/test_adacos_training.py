"""--loss=adacos (AdaCos, Zhang et al., CVPR 2019) through the whole KE loop: the cosine
classifier (`networks.layers.CosineDense`), the loss with its adaptive scale
(`losses.AdaCosLoss`), KELS masks and slim extraction of the cosine head, the scale restarted
every generation and checkpointed, and end-to-end runs (digits, a folder, other methods, the
command line, a killed and resumed run). The scale rule itself is tested in test_adacos.py."""
import csv
import json
import math
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from ke_tf import checkpoint, losses, masks, networks, slim, tasks
from ke_tf import config as C
from ke_tf.generations import GenerationRunner
from ke_tf.hooks import Hook
from ke_tf.networks.layers import CosineDense

ADACOS = dict(loss="adacos", regularizer="none")


def _cosine_net(num_classes=5):
    return networks.build("resnet18", num_classes, 16, width_multiplier=1 / 16,
                          classifier="cosine")


def _features(model, x):
    """The classifier's input features (global average pool) of `model` for images `x`."""
    fc = model.get_layer("fc")
    return keras.Model(model.input, fc.input)(x).numpy()


def _normalize(a, axis):
    return a / np.linalg.norm(a, axis=axis, keepdims=True)


def _cross_entropy(logits, labels):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


# --- the cosine classifier -------------------------------------------------------------------

def test_cosine_classifier_outputs_the_cosines():
    model = _cosine_net()
    conftest.randomize_batchnorm_and_biases(model)
    fc = model.get_layer("fc")
    assert isinstance(fc, CosineDense) and isinstance(fc, keras.layers.Dense)
    assert [v.path for v in fc.weights] == ["fc/kernel"]  # no bias
    x = tf.random.stateless_normal((6, 16, 16, 3), seed=(1, 2))
    out = model(x).numpy()
    expected = _normalize(_features(model, x), 1) @ _normalize(fc.kernel.numpy(), 0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.abs(out).max() <= 1.0 + 1e-6
    # from its config (slim extraction, .keras files) it is the same layer
    again = keras.Model.from_config(model.get_config())
    again.set_weights(model.get_weights())
    assert isinstance(again.get_layer("fc"), CosineDense)
    np.testing.assert_allclose(again(x).numpy(), out, atol=1e-6)
    with pytest.raises(ValueError, match="classifier"):
        networks.build("resnet18", None, 16, head="embedding", classifier="cosine")


def test_cosine_classifier_is_float32_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _cosine_net()
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("fc").compute_dtype == "float32"
    out = model(tf.random.stateless_normal((2, 16, 16, 3), seed=(3, 4)))
    assert out.dtype == tf.float32 and np.abs(out.numpy()).max() <= 1.0 + 1e-6


def test_kels_masks_the_cosine_classifiers_input_rows_and_slim_extraction():
    model = _cosine_net()
    m = masks.compute(model, "kels", 0.5)
    fit_features = m["layer4_1_conv2/kernel"].any(axis=(0, 1, 2))  # the last block's filters
    np.testing.assert_array_equal(m["fc/kernel"], np.outer(fit_features, np.ones(5, bool)))
    assert 0 < fit_features.sum() < len(fit_features)
    x = tf.random.stateless_normal((4, 16, 16, 3), seed=(5, 6))
    small = slim.extract(model, m)
    assert isinstance(small.get_layer("fc"), CosineDense)
    assert small.get_layer("fc").kernel.shape == (fit_features.sum(), 5)
    # Fresh BatchNorm: the reset features of the zero-reset network are 0, the outputs equal.
    np.testing.assert_allclose(small(x).numpy(), conftest.zero_reset(model, m)(x).numpy(),
                               atol=1e-4)
    # Trained BatchNorm makes the reset features nonzero: |x| then also counts them, and the
    # two agree up to a positive factor |x_fit| / |x| per image (the same ranking).
    conftest.randomize_batchnorm_and_biases(model)
    small, zeroed = slim.extract(model, m), conftest.zero_reset(model, m)
    features = _features(zeroed, x)
    np.testing.assert_allclose(_features(small, x), features[:, fit_features], atol=1e-4)
    factor = (np.linalg.norm(features[:, fit_features], axis=1)
              / np.linalg.norm(features, axis=1))[:, None]
    np.testing.assert_allclose(small(x).numpy() * factor, zeroed(x).numpy(), atol=1e-4)
    np.testing.assert_array_equal(np.argsort(small(x).numpy(), 1),
                                  np.argsort(zeroed(x).numpy(), 1))


# --- the loss ------------------------------------------------------------------------------

def test_loss_is_adacos_logits_then_cross_entropy_and_keeps_the_new_scale(rng):
    features = rng.normal(size=(8, 6)).astype(np.float32)
    weights = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 2])
    cos = _normalize(features, 1) @ _normalize(weights, 0)
    loss = losses.AdaCosLoss(4)
    assert float(loss.scale.numpy()) == pytest.approx(math.sqrt(2) * math.log(3))
    assert not loss.scale.trainable and loss.variables == [loss.scale]
    scale = losses.adacos_initial_scale(4)
    for _ in range(2):  # the second call starts from the scale the first one kept
        logits, new_scale = losses.adacos_logits(features, weights, labels, scale)
        value = loss(labels, cos)
        assert value.dtype == tf.float32
        assert float(value) == pytest.approx(_cross_entropy(logits.numpy(), labels), rel=1e-5)
        assert float(loss.scale.numpy()) == pytest.approx(float(new_scale), rel=1e-6)
        scale = new_scale
    loss.restart()
    assert float(loss.scale.numpy()) == pytest.approx(losses.adacos_initial_scale(4))
    smooth = losses.AdaCosLoss(4, label_smoothing=0.1)
    logits, _ = losses.adacos_logits(features, weights, labels, losses.adacos_initial_scale(4))
    expected = losses.sparse_cross_entropy(labels, logits, 0.1)
    assert float(smooth(labels, cos)) == pytest.approx(float(expected), rel=1e-5)
    again = losses.AdaCosLoss.from_config(smooth.get_config())
    assert (again.num_classes, again.label_smoothing) == (4, 0.1)


def test_loss_inside_a_compiled_function_with_a_gradient(rng):
    cos = tf.Variable(np.tanh(rng.normal(size=(5, 3))).astype(np.float32))
    labels = tf.constant([0, 1, 2, 0, 1])
    loss = losses.AdaCosLoss(3)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            value = loss(labels, cos)
        return value, tape.gradient(value, cos)

    _, grad = step()
    expected = losses.adacos_scale(cos, labels, losses.adacos_initial_scale(3))
    assert float(loss.scale.numpy()) == pytest.approx(float(expected), rel=1e-5)
    assert np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).max() > 0


def test_task_picks_adacos_and_refuses_two_classes():
    cfg = C.RunConfig(train=C.TrainConfig(loss="adacos", regularizer="smooth"))
    loss = tasks.CLASSIFICATION.make_loss(cfg, 10)
    assert isinstance(loss, losses.AdaCosLoss) and loss.label_smoothing == 0.1
    assert isinstance(tasks.CLASSIFICATION.make_loss(C.RunConfig(), 10),
                      losses.SparseCrossEntropy)
    with pytest.raises(C.ConfigError, match="at least 3 classes"):
        tasks.CLASSIFICATION.make_loss(cfg, 2)


# --- the runner ----------------------------------------------------------------------------

class ScaleLog(Hook):
    """The AdaCos scale at every generation start and epoch end: [(point, g, epoch, s)]."""

    def __init__(self):
        self.log = []

    def generation_start(self, run, state):
        self.log.append(("start", state.generation, state.epoch, float(run.loss.scale.numpy())))

    def epoch_end(self, run, state):
        self.log.append(("epoch", state.generation, state.epoch, float(run.loss.scale.numpy())))


def _rows_are_finite(rows, generations=(1, 2)):
    assert [(r["generation"], r["net"]) for r in rows] == [
        (g, n) for g in generations for n in ("dense", "slim", "slim_recal")]
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0 <= r["test_top1"] <= 100


@pytest.fixture(scope="module")
def adacos_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adacos")
    hook = ScaleLog()
    cfg = conftest.tiny_config(run_dir, train=dict(ADACOS, epochs=2))
    runner = GenerationRunner(cfg, verbose=False, hooks=[hook])
    rows = runner.run()
    return runner, rows, hook.log, str(run_dir)


@pytest.mark.slow
def test_digits_run_restarts_the_scale_every_generation(adacos_run):
    runner, rows, log, _ = adacos_run
    _rows_are_finite(rows)
    initial = math.sqrt(2) * math.log(9)
    starts = [entry for entry in log if entry[0] == "start"]
    assert [(g, e) for _, g, e, _ in starts] == [(1, 0), (2, 0)]
    assert all(s == pytest.approx(initial) for *_, s in starts)
    epochs = [s for point, *_, s in log if point == "epoch"]
    assert len(epochs) == 4 and all(np.isfinite(s) and abs(s - initial) > 1e-3 for s in epochs)
    assert isinstance(runner.network.get_layer("fc"), CosineDense)


def test_checkpoint_holds_the_scale_and_export_serves_the_cosines(adacos_run):
    runner, _, log, run_dir = adacos_run
    _, arrays = checkpoint.load(checkpoint.last_dir(run_dir))
    assert list(arrays["loss"]) == ["adacos_scale"]
    assert float(arrays["loss"]["adacos_scale"]) == pytest.approx(log[-1][-1])
    x = next(iter(runner.data.test))[0]
    served = tf.saved_model.load(os.path.join(run_dir, "export", "dense"))
    out = served.signatures["serving_default"](images=x)["logits"].numpy()
    np.testing.assert_allclose(out, runner.nets["dense"](x).numpy(), atol=1e-5)
    assert np.abs(out).max() <= 1.0 + 1e-6
    loaded = checkpoint.load_networks(run_dir)  # export of a kept generation rebuilds it
    assert isinstance(loaded.nets["dense"].get_layer("fc"), CosineDense)
    np.testing.assert_allclose(loaded.nets["slim"](x).numpy(),
                               runner.nets["slim_recal"](x).numpy(), atol=1e-5)


def test_cross_entropy_runs_keep_their_checkpoint_files(tmp_path):
    runner = GenerationRunner(conftest.tiny_config(tmp_path), verbose=False)
    assert "loss" not in runner.arrays()


@pytest.mark.slow
def test_folder_dataset_run(tmp_path):
    conftest.image_folder(tmp_path / "imgs")
    cfg = conftest.tiny_config(
        tmp_path / "run", data=dict(dataset=f"folder:{tmp_path / 'imgs'}", batch_size=6,
                                    recal_images=12), train=ADACOS, export=False)
    rows = GenerationRunner(cfg, verbose=False).run()
    _rows_are_finite(rows)
    assert [r["test_top5"] for r in rows] == [100.0] * 6  # top-3 of 3 classes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["long", "dsd"])
def test_other_methods_train_with_adacos(tmp_path, method):
    cfg = conftest.tiny_config(tmp_path, train=ADACOS, method=method, export=False)
    runner = GenerationRunner(cfg, verbose=False)
    rows = runner.run()
    assert rows and all(np.isfinite(r["train_loss"]) for r in rows)
    assert {r["method"] for r in rows} == {method}
    assert isinstance(runner.network.get_layer("fc"), CosineDense)


# --- the command line ----------------------------------------------------------------------

TINY = ["--image_size=16", "--width_multiplier=0.0625", "--batch_size=20",
        "--digits_per_class=4", "--deterministic", "--quiet", "--loss=adacos",
        "--regularizer=none", "--generations=2", "--epochs=2", "--warmup_epochs=1"]


def _main(run_dir, flags, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "KE_TF_FAULT"}
    if fault:
        env["KE_TF_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "ke_tf.main", f"--run_dir={run_dir}"] + flags,
                          capture_output=True, text=True, env=env, timeout=300)


def _results(run_dir):
    with open(os.path.join(run_dir, "results.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("cli"))
    proc = _main(run_dir, TINY)
    return run_dir, proc


@pytest.mark.slow
def test_command_line_run(cli_run):
    run_dir, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    rows = _results(run_dir)
    assert [(r["generation"], r["net"]) for r in rows] == [
        (str(g), n) for g in (1, 2) for n in ("dense", "slim", "slim_recal")]
    assert all(np.isfinite(float(r["test_top1"])) for r in rows)
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["loss"] == "adacos"


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(cli_run, tmp_path):
    """SIGKILL in the middle of generation 1's second epoch; the same command, killed again in
    generation 2 (just after its first epoch's checkpoint: the fault counts this process's
    epochs); the same command once more ends with the uninterrupted run's results.csv, which
    it reaches only if the last resume went on from the checkpointed scale (a trained one, not
    sqrt(2) ln 9 again: generation 2's second epoch would then train other logits)."""
    reference, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    run_dir = str(tmp_path / "run")
    for fault, where in (("kill:batch:3", [1, 1]), ("kill:epoch:2", [2, 1])):
        killed = _main(run_dir, TINY, fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        with open(os.path.join(run_dir, "checkpoints", "last", "state.json")) as f:
            state = json.load(f)
        assert [state["generation"], state["epoch"]] == where, fault
    _, arrays = checkpoint.load(checkpoint.last_dir(run_dir))
    assert float(arrays["loss"]["adacos_scale"]) != pytest.approx(losses.adacos_initial_scale(10))
    resumed = _main(run_dir, TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert _results(run_dir) == _results(reference)
