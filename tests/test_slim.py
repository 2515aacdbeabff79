"""Slim extraction: the fit hypothesis as its own network (sec. 3.2, Table 6).

Invariant: in inference mode, slim(x) equals the dense network with its reset hypothesis zeroed,
max abs diff <= 1e-4 * max(1, max |logit|), with random (non-trivial) BatchNorm statistics."""
import keras
import numpy as np
import pytest

from conftest import randomize_batchnorm_and_biases, zero_reset
from ke_tf import cost, masks, networks, slim
from test_masks import toy


def assert_equivalent(model, split_rate=0.5, seed=0):
    randomize_batchnorm_and_biases(model, seed)
    m = masks.compute(model, "kels", split_rate)
    small = slim.extract(model, m)
    x = np.random.default_rng(seed).normal(size=(2,) + tuple(model.input.shape[1:])).astype("float32")
    got = np.asarray(small(x, training=False))
    want = np.asarray(zero_reset(model, m)(x, training=False))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))
    assert small.count_params() < model.count_params() or split_rate == 1.0
    return small, m


@pytest.mark.parametrize("split_rate", [0.5, 0.8, 1.0])
def test_toy_graph(split_rate):
    assert_equivalent(toy(), split_rate)


# keras.applications: every constructor in tests/test_applications.py.


def test_slim_layers_keep_names_and_fit_widths():
    small, _ = assert_equivalent(toy(), 0.5)
    assert small.get_layer("c1").kernel.shape == (3, 3, 3, 2)
    assert small.get_layer("cat").output.shape[-1] == 3  # 2 fit from add + 1 from c3
    assert small.get_layer("dw").kernel.shape == (3, 3, 3, 2)
    assert small.get_layer("fc6").kernel.shape == (4 * 4 * 2, 3)
    assert small.get_layer("fc").kernel.shape == (3, 3)


def test_architecture_has_fresh_weights_of_the_slim_shapes():
    model = toy()
    m = masks.compute(model, "kels", 0.5)
    trained, fresh = slim.extract(model, m), slim.architecture(model, m)
    assert [w.shape for w in trained.weights] == [w.shape for w in fresh.weights]
    assert not np.array_equal(trained.get_layer("c1").kernel.numpy(), fresh.get_layer("c1").kernel.numpy())


def test_wels_masks_are_refused():
    model = toy()
    with pytest.raises(slim.NotKernelLevelError, match="KELS"):
        slim.extract(model, masks.compute(model, "wels", 0.5))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "vgg11_bn", "densenet121",
                                  "densenet169", "googlenet"])
@pytest.mark.parametrize("head", ["logits", "embedding"])
def test_every_architecture(arch, head):
    model = networks.build(arch, 5, 32, head=head, embedding_dim=8, width_multiplier=1 / 16)
    assert_equivalent(model, 0.5)


def test_table6_resnet18_slim_shapes():
    dense = networks.build("resnet18", 102, 224, stem="imagenet")
    small = slim.architecture(dense, masks.compute(dense, "kels", 0.5))
    assert small.get_layer("conv1").kernel.shape == (7, 7, 3, 32)
    assert small.get_layer("bn1").gamma.shape == (32,)
    assert small.get_layer("layer2_0_downsample_conv").kernel.shape == (1, 1, 32, 64)
    assert small.get_layer("layer4_1_conv2").kernel.shape == (3, 3, 256, 256)
    assert small.get_layer("fc").kernel.shape == (256, 102)
    dense_params, dense_macs = cost.total(dense)
    slim_params, slim_macs = cost.total(small)
    assert round(dense_params / 1e6, 1) == 11.2 and round(dense_macs / 1e9, 2) == 1.81
    assert round(slim_params / 1e6, 2) == 2.83 and round(slim_macs / 1e9, 2) == 0.48


def test_a_merge_solved_over_the_graph_stays_exact():
    from test_masks import L

    i = keras.Input((4, 4, 3))
    a = L.Conv2D(2, 1, name="a")(i)
    b = L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="b")(i))
    x = L.Add(name="add")([L.Concatenate(name="cat")([a, a]), b])
    small, m = assert_equivalent(keras.Model(i, L.Dense(2, name="fc")(L.Flatten()(x))))
    assert small.get_layer("b").filters == 2


def test_keras_ops_between_layers_are_followed():
    """MobileNetV3's hard swish, written with keras.ops between layers: x * relu6(x + 3) / 6."""
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(8, 3, name="c1")(i))
    x = x * (L.ReLU(6.0, name="relu6")(x + 3.0) * (1.0 / 6.0))
    gate = L.Conv2D(8, 1, name="gate")(L.GlobalAveragePooling2D(keepdims=True, name="gap")(x))
    x = keras.ops.maximum(x * keras.ops.sigmoid(gate), 0.0)
    y = L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="pool")(L.Conv2D(6, 1, name="c2")(x)))
    small, _ = assert_equivalent(keras.Model(i, y))
    assert small.get_layer("c1").filters == 4


