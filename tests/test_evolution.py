"""`ke_tf.evolve`: Knowledge Evolution for the user's own functional Keras model and data, and
`--arch=keras:NAME` for any keras.applications constructor."""
import csv
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import ke_tf
from ke_tf import checkpoint, config as C
from ke_tf.hooks import Hook


def small_cnn(classes=4, side=16):
    """A hand-written functional CNN with named layers (a resumed run rebuilds the same)."""
    i = keras.Input((side, side, 3), name="images")
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(i)
    h = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(h))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="c2")(h)
    h = keras.layers.ReLU(name="r2")(keras.layers.BatchNormalization(name="b2")(h))
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(i, keras.layers.Dense(classes, name="fc")(h), name="small_cnn")


def in_memory(n=64, classes=4, side=16, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype("int64")
    x = (rng.normal(size=(n, side, side, 3)) + y[:, None, None, None] * 0.5).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    test = tf.data.Dataset.from_tensor_slices((x[: n // 2], y[: n // 2])).batch(16)
    return train, test


TINY = dict(generations=2, epochs=2, warmup_epochs=1, lr=0.05, split_rate=0.5, verbose=False)


def test_evolve_a_users_model_on_in_memory_data(tmp_path):
    model = small_cnn()
    train, test = in_memory()
    result = ke_tf.evolve(model, train, test=test, run_dir=str(tmp_path / "run"), **TINY)
    assert [(r["generation"], r["net"]) for r in result.rows] == [
        (g, n) for g in (1, 2) for n in ("dense", "slim", "slim_recal")]
    assert all(0 <= r["test_top1"] <= 100 and np.isfinite(r["train_loss"]) for r in result.rows)
    assert result.dense is model  # trained in place
    assert result.slim.count_params() < model.count_params()
    # The slim network is the dense one with its reset hypothesis zeroed (as extracted: the
    # slim_recal one has re-estimated statistics, so compare the "slim" net).
    x = np.random.default_rng(3).normal(size=(5, 16, 16, 3)).astype("float32")
    slim = result.runner.nets["slim"]
    zeroed = conftest.zero_reset(model, result.runner.masks)
    np.testing.assert_allclose(slim(x, training=False).numpy(),
                               zeroed(x, training=False).numpy(), atol=1e-4)
    # the run directory is the command line's, with the network's architecture for export
    run_dir = tmp_path / "run"
    for name in ("results.csv", "config.json", "masks.npz", checkpoint.NETWORK_JSON):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "export" / "slim" / "saved_model.pb").is_file()
    loaded = checkpoint.load_networks(str(run_dir))  # rebuilt from network.json, no data
    np.testing.assert_allclose(loaded.nets["dense"](x, training=False).numpy(),
                               model(x, training=False).numpy(), atol=1e-5)


def test_evolve_without_run_dir_leaves_nothing_and_a_sequential_model_works():
    model = keras.Sequential([keras.Input((16, 16, 3)),
                              keras.layers.Conv2D(8, 3, name="conv"),
                              keras.layers.GlobalAveragePooling2D(name="gap"),
                              keras.layers.Dense(4, name="fc")])
    train, test = in_memory()
    result = ke_tf.evolve(model, train, test=test, method="long", **TINY)
    assert result.run_dir is None and not os.path.exists(result.runner.config.run_dir)
    assert [(r["generation"], r["method"]) for r in result.rows][0] == (1, "long")
    assert result.runner.epochs == 4  # long: one generation of 2 x 2 epochs


def test_evolve_a_folder_dataset(tmp_path):
    root = conftest.image_folder(tmp_path / "imgs")
    result = ke_tf.evolve(small_cnn(classes=3), str(root), run_dir=str(tmp_path / "run"),
                          batch_size=6, recal_images=12, **TINY)
    assert {r["net"] for r in result.rows} == {"dense", "slim", "slim_recal"}
    assert result.runner.data.info.class_names == ("cat", "dog", "owl")


class Crash(Hook):
    """Stops the run right after generation 1 was evaluated and checkpointed."""

    def generation_end(self, run, state, evaluation):
        if state.generation == 1:
            raise KeyboardInterrupt


def test_evolve_resumes_a_run_dir(tmp_path):
    train, test = in_memory()
    flags = dict(TINY, deterministic=True, seed=4)

    def model():  # the user's initial weights: the same in both runs
        keras.utils.set_random_seed(0)
        return small_cnn()

    whole = ke_tf.evolve(model(), train, test=test, run_dir=str(tmp_path / "a"), **flags)
    with pytest.raises(KeyboardInterrupt):
        ke_tf.evolve(model(), train, test=test, run_dir=str(tmp_path / "b"), hooks=[Crash()],
                     **flags)
    # a fresh model in its initial state: the checkpoint puts generation 1's weights back
    resumed = ke_tf.evolve(model(), train, test=test, run_dir=str(tmp_path / "b"), **flags)

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_seconds(resumed.rows) == without_seconds(whole.rows)
    assert len(resumed.rows) == 6


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(4)

    def call(self, x):
        return self.fc(keras.ops.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("model, message", [
    (Subclassed(), "Subclassed is not a functional keras.Model"),
    (keras.Sequential([keras.layers.Dense(4)]), "has no known input: start it with keras.Input"),
    (keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                       keras.layers.Dense(4, activation="softmax", name="probs")]),
     "output layer 'probs' applies softmax"),
])
def test_evolve_says_what_a_model_needs(model, message):
    train, _ = in_memory()
    with pytest.raises(C.ConfigError, match=message):
        ke_tf.evolve(model, train, **TINY)


def test_evolve_refuses_what_it_cannot_take():
    train, _ = in_memory()
    with pytest.raises(C.ConfigError, match="cskd needs ke_tf's anchor/partner batches"):
        ke_tf.evolve(small_cnn(), train, regularizer="cskd", **TINY)
    with pytest.raises(C.ConfigError, match="batched tf.data.Dataset"):
        ke_tf.evolve(small_cnn(), np.zeros((4, 16, 16, 3)), **TINY)
    with pytest.raises(C.ConfigError, match="--split_rate"):
        ke_tf.evolve(small_cnn(), train, **dict(TINY, split_rate=1.5))


def test_keras_applications_networks_split_and_slim():
    from ke_tf import masks, networks, slim

    net = networks.build("keras:MobileNetV2", 10, 32)
    assert net.output.shape[-1] == 10 and net.get_layer("fc") is net.layers[-1]
    m = masks.compute(net, "kels", 0.5)
    conftest.randomize_batchnorm_and_biases(net)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(slim.extract(net, m)(x, training=False).numpy(),
                               conftest.zero_reset(net, m)(x, training=False).numpy(), atol=1e-4)
    with pytest.raises(C.ConfigError, match="has no constructor 'ResNet9'"):
        networks.build("keras:ResNet9", 10, 32)


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "ke_tf.main"] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_keras_mobilenetv2_through_the_command_line(tmp_path, capsys):
    """--arch=keras:MobileNetV2 through the command line and `python -m ke_tf.export` (both run
    in this process, `conftest.cli_in_process`), on 2 training digits a class, one generation
    (two generations of every keras.applications family: tests/test_application_families.py)."""
    from ke_tf import export

    run_dir = tmp_path / "run"
    code, _, err = conftest.ke_main_in_process(
        ["--arch=keras:MobileNetV2", "--generations=1", "--epochs=1", "--warmup_epochs=0",
         "--batch_size=20", "--digits_per_class=2", "--recal_images=20", "--quiet",
         f"--run_dir={run_dir}"], capsys)
    assert code == 0, err[-2000:]
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["net"] for r in rows] == ["dense", "slim", "slim_recal"]
    assert int(rows[1]["params"]) < int(rows[0]["params"])
    assert (run_dir / "export" / "slim" / "saved_model.pb").is_file()
    code, _, err = conftest.cli_in_process(export.run, [str(run_dir), "--format=keras",
                                                        "--net=slim"], capsys)
    assert code == 0, err[-2000:]
    assert (run_dir / "export" / "slim.keras").is_file()


