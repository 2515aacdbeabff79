"""Knowledge Evolution on every keras.applications constructor of the pinned Keras: KELS masks
from the graph, and the slim network equal to the dense one with its reset hypothesis zeroed
(random BatchNorm statistics, relative difference <= 1e-5); two families the graph code learned
last also train two generations through `ke_tf.evolve` and export (ConvNeXt: nested models,
LayerNormalization, depthwise-grouped convs; MobileNetV3: keras.ops between layers)."""
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import ke_tf
from ke_tf import masks, slim

CONSTRUCTORS = sorted(name for name, f in inspect.getmembers(keras.applications, inspect.isfunction)
                      if name[0].isupper())
SIDE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 75}  # their smallest: 75 and
# 71 px; the others take 32


def build(name, classes=4):
    side = SIDE.get(name, 32)
    return getattr(keras.applications, name)(weights=None, classes=classes,
                                             input_shape=(side, side, 3),
                                             classifier_activation=None)


FAMILIES = ("ConvNeXt", "DenseNet", "EfficientNetV2", "EfficientNet", "InceptionResNetV2",
            "InceptionV3", "MobileNetV3", "MobileNetV2", "MobileNet", "NASNet", "ResNet\\d+V2",
            "ResNet", "VGG", "Xception")


def test_the_sweep_covers_every_family():
    import re

    found = {next(f for f in FAMILIES if re.match(f, name)) for name in CONSTRUCTORS}
    assert len(CONSTRUCTORS) >= 40 and found == set(FAMILIES)  # Keras 3.12-3.15: 40, 14


@pytest.mark.slow
@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_every_constructor_splits_and_slims_exactly(name):
    model = build(name)
    m = masks.compute(model, "kels", 0.5)
    conftest.randomize_batchnorm_and_biases(model)
    small = slim.extract(model, m)
    assert small.count_params() < 0.6 * model.count_params()
    for v in model.weights:  # the dense network with its reset hypothesis zeroed, in place
        if v.path in m:
            v.assign(np.where(m[v.path], v.numpy(), 0).astype(v.dtype))
    x = np.random.default_rng(0).normal(size=(2,) + tuple(model.input.shape[1:]))
    want = model(x.astype("float32"), training=False).numpy()
    got = small(x.astype("float32"), training=False).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ConvNeXtTiny", "MobileNetV3Small"])
def test_new_families_evolve_and_export(name, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 32, 32, 3)).astype("float32"), np.arange(16) % 4
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    run_dir = str(tmp_path / "run")
    result = ke_tf.evolve(build(name), train, test=train, generations=2, epochs=1,
                          warmup_epochs=0, lr=0.01, split_rate=0.5, run_dir=run_dir,
                          verbose=False)
    assert [r["net"] for r in result.rows] == ["dense", "slim", "slim_recal"] * 2
    assert all(np.isfinite(r["train_loss"]) for r in result.rows)
    served = tf.saved_model.load(str(tmp_path / "run" / "export" / "slim"))
    logits = served.signatures["serving_default"](images=x[:3])["logits"].numpy()
    np.testing.assert_allclose(logits, result.slim(x[:3], training=False).numpy(), atol=1e-4)


def test_export_command_rebuilds_a_network_with_dropout_and_a_nested_sequential(tmp_path):
    """`python -m ke_tf.export` rebuilds an evolved network from network.json in a new process,
    which names some variables otherwise: Keras numbers the random state of a Dropout anew
    (seed_generator_N), and a nested Sequential built when first called ("stem/conv/kernel",
    as ConvNeXt's stem) is built unprefixed when deserialized. The checkpoint and its masks
    still fit (`checkpoint.renaming`): the exports compute what the run returned."""
    from ke_tf import checkpoint, export

    i = keras.Input((8, 8, 3))
    stem = keras.Sequential([keras.layers.Conv2D(8, 3, name="conv"),
                             keras.layers.BatchNormalization(name="bn")], name="stem")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="conv2")(stem(i)))
    model = keras.Model(i, keras.layers.Dense(4, name="fc")(keras.layers.Dropout(0.2)(x)))
    assert "stem/conv/kernel" in [v.path for v in model.variables]
    x, y = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32"), np.arange(8) % 4
    run_dir = str(tmp_path / "run")
    result = ke_tf.evolve(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
                          generations=1, epochs=1, warmup_epochs=0, split_rate=0.5,
                          run_dir=run_dir, export=False, verbose=False)
    rebuilt = checkpoint._network_of(run_dir)
    assert "stem/conv/kernel" not in [v.path for v in rebuilt.variables]  # what is renamed
    _, saved = checkpoint.load(checkpoint.generation_dir(run_dir, 1))
    import re

    renumbered = {re.sub(r"seed_generator(_\d+)?/", "seed_generator_999/", k): v
                  for k, v in saved["dense"].items()}  # as another process numbers it
    assert set(renumbered) != set(saved["dense"])
    checkpoint.assign(model.variables, renumbered, "dense network")
    for net in ("dense", "slim"):
        path = export.export_run(run_dir, "keras", net)
        np.testing.assert_allclose(export.load_keras(path)(x, training=False).numpy(),
                                   getattr(result, net)(x, training=False).numpy(), atol=1e-5)
