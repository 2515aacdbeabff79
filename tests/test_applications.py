"""Knowledge Evolution on every keras.applications constructor of the pinned Keras: KELS masks
from the graph, and the slim network equal to the dense one with its reset hypothesis zeroed
(random BatchNorm statistics, relative difference <= 1e-5). The smallest member of each family
is checked on a trained network instead: tests/test_application_families.py."""
import inspect
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import ke_tf
from ke_tf import masks

CONSTRUCTORS = sorted(name for name, f in inspect.getmembers(keras.applications, inspect.isfunction)
                      if name[0].isupper())
FAMILIES = conftest.APPLICATION_FAMILIES


def test_the_sweep_covers_every_family():
    family = conftest.application_family
    assert len(CONSTRUCTORS) >= 40 and {family(n) for n in CONSTRUCTORS} == set(FAMILIES)
    assert all(family(smallest) == f for f, smallest in FAMILIES.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CONSTRUCTORS) - set(FAMILIES.values())))
def test_every_constructor_splits_and_slims_exactly(name):
    model = conftest.keras_application(name)
    m = masks.compute(model, "kels", 0.5)
    conftest.randomize_batchnorm_and_biases(model)
    conftest.assert_slim_equals_dense_without_reset(model, m)


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
    renumbered = {re.sub(r"seed_generator(_\d+)?/", "seed_generator_999/", k): v
                  for k, v in saved["dense"].items()}  # as another process numbers it
    assert set(renumbered) != set(saved["dense"])
    checkpoint.assign(model.variables, renumbered, "dense network")
    for net in ("dense", "slim"):
        path = export.export_run(run_dir, "keras", net)
        np.testing.assert_allclose(export.load_keras(path)(x, training=False).numpy(),
                                   getattr(result, net)(x, training=False).numpy(), atol=1e-5)


@pytest.mark.slow
def test_applications_tool_tabulates_a_check(tmp_path):
    """tools/applications.py (the table of docs/guide.md, "Your own model"), its check only."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "applications.py"),
                           "--models=MobileNet", "--notrain", f"--out={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| MobileNet |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["yes", "3,232,964", "831,588"] and float(cells[5]) <= 1e-5
    assert (tmp_path / "MobileNet.json").exists()