def test_a_layer_the_graph_cannot_follow_is_refused_naming_it():
    i = keras.Input((16, 16, 3))
    x = keras.layers.Conv2DTranspose(4, 3, name="deconv")(i)
    model = keras.Model(i, keras.layers.Dense(4, name="fc")(keras.layers.Flatten()(x)))
    train, _ = in_memory()
    with pytest.raises(C.ConfigError, match=r"Layer 'deconv' of type Conv2DTranspose is not "
                       r"supported .* ke_tf.graph.register_layer"):
        ke_tf.evolve(model, train, **TINY)


@pytest.mark.parametrize("split_mode", ["kels", "wels"])
def test_evolve_a_vision_transformer(split_mode, tmp_path):
    """Attention heads and the MLP's hidden width split (KELS; the residual stream, the
    patch embedding and the head stay whole), any kernel (WELS), through two generations."""
    model = conftest.small_vit()
    train, test = in_memory()
    result = ke_tf.evolve(model, train, test=test, split_mode=split_mode,
                          run_dir=str(tmp_path / "run"), **TINY)
    nets = ("dense", "slim", "slim_recal") if split_mode == "kels" else ("dense",)
    assert [r["net"] for r in result.rows] == list(nets) * 2
    assert all(np.isfinite(r["train_loss"]) for r in result.rows)
    if split_mode == "kels":
        assert result.slim.get_layer("attention1").get_config()["num_heads"] == 2
        assert result.rows[1]["params"] < 0.7 * result.rows[0]["params"]
    loaded = checkpoint.load_networks(str(tmp_path / "run"))  # rebuilt from network.json
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.nets["dense"](x, training=False).numpy(),
                               model(x, training=False).numpy(), atol=1e-5)
