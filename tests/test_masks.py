"""KELS/WELS masks from the functional graph (paper sec. 3.2, Alg. 1, appendix B)."""
import keras
import numpy as np
import pytest

from ke_tf import graph, masks

L = keras.layers


def toy():
    """conv -> bn -> relu, a 1x1 branch, Add, Concatenate, depthwise, separable, flatten, 2 dense."""
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 3, padding="same", name="c1")(i)
    a = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(a))
    b = L.Conv2D(4, 1, name="c2")(i)
    x = L.Add(name="add")([a, b])
    c = L.Concatenate(name="cat")([x, L.Conv2D(2, 1, name="c3")(a)])
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(c)
    d = L.SeparableConv2D(4, 3, name="sep")(d)
    f = L.Flatten(name="flat")(d)
    f = L.Dense(6, name="fc6")(f)
    o = L.Dense(3, name="fc")(f)
    return keras.Model(i, o)


def test_kels_follows_channels_through_the_graph():
    m = masks.compute(toy(), "kels", 0.5)
    # First conv: all 3 image channels, first ceil(0.5*4)=2 filters (Alg. 1 line 6).
    np.testing.assert_array_equal(m["c1/kernel"][0, 0], [[1, 1, 0, 0]] * 3)
    np.testing.assert_array_equal(m["c1/bias"], [1, 1, 0, 0])
    # c3 reads c1's fit channels only; keeps ceil(0.5*2)=1 filter.
    np.testing.assert_array_equal(m["c3/kernel"][0, 0], [[1, 0], [1, 0], [0, 0], [0, 0]])
    # Concatenate offsets each input's fit set (appendix B, Fig. 10): [1100] ++ [10].
    cat = np.array([1, 1, 0, 0, 1, 0], bool)
    np.testing.assert_array_equal(m["dw/kernel"][1, 1, :, 0], cat)
    # Depthwise output channel c*2+j follows input channel c; separable pointwise reads those.
    dw_out = np.repeat(cat, 2)
    np.testing.assert_array_equal(m["dw/bias"], dw_out)
    np.testing.assert_array_equal(m["sep/pointwise_kernel"][0, 0], np.outer(dw_out, [1, 1, 0, 0]))
    # Flatten of 4x4x4: feature i is fit iff (i mod 4) in {0, 1}.
    flat_fit = (np.arange(4 * 4 * 4) % 4) < 2
    np.testing.assert_array_equal(m["fc6/kernel"], np.outer(flat_fit, [1, 1, 1, 0, 0, 0]))
    # Output layer keeps all outputs, bias all fit (Alg. 1 line 13, sec. 3.1).
    np.testing.assert_array_equal(m["fc/kernel"], np.outer([1, 1, 1, 0, 0, 0], [1, 1, 1]))
    np.testing.assert_array_equal(m["fc/bias"], [1, 1, 1])
    assert not any(k.startswith("bn1/") for k in m), "BatchNorm is never masked"


def test_masks_have_variable_shapes_and_paths():
    model = toy()
    m = masks.compute(model, "kels", 0.8)
    kernels = {v.path: tuple(v.shape) for v in model.weights if "bn1" not in v.path}
    assert {k: v.shape for k, v in m.items()} == kernels
    assert all(v.dtype == bool for v in m.values())


@pytest.mark.parametrize("n,s,kept", [(10, 0.7, 7), (5, 0.5, 3), (64, 0.8, 52), (3, 0.1, 1), (7, 1.0, 7)])
def test_kept_channels_is_ceil_without_float_noise(n, s, kept):
    assert masks.kept_channels(n, s) == kept


def test_split_rate_one_keeps_everything():
    m = masks.compute(toy(), "kels", 1.0)
    assert all(v.all() for v in m.values())


