"""Shared test set-up: quiet TensorFlow, small helpers for graphs with random statistics."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests train 4-8-channel networks, the regime where TensorFlow 2.21's oneDNN CPU kernels can
# corrupt the heap (an abort on odd batch sizes; docs/performance.md, the oneDNN crash). Real
# widths are unaffected and the tiny nets run as fast without oneDNN; subprocesses started by
# tests inherit this.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


# The test files that take longest (`--durations=0` summed per file, 2 cores), started first and
# in this order, so that pytest-xdist's workers end together instead of one finishing a long file
# alone (pytest.ini: --no-loadscope-reorder keeps the order given here).
LONGEST_FIRST = ("test_resume.py", "test_application_families.py", "test_multi_worker.py",
                 "test_main.py", "test_generations.py", "test_applications.py",
                 "test_selection.py", "test_adacos_training.py", "test_bans.py", "test_damage.py",
                 "test_benchmark.py", "test_methods.py", "test_evolution.py",
                 "test_distribute.py", "test_export.py", "test_onednn_crash.py",
                 "test_networks.py", "test_readme.py", "test_data.py", "test_slim.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order kept


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts Python processes (the CLI, tools, killed and resumed runs) or "
        "trains through whole generations for more than about 5 s; `pytest -m 'not slow' tests` "
        "leaves them out while developing (and on CI's newest and oldest Python legs, beside one "
        "real default run), CI's pinned leg runs them all")


def randomize_batchnorm_and_biases(model, seed=0):
    """Non-trivial BatchNorm statistics and biases, so equivalence tests can fail."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for v in layer.weights:
            if isinstance(layer, keras.layers.BatchNormalization):
                positive = v.name in ("gamma", "moving_variance")
                vals = rng.uniform(0.5, 1.5, v.shape) if positive else rng.normal(0, 0.5, v.shape)
            elif v.name == "bias":
                vals = rng.normal(0, 0.1, v.shape)
            else:
                continue
            v.assign(vals.astype(v.dtype))


def zero_reset(model, masks):
    """A copy of `model` whose reset hypothesis is zero (the reference for slim extraction)."""
    z = keras.models.clone_model(model)
    z.set_weights(model.get_weights())
    for original, v in zip(model.weights, z.weights):  # a clone's paths may lose name scopes
        if original.path in masks:
            v.assign(np.where(masks[original.path], v.numpy(), 0).astype(v.dtype))
    return z


