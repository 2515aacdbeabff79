"""Each private Keras/TensorFlow API ke_tf uses (`ke_tf.internals`) still works on the pinned
versions: an upgrade that moves one fails here, by name, before it breaks a run."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from ke_tf import internals


def small_graph():
    x = keras.Input((4,))
    shared = keras.layers.Dense(3, name="shared")
    y = keras.layers.Dense(2, name="head")(shared(shared(keras.layers.Dense(3)(x))))
    return keras.Model(x, y)


def test_is_functional():
    x = keras.Input((4,))
    assert internals.is_functional(keras.Model(x, keras.layers.Dense(2)(x)))
    # a Sequential is a class of its own (graph.functional turns it into a functional model)
    assert not internals.is_functional(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))

    class Sub(keras.Model):
        def call(self, x):
            return x

    assert not internals.is_functional(Sub())


def test_call_count_and_producer():
    model = small_graph()
    assert internals.call_count(model.get_layer("shared")) == 2
    assert internals.call_count(model.get_layer("head")) == 1
    assert internals.producer(model.outputs[0]) is model.get_layer("head")
    calls = internals.node_tensors(model.get_layer("shared"))  # (inputs, outputs) per call
    assert len(calls) == 2 and all(len(ins) == 1 and len(outs) == 1 for ins, outs in calls)
    assert calls[0][1][0] is not calls[1][1][0]


def test_sgd_momentums_are_the_buffers_in_variable_order():
    assert internals.sgd_momentums(keras.optimizers.SGD(0.1, momentum=0.9)) == []  # not built
    v = [keras.Variable(np.ones((2, 3), "float32")), keras.Variable(np.ones(4, "float32"))]
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.apply([tf.ones((2, 3)), 2 * tf.ones(4)], v)
    momentums = internals.sgd_momentums(opt)
    assert [tuple(m.shape) for m in momentums] == [(2, 3), (4,)]
    np.testing.assert_allclose(momentums[1].numpy(), -0.2 * np.ones(4), rtol=1e-6)
    assert internals.sgd_momentums(keras.optimizers.SGD(0.1)) == []  # no momentum: none


def test_onednn_enabled_follows_the_environment():
    # tests/conftest.py turns oneDNN off (TF_ENABLE_ONEDNN_OPTS=0) before TensorFlow starts
    assert internals.onednn_enabled() is False


def test_xplane_space_parses_a_profiler_trace(tmp_path):
    import glob

    tf.profiler.experimental.start(str(tmp_path))
    tf.reduce_sum(tf.ones((8, 8)) @ tf.ones((8, 8))).numpy()
    tf.profiler.experimental.stop()
    (path,) = glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)
    with open(path, "rb") as f:
        space = internals.xplane_space(f.read())
    assert "/host:CPU" in [plane.name for plane in space.planes]


def test_a_missing_private_api_is_named(monkeypatch):
    class NoNodes:
        pass

    with pytest.raises(internals.PrivateAPIError, match="Layer._inbound_nodes.*private API"):
        internals.call_count(NoNodes())