def test_layer_norm_keeps_the_residual_stream_whole_and_splits_the_mlp():
    """A transformer-style MLP block: LayerNormalization mixes all channels, so whatever feeds
    it (the stem, the MLP's output projection into the residual stream) keeps all filters;
    the MLP's hidden width is split."""
    L = keras.layers
    i = keras.Input((4, 4, 3))
    x = L.Conv2D(8, 1, name="stem")(i)
    h = L.Dense(16, name="fc1")(L.LayerNormalization(name="ln1")(x))
    h = L.Dense(8, name="fc2")(L.Activation("gelu", name="gelu")(h))
    x = L.LayerNormalization(name="ln2")(L.Add(name="residual")([x, h]))
    y = L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    small, m = assert_equivalent(keras.Model(i, y))
    assert [small.get_layer(n).output.shape[-1] for n in ("stem", "fc1", "fc2")] == [8, 8, 8]
    assert m["fc1/kernel"].all(axis=0)[:8].all() and not m["fc1/kernel"][:, 8:].any()


@keras.saving.register_keras_serializable(package="test_slim")  # the slim net is rebuilt
class Scale(keras.layers.Layer):                                    # from the dense one's config
    """A user's layer: a learned scale per channel."""

    def build(self, shape):
        self.gamma = self.add_weight(shape=(shape[-1],), initializer="ones", name="gamma")

    def call(self, x):
        return x * self.gamma


@keras.saving.register_keras_serializable(package="test_slim")
class Twice(keras.layers.Layer):
    """A user's layer: its channels, then the same channels again."""

    def call(self, x):
        return keras.ops.concatenate([x, x], axis=-1)


def test_a_users_layer_is_one_registration():
    from ke_tf import graph

    L = keras.layers
    i = keras.Input((4, 4, 3))
    x = Twice(name="twice")(Scale(name="scale")(L.Conv2D(4, 1, name="c1")(i)))
    model = keras.Model(i, L.Dense(2, name="fc")(L.Flatten(name="flat")(x)))
    with pytest.raises(graph.UnsupportedLayerError, match=r"'scale' of type Scale .* "
                       r"ke_tf.graph.register_layer\(Scale, ke_tf.graph.PER_CHANNEL\)"):
        masks.compute(model, "kels", 0.5)
    graph.register_layer(Scale, graph.PER_CHANNEL)
    graph.register_layer(Twice, lambda layer, sets: np.concatenate([sets[0], sets[0]]))
    try:
        model.get_layer("scale").gamma.assign([0.5, 2.0, -1.0, 3.0])
        small, _ = assert_equivalent(model)
        np.testing.assert_array_equal(small.get_layer("scale").gamma.numpy(), [0.5, 2.0])
    finally:
        del graph._RULES[Scale], graph._RULES[Twice]
    with pytest.raises(ValueError, match="rule must be ke_tf.graph.PER_CHANNEL"):
        graph.register_layer(Scale, "sideways")


def test_a_vision_transformer_splits_heads_and_mlp_and_keeps_the_residual_stream():
    from conftest import small_vit

    model = small_vit()
    small, m = assert_equivalent(model)
    assert small.get_layer("attention0").get_config()["num_heads"] == 2  # 2 of 4 heads
    np.testing.assert_array_equal(m["attention0/query/kernel"].any(axis=(0, 2)), [1, 1, 0, 0])
    assert m["attention0/attention_output/bias"].all()  # into the residual stream: whole
    widths = {n: small.get_layer(n).output.shape[-1] for n in ("patches", "mlp_in0", "mlp_out0")}
    assert widths == {"patches": 16, "mlp_in0": 16, "mlp_out0": 16}  # MLP 32 -> 16
    attention = [c for c in cost.layer_costs(model) if c.name == "attention0"][0]
    tokens, width = 16, 16  # 16 tokens of 16 channels, 4 heads of 4: projections + attention
    assert attention.macs == 4 * tokens * width * width + 2 * tokens * tokens * width
    assert cost.total(small)[1] < cost.total(model)[1]
    wels = masks.compute(model, "wels", 0.5, seed=0)
    assert 0.4 < wels["attention1/value/kernel"].mean() < 0.6  # WELS: any kernel


def test_a_grouped_convolution_is_split_within_every_group():
    """Conv2D(groups=2) on 8 channels: what feeds it keeps the first half of each group (not
    the first half of all channels), and so does its own output; the slim conv keeps its 2
    groups."""
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(8, 1, name="c1")(i))
    x = L.Conv2D(8, 3, groups=2, name="grouped")(L.ReLU(name="relu")(x))
    y = L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="pool")(x))
    small, m = assert_equivalent(keras.Model(i, y))
    np.testing.assert_array_equal(m["c1/kernel"][0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(m["grouped/kernel"][0, 0, :, :].any(axis=0),
                                  [1, 1, 0, 0, 1, 1, 0, 0])
    assert small.get_layer("grouped").get_config()["groups"] == 2
    assert small.get_layer("grouped").kernel.shape == (3, 3, 2, 4)
