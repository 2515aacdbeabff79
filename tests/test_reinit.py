"""Re-initialization between generations, Eq. 1: W = M*W + (1-M)*W_r."""
import keras
import numpy as np
import pytest

from ke_tf import masks, reinit

L = keras.layers


def he(seed=None):
    return keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal", seed=seed)


def net():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(32, 3, use_bias=False, kernel_initializer=he(), name="conv1")(i)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))
    x = L.DepthwiseConv2D(3, depthwise_initializer=he(), name="dw")(x)
    x = L.Conv2D(64, 3, use_bias=False, kernel_initializer=he(), name="conv2")(x)
    x = L.GlobalAveragePooling2D()(L.BatchNormalization(name="bn2")(x))
    x = L.Dense(48, kernel_initializer=he(), bias_initializer="ones", name="fc6")(x)
    return keras.Model(i, L.Dense(10, kernel_initializer=he(), name="fc")(x))


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def test_keras_initializers_repeat_values():
    """The trap this module exists for: calling an initializer again does not re-draw."""
    for init in (he(), he(seed=1), keras.initializers.GlorotUniform()):
        np.testing.assert_array_equal(np.asarray(init((4, 4))), np.asarray(init((4, 4))))


def test_reset_changes_exactly_the_reset_hypothesis():
    model = net()
    for v in model.weights:  # non-trivial fit values everywhere, BN included
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype("float32") + 3.0)
    m = masks.compute(model, "kels", 0.5)
    before = snapshot(model)
    reinit.reset(model, m, seed=(0, 1))
    after = snapshot(model)
    for path, value in before.items():
        if path not in m:  # BatchNorm: bit-for-bit
            np.testing.assert_array_equal(after[path], value, err_msg=path)
            continue
        fit = m[path]
        np.testing.assert_array_equal(after[path][fit], value[fit], err_msg=path)
        if (~fit).any() and not path.endswith("bias"):
            assert (after[path][~fit] != value[~fit]).all(), path
    np.testing.assert_array_equal(after["fc/bias"], before["fc/bias"])  # output bias all fit
    # A hidden bias is re-drawn from its own initializer ("ones" here).
    np.testing.assert_array_equal(after["fc6/bias"][~m["fc6/bias"]], 1.0)


def test_fresh_every_generation_and_reproducible_per_seed():
    model = net()
    m = masks.compute(model, "kels", 0.5)
    g1, g2 = reinit.fresh_values(model, m, (7, 1)), reinit.fresh_values(model, m, (7, 2))
    again = reinit.fresh_values(model, m, (7, 1))
    other_run = reinit.fresh_values(model, m, (8, 1))
    for path in ("conv1/kernel", "dw/kernel", "conv2/kernel", "fc/kernel"):
        assert not np.array_equal(g1[path], g2[path])
        assert not np.array_equal(g1[path], other_run[path])
        np.testing.assert_array_equal(g1[path], again[path])
        assert g1[path].shape == tuple(model.get_layer(path.split("/")[0]).weights[0].shape)


def test_layer_draws_follow_the_layers_initializer():
    model = net()
    m = masks.compute(model, "kels", 0.5)
    w = reinit.fresh_values(model, m, (0, 3))["conv2/kernel"]
    fan_in = 3 * 3 * 32
    assert abs(w.std() / np.sqrt(2.0 / fan_in) - 1) < 0.05
    assert np.abs(w).max() > 2 * np.sqrt(2.0 / fan_in)  # untruncated, like the initializer


def test_torch_default_bounds():
    model = net()
    m = masks.compute(model, "kels", 0.5)
    v = reinit.fresh_values(model, m, (0, 1), reset_init="torch_default")
    for path, fan_in in [("conv1/kernel", 27), ("dw/kernel", 9), ("conv2/kernel", 288),
                         ("fc6/kernel", 64), ("fc6/bias", 64), ("fc/kernel", 48)]:
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(v[path]).max() <= bound and np.abs(v[path]).max() > 0.9 * bound, path
        assert v[path].dtype == np.float32


def test_wels_reset():
    model = net()
    m = masks.compute(model, "wels", 0.7, seed=2)
    before = snapshot(model)
    reinit.reset(model, m, seed=(0, 1))
    after = snapshot(model)
    k = "conv2/kernel"
    np.testing.assert_array_equal(after[k][m[k]], before[k][m[k]])
    assert (after[k][~m[k]] != before[k][~m[k]]).all()


def test_errors():
    model = net()
    m = masks.compute(model, "kels", 0.5)
    with pytest.raises(ValueError, match="reset_init"):
        reinit.fresh_values(model, m, 0, reset_init="zeros")
    with pytest.raises(ValueError, match="not_there"):
        reinit.apply(model, {"not_there/kernel": np.ones(3, bool)}, {})
