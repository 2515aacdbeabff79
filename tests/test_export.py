"""Exporting a run's networks: the CLI (SavedModel, TFLite, .keras), safe loading, and docs/guide.md's
serving example, against a tiny trained digits run."""
import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from ke_tf import checkpoint, export
from ke_tf.generations import GenerationRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/guide.md's serving example loads this run directory, relative to the current directory.
RUN_NAME = os.path.join("runs", "digits-resnet18-ke-smooth-s0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-generation KELS run (its export/dense and export/slim written by the run)."""
    root = tmp_path_factory.mktemp("serve")
    run_dir = root / RUN_NAME
    cfg = conftest.tiny_config(run_dir, seed=3)
    runner = GenerationRunner(cfg, verbose=False)
    runner.run()
    x = next(iter(runner.data.test))[0].numpy()[:8]
    return types.SimpleNamespace(root=root, run_dir=str(run_dir), runner=runner, x=x)


@pytest.fixture
def load_networks(trained):
    """The run wrote checkpoints (one per generation): the export CLI rebuilds from them."""
    assert checkpoint.kept_generations(trained.run_dir) == [1, 2]
    return checkpoint.load_networks


def run_cli(args, capsys):
    """`python -m ke_tf.export ARGS` in this process: (exit status, stdout, stderr)."""
    return conftest.cli_in_process(export.run, args, capsys)


def reported(stdout, path):
    """The size the CLI printed for `path`."""
    match = re.fullmatch(rf"{re.escape(path)}: (\d+) bytes\n", stdout)
    assert match, stdout
    return int(match.group(1))


@pytest.mark.slow
def test_tflite_slim_matches_keras(trained, load_networks, capsys):
    code, out, err = run_cli([trained.run_dir, "--format=tflite", "--net=slim"], capsys)
    assert code == 0, err
    path = os.path.join(trained.run_dir, "export", "slim.tflite")
    assert reported(out, path) == os.path.getsize(path) > 1000
    interpreter = tf.lite.Interpreter(model_path=path)
    serve = interpreter.get_signature_runner("serving_default")
    logits = serve(images=trained.x)["logits"]
    assert logits.shape == (len(trained.x), 10)
    keras_slim = load_networks(trained.run_dir).nets["slim"]
    np.testing.assert_allclose(logits, keras_slim(trained.x, training=False).numpy(), atol=1e-4)
    # ... which is the BatchNorm-recalibrated slim network the run evaluated last.
    evaluated = trained.runner.nets["slim_recal"](trained.x, training=False).numpy()
    np.testing.assert_allclose(logits, evaluated, atol=1e-4)
    with open(os.path.join(trained.run_dir, "export", export.CLASS_NAMES)) as f:
        assert f.read() == "".join(f"{c}\n" for c in range(10))
    assert not [n for n in os.listdir(os.path.join(trained.run_dir, "export")) if n.startswith(".")]


def test_keras_file_of_the_dense_network(trained, load_networks, capsys):
    code, out, err = run_cli([trained.run_dir, "--format=keras", "--net=dense"], capsys)
    assert code == 0, err
    path = os.path.join(trained.run_dir, "export", "dense.keras")
    assert reported(out, path) == os.path.getsize(path)
    model = export.load_keras(path)
    reference = load_networks(trained.run_dir).nets["dense"]
    np.testing.assert_allclose(model(trained.x, training=False).numpy(),
                               reference(trained.x, training=False).numpy(), atol=1e-5)


def test_saved_model_of_a_kept_generation(trained, load_networks, capsys):
    code, out, err = run_cli([trained.run_dir, "--net=dense", "--format=saved_model",
                              "--generation=1"], capsys)
    assert code == 0, err
    path = os.path.join(trained.run_dir, "export", "dense-g001")
    assert reported(out, path) == export.size_of(path) > 1000
    serve = tf.saved_model.load(path).signatures["serving_default"]
    logits = serve(images=tf.constant(trained.x))["logits"].numpy()
    reference = load_networks(trained.run_dir, 1).nets["dense"]
    np.testing.assert_allclose(logits, reference(trained.x, training=False).numpy(), atol=1e-5)


def test_a_net_the_run_does_not_have_exits_2(trained, monkeypatch, capsys):
    dense_only = types.SimpleNamespace(nets={"dense": trained.runner.network}, generation=1,
                                       class_names=("a",), output_name="logits", config=None)
    monkeypatch.setattr(checkpoint, "load_networks", lambda run_dir, generation=None: dense_only)
    code, _, err = run_cli([trained.run_dir, "--net=slim"], capsys)
    assert code == 2 and "--net=slim" in err and "Traceback" not in err


class _Scaled(keras.layers.Layer):
    """Multiplies by a value read from a lookup table: a TensorFlow resource, not a variable."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant([0, 1], tf.int64), tf.constant([0.5, 2.0])), default_value=0.0)

    def call(self, x):
        return x * self.table.lookup(tf.constant(1, tf.int64))


def test_saved_model_of_a_network_reading_a_lookup_table(tmp_path):
    """Variables alone are saved with the serving function; a network that also reads a lookup
    table is written through Keras's ExportArchive, which finds the table in its layer."""
    i = keras.Input((4, 4, 3))
    model = keras.Model(i, keras.layers.Dense(2)(keras.layers.Flatten()(_Scaled()(i))))
    path = export.save_saved_model(model, str(tmp_path / "net"))
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    served = tf.saved_model.load(path).signatures["serving_default"](images=x)["logits"]
    np.testing.assert_allclose(served.numpy(), model(x).numpy(), rtol=1e-6)
    assert os.listdir(tmp_path) == ["net"]  # the first attempt left nothing behind


def test_safe_mode_refuses_a_lambda_layer(tmp_path):
    """Loading a saved model never executes code from the file."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0, name="code")(inputs))
    path = export.save_keras(model, str(tmp_path / "lambda.keras"))
    with pytest.raises(ValueError, match="safe_mode"):
        export.load_keras(path)
    # The file itself is fine: only the safe mode refuses it.
    unsafe = keras.saving.load_model(path, safe_mode=False)
    np.testing.assert_allclose(unsafe(np.ones((1, 4), np.float32)).numpy(), 2.0)


def cli_subprocess(args, cwd):
    return subprocess.run([sys.executable, "-m", "ke_tf.export"] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,named", [
    ([], "RUN_DIR"),
    (["no/such/run"], "no/such/run"),
    (["empty"], "empty"),  # a directory without a run or checkpoint
    (["empty", "--format=onnx"], "format"),
])
def test_bad_usage_exits_2(tmp_path, args, named, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert named in err and "Traceback" not in err
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.slow
def test_cli_process_with_checkpoints(trained):
    proc = cli_subprocess([trained.run_dir, "--format=tflite", "--net=dense"], cwd=trained.root)
    assert proc.returncode == 0, proc.stderr
    path = os.path.join(trained.run_dir, "export", "dense.tflite")
    assert proc.stdout == f"{path}: {os.path.getsize(path)} bytes\n"


def guide_serving_example():
    with open(os.path.join(ROOT, "docs", "guide.md")) as f:
        guide = f.read()
    section = guide.split("## Serving the slim network\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```py\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_guide_serving_example(trained, load_networks, tmp_path):
    """docs/guide.md's example, verbatim, on an image file of a digit."""
    export.export_run(trained.run_dir, "saved_model", "slim")  # what the guide's command runs
    from sklearn.datasets import load_digits

    digit = load_digits().images[-1] / 16.0 * 255.0  # a test image (not among the 40 trained)
    image = tf.image.resize(digit[:, :, None], [16, 16])
    image = tf.image.grayscale_to_rgb(tf.cast(tf.round(image), tf.uint8))
    (trained.root / "digit.png").write_bytes(tf.io.encode_png(image).numpy())
    script = tmp_path / "serve.py"
    script.write_text(guide_serving_example())
    proc = subprocess.run([sys.executable, str(script), "digit.png"], cwd=trained.root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5, proc.stdout
    names = [line.split()[0] for line in lines]
    assert len(set(names)) == 5 and set(names) <= {str(c) for c in range(10)}
    probabilities = [float(line.split()[1]) for line in lines]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