def test_wels_is_seeded_random_with_rate_s():
    model = toy()
    a, b = masks.compute(model, "wels", 0.7, seed=3), masks.compute(model, "wels", 0.7, seed=3)
    c = masks.compute(model, "wels", 0.7, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    per_generation = masks.compute(model, "wels", 0.7, seed=(3, 1))  # WELS-Rand re-draws
    assert not np.array_equal(per_generation["c1/kernel"], masks.compute(model, "wels", 0.7, seed=(3, 2))["c1/kernel"])
    kernels = np.concatenate([v.ravel() for k, v in a.items() if not k.endswith("bias")])
    assert abs(kernels.mean() - 0.7) < 0.03
    assert all(v.all() for k, v in a.items() if k.endswith("bias"))


def test_mobilenet_style_output_conv_keeps_all_outputs():
    i = keras.Input((4, 4, 3))
    x = L.Conv2D(8, 3, name="c1")(i)
    x = L.GlobalAveragePooling2D(keepdims=True)(x)
    x = L.Conv2D(5, 1, name="logits_conv")(x)
    x = L.Reshape((5,), name="reshape")(x)
    o = L.Activation("softmax", name="pred")(x)
    m = masks.compute(keras.Model(i, o), "kels", 0.5)
    np.testing.assert_array_equal(m["logits_conv/kernel"][0, 0], np.outer([1] * 4 + [0] * 4, [1] * 5))
    assert m["logits_conv/bias"].all()


def test_embedding_head_keeps_all_outputs():
    i = keras.Input((4, 4, 3))
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, name="c1")(i))
    o = L.UnitNormalization(name="l2")(L.Dense(6, name="embedding")(x))
    m = masks.compute(keras.Model(i, o), "kels", 0.5)
    np.testing.assert_array_equal(m["embedding/kernel"], np.outer([1] * 4 + [0] * 4, [1] * 6))


def test_unsupported_layer_is_named():
    i = keras.Input((4, 4, 3))
    x = L.Conv2DTranspose(4, 3, name="deconv")(i)
    o = L.Dense(2, name="fc")(L.Flatten()(x))
    with pytest.raises(graph.UnsupportedLayerError, match="deconv"):
        masks.compute(keras.Model(i, o), "kels", 0.5)


def test_a_merge_gives_its_free_branch_the_set_of_the_decided_one():
    """Add(concatenation, conv): the concatenation's fit set is decided by its inputs' offsets,
    [1, 0, 1, 0]; the conv's filters are free, so it keeps that set instead of its first half
    (NASNet, InceptionResNetV2 merge such branches), and the slim network stays exact."""
    i = keras.Input((4, 4, 3))
    a = L.Conv2D(2, 1, name="a")(i)
    cat = L.Concatenate(name="cat")([a, a])
    b = L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="b")(i))
    o = L.Dense(2, name="fc")(L.Flatten()(L.Add(name="add")([cat, b])))
    m = masks.compute(keras.Model(i, o), "kels", 0.5)
    np.testing.assert_array_equal(m["b/kernel"][0, 0, 0], [1, 0, 1, 0])


def test_add_of_two_decided_different_sets_is_refused():
    i = keras.Input((4, 4, 3))
    a = L.Conv2D(2, 1, name="a")(i)
    cat = L.Concatenate(name="cat")([a, a])  # [1, 0, 1, 0]
    c = L.Concatenate(name="cat2")([L.Conv2D(3, 1, name="c3")(i), L.Conv2D(1, 1, name="c1")(i)])
    o = L.Dense(2, name="fc")(L.Flatten()(L.Add(name="bad_add")([cat, c])))  # [1, 1, 0, 1]
    with pytest.raises(graph.UnsupportedLayerError, match="'bad_add' .* no choice of filters"):
        masks.compute(keras.Model(i, o), "kels", 0.5)


def test_save_load_roundtrip(tmp_path):
    m = masks.compute(toy(), "wels", 0.5, seed=1)
    path = str(tmp_path / "masks.npz")
    masks.save(path, m)
    back = masks.load(path)
    assert back.keys() == m.keys() and all(np.array_equal(back[k], m[k]) for k in m)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.npz"]  # no temporary left behind


def test_bad_arguments():
    with pytest.raises(ValueError, match="split_rate"):
        masks.compute(toy(), "kels", 0.0)
    with pytest.raises(ValueError, match="mode"):
        masks.compute(toy(), "filters", 0.5)