def tiny_config(run_dir, *, data=None, model=None, split=None, train=None, **run):
    """The tests' tiny run: a 1/16-wide ResNet18 on 40 digits (4 per class) at 16 px, KELS with
    s = 0.5, 2 generations of 1 epoch with the digits preset's optimizer settings. `data`,
    `model`, `split`, `train` (dicts) override fields of those parts, `run` of the RunConfig; a
    key of `split` or `train` that is no field of its part is a method's flag (`method_flags`,
    e.g. train=dict(repr_s1=2))."""
    import dataclasses

    from ke_tf import config as C, presets

    method_flags = dict(run.pop("method_flags", {}))

    def part(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        method_flags.update({k: v for k, v in values.items() if k not in names})
        return cls(**{k: v for k, v in values.items() if k in names})

    return C.RunConfig(
        data=C.DataConfig(**{"dataset": "digits", "image_size": 16, "batch_size": 16,
                             "digits_per_class": 4, "recal_images": 32, **(data or {})}),
        model=C.ModelConfig(**{"arch": "resnet18", "width_multiplier": 1 / 16, **(model or {})}),
        split=part(C.SplitConfig, {"split_rate": 0.5, **(split or {})}),
        train=part(C.TrainConfig, {"generations": 2, "epochs": 1, "warmup_epochs": 0,
                                   **{k: presets.DIGITS[k] for k in ("lr", "weight_decay",
                                                                     "regularizer")},
                                   **(train or {})}),
        run_dir=str(run_dir), method_flags=method_flags, **run)


def image_folder(root, classes=("cat", "dog", "owl"), sizes=(("train", 6), ("test", 3))):
    """A `folder:` dataset of random 20x24 PNGs, root/<split>/<class>/<i>.png; returns root."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for split, n in sizes:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    return root


def cli_in_process(entry, args, capsys):
    """A command line run in this process (no second TensorFlow start: seconds saved per run):
    `entry(argv)` is the program's `run` (e.g. `ke_tf.export.run`) or, for `python -m
    ke_tf.main`, `ke_tf.main.run`. Returns (exit status, stdout,
    stderr); absl's flags are reset before and after. What only a real process shows (the
    native start-up noise filtered, the console script) is tested with subprocesses."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(SystemExit) as exited:
            entry(["prog"] + list(args))
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr()
    return exited.value.code or 0, out.out, out.err


def ke_main_in_process(args, capsys):
    """`python -m ke_tf.main ARGS` in this process (`cli_in_process`)."""
    from ke_tf import main

    return cli_in_process(main.run, args, capsys)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def small_vit(classes=4, side=16, patch=4, dim=16, heads=4, blocks=2):
    """A small vision transformer from Keras layers: patch embedding (a strided Conv2D),
    learned position embeddings (`PositionEmbedding`, registered with ke_tf.graph as
    per-channel), pre-norm blocks of MultiHeadAttention and a GELU MLP with residual Adds, a
    final LayerNormalization, average pooling over the tokens and a Dense head."""
    from ke_tf import graph

    graph.register_layer(PositionEmbedding, graph.PER_CHANNEL)
    L = keras.layers
    i = keras.Input((side, side, 3), name="images")
    x = L.Conv2D(dim, patch, strides=patch, name="patches")(i)
    x = PositionEmbedding(name="positions")(L.Reshape(((side // patch) ** 2, dim),
                                                      name="tokens")(x))
    for b in range(blocks):
        h = L.LayerNormalization(name=f"ln_a{b}")(x)
        h = L.MultiHeadAttention(heads, dim // heads, name=f"attention{b}")(h, h)
        x = L.Add(name=f"residual_a{b}")([x, h])
        h = L.Dense(2 * dim, name=f"mlp_in{b}")(L.LayerNormalization(name=f"ln_m{b}")(x))
        h = L.Dense(dim, name=f"mlp_out{b}")(L.Activation("gelu", name=f"gelu{b}")(h))
        x = L.Add(name=f"residual_m{b}")([x, h])
    x = L.GlobalAveragePooling1D(name="pool")(L.LayerNormalization(name="ln_out")(x))
    return keras.Model(i, L.Dense(classes, name="head")(x), name="small_vit")


@keras.saving.register_keras_serializable(package="ke_tf_tests")
class PositionEmbedding(keras.layers.Layer):
    """A learned embedding added to every token (tokens x channels)."""

    def build(self, shape):
        self.embedding = self.add_weight(shape=tuple(shape[1:]), name="embedding",
                                         initializer=keras.initializers.RandomNormal(0, 0.02))

    def call(self, x):
        return x + self.embedding


# keras.applications at their smallest input (75 px for the Inceptions, Xception's minimum is
# 71; the others take 32), 4 classes, logits; the smallest member of each family (Keras
# 3.12-3.15: 40 constructors in 14 families, by name pattern).
APPLICATION_SIDE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 75}
APPLICATION_FAMILIES = {
    "ConvNeXt": "ConvNeXtTiny", "DenseNet": "DenseNet121", "EfficientNetV2": "EfficientNetV2B0",
    "EfficientNet": "EfficientNetB0", "InceptionResNetV2": "InceptionResNetV2",
    "InceptionV3": "InceptionV3", "MobileNetV3": "MobileNetV3Small", "MobileNetV2": "MobileNetV2",
    "MobileNet": "MobileNet", "NASNet": "NASNetMobile", "ResNet\\d+V2": "ResNet50V2",
    "ResNet": "ResNet50", "VGG": "VGG16", "Xception": "Xception"}


def keras_application(name, classes=4):
    side = APPLICATION_SIDE.get(name, 32)
    return getattr(keras.applications, name)(weights=None, classes=classes,
                                             input_shape=(side, side, 3),
                                             classifier_activation=None)


def application_family(name):
    import re

    return next(f for f in APPLICATION_FAMILIES if re.match(f, name))


def assert_slim_equals_dense_without_reset(model, m, small=None):
    """KELS's slim network of `model` (`small`, or extracted here) computes what `model`
    computes with its reset hypothesis zeroed (zeroed in place), up to a relative 1e-5, and has
    under 60% of its parameters."""
    from ke_tf import slim

    small = small or slim.extract(model, m)
    assert small.count_params() < 0.6 * model.count_params()
    for v in model.weights:
        if v.path in m:
            v.assign(np.where(m[v.path], v.numpy(), 0).astype(v.dtype))
    x = np.random.default_rng(0).normal(size=(2,) + tuple(model.input.shape[1:]))
    want = model(x.astype("float32"), training=False).numpy()
    got = small(x.astype("float32"), training=False).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
