"""Tests for ke_tf.networks: torchvision's parameter counts, shapes, names, init and validation."""
import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from ke_tf import config, networks
from ke_tf.networks import layers as network_layers
from ke_tf.networks.layers import FusedBatchNormalization

# torchvision's trainable parameter counts, 1000 classes (GoogLeNet without aux classifiers).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "vgg11_bn": 132_868_840,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "googlenet": 6_624_904,
}
PLAIN_LAYERS = (
    keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.BatchNormalization,
    keras.layers.ReLU, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.Add,
    keras.layers.Concatenate, keras.layers.Flatten, keras.layers.Dropout, keras.layers.Dense,
    keras.layers.UnitNormalization)  # FusedBatchNormalization is a BatchNormalization


@functools.cache
def tiny_model(arch, stem):
    return networks.build(arch, 7, 32, stem=stem, width_multiplier=1 / 16)


def layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


def kernel_shape(model, name):
    return tuple(model.get_layer(name).kernel.shape)


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_every_architecture_name_has_a_builder():
    assert tuple(networks._MODULES) == config.ARCHS == networks.ARCHS


@pytest.mark.parametrize("arch", networks.ARCHS)
def test_torchvision_parameter_count_and_layer_settings(arch):
    model = networks.build(arch, 1000, 224, stem="imagenet")
    assert model.name == arch
    assert trainable_params(model) == TORCHVISION_PARAMS[arch]
    assert model.output.shape == (None, 1000)
    assert model.get_layer("fc").activation is keras.activations.linear
    assert not layers_of(model, keras.layers.Conv2D)  # all ke_tf's (GEMM for tiny outputs)
    for layer in layers_of(model, network_layers.Conv2D):
        assert layer.use_bias == (arch == "vgg11_bn"), layer.name
    assert not layers_of(model, keras.layers.BatchNormalization)  # all fused
    assert layers_of(model, FusedBatchNormalization)
    for layer in layers_of(model, FusedBatchNormalization):
        assert layer.momentum == 0.9, layer.name
        assert layer.epsilon == (1e-3 if arch == "googlenet" else 1e-5), layer.name
    for layer in layers_of(model, network_layers.Conv2D) + layers_of(model, keras.layers.Dense):
        init = layer.kernel_initializer
        assert isinstance(init, keras.initializers.VarianceScaling), layer.name
        assert (init.scale, init.mode, init.distribution) == (2.0, "fan_in", "untruncated_normal")
        assert init.get_config()["seed"] is None, layer.name  # Unseeded.


@pytest.mark.parametrize("stem", networks.STEMS)
@pytest.mark.parametrize("arch", networks.ARCHS)
def test_tiny_models_run_with_both_heads(arch, stem):
    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    logits = tiny_model(arch, stem)
    assert all(isinstance(layer, PLAIN_LAYERS) for layer in logits.layers)
    out = logits(images, training=False).numpy()
    assert out.shape == (2, 7) and np.all(np.isfinite(out))

    embed = networks.build(arch, None, 32, stem=stem, head="embedding", embedding_dim=12,
                           width_multiplier=1 / 8)
    assert [layer.name for layer in embed.layers[-2:]] == ["embedding", "l2_normalize"]
    out = embed(images, training=False).numpy()
    assert out.shape == (2, 12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_table6_resnet18_shapes():
    model = networks.build("resnet18", 102, 224, stem="imagenet")
    assert kernel_shape(model, "conv1") == (7, 7, 3, 64)
    assert kernel_shape(model, "layer1_0_conv1") == (3, 3, 64, 64)
    assert kernel_shape(model, "layer4_1_conv2") == (3, 3, 512, 512)
    assert kernel_shape(model, "layer2_0_downsample_conv") == (1, 1, 64, 128)
    assert kernel_shape(model, "fc") == (512, 102)
    assert model.get_layer("layer4_1_out").output.shape == (None, 7, 7, 512)


def test_layer_names_follow_torchvision():
    names = {arch: {layer.name for layer in tiny_model(arch, "imagenet").layers}
             for arch in networks.ARCHS}
    assert {"conv1", "bn1", "relu1", "maxpool", "layer1_0_add", "layer1_0_out",
            "layer2_0_conv1_pad", "layer4_1_conv2", "avgpool", "fc"} <= names["resnet18"]
    assert "layer1_0_downsample_conv" not in names["resnet18"]
    assert {"layer1_0_conv3", "layer1_0_downsample_conv", "layer4_2_bn3"} <= names["resnet50"]
    assert {"conv1_1", "bn1_1", "relu1_1", "pool1", "conv5_2", "pool5", "flatten", "fc6", "relu6",
            "dropout6", "fc7", "dropout7", "fc"} <= names["vgg11_bn"]
    assert {"conv0", "norm0", "relu0", "pool0", "denseblock1_layer1_norm1",
            "denseblock1_layer1_conv2", "denseblock1_layer1_concat", "transition1_conv",
            "transition3_pool", "denseblock4_layer16_concat", "norm5",
            "relu5"} <= names["densenet121"]
    assert "denseblock4_layer32_concat" in names["densenet169"]
    assert "pool0" not in {layer.name for layer in tiny_model("densenet121", "small").layers}
    assert {"conv1_conv", "conv3_relu", "maxpool1", "maxpool4", "inception3a_branch1_conv",
            "inception3a_branch3_1_conv", "inception5b_branch4_0_pool", "inception5b_branch4_1_bn",
            "inception5b_concat", "dropout"} <= names["googlenet"]
    small_googlenet = {layer.name for layer in tiny_model("googlenet", "small").layers}
    assert {"maxpool1", "maxpool2"}.isdisjoint(small_googlenet)
    assert {"conv2_conv", "conv3_conv", "maxpool3", "maxpool4"} <= small_googlenet


def test_googlenet_branch3_and_ceil_mode_pools_as_torchvision():
    # PyTorch's sizes at 225 px: conv1 7x7/2 pad 3 -> 113, then 3x3/2 and 2x2/2 ceil_mode pools.
    model = networks.build("googlenet", 10, 225, stem="imagenet", width_multiplier=1 / 16)
    sizes = [model.get_layer(name).output.shape[1]
             for name in ("conv1_conv", "maxpool1", "maxpool2", "maxpool3", "maxpool4")]
    assert sizes == [113, 56, 28, 14, 7]
    assert kernel_shape(model, "inception3a_branch3_1_conv") == (3, 3, 1, 2)  # 16/16 -> 32/16


def test_stem_defaults_to_small_up_to_64_px():
    for size, stem_kernel in ((64, 3), (65, 7)):
        model = networks.build("resnet18", 10, size, width_multiplier=1 / 16)
        assert kernel_shape(model, "conv1") == (stem_kernel, stem_kernel, 3, 4)
        assert ("maxpool" in [layer.name for layer in model.layers]) == (size > 64)


def test_width_multiplier_scales_internal_channels_only():
    model = networks.build("densenet121", 10, 32, width_multiplier=0.5, head="embedding",
                           embedding_dim=16)
    assert model.get_layer("conv0").filters == 32
    assert model.get_layer("denseblock1_layer1_conv1").filters == 64  # bn_size 4 x growth 16
    assert model.get_layer("denseblock1_layer1_conv2").filters == 16
    assert model.get_layer("transition1_conv").filters == (32 + 6 * 16) // 2
    assert model.output.shape == (None, 16)
    vgg = networks.build("vgg11_bn", 10, 32, width_multiplier=0.01)
    assert vgg.get_layer("conv1_1").filters == 1  # max(1, round(0.64))
    assert vgg.get_layer("fc6").units == 41
    assert vgg.output.shape == (None, 10)


def test_kernels_are_untruncated_he_normal_and_biases_zero():
    model = networks.build("vgg11_bn", 10, 32, channels=1)
    kernel = model.get_layer("conv5_2").kernel.numpy()  # 3x3x512x512: fan_in 4608
    std = np.sqrt(2.0 / (3 * 3 * 512))
    assert abs(kernel.mean()) < 0.01 * std
    assert kernel.std() == pytest.approx(std, rel=0.01)
    # Keras' truncated normal stops at 2 / 0.88 = 2.27 std; an untruncated one has 1.2% beyond 2.5.
    assert np.mean(np.abs(kernel) > 2.5 * std) == pytest.approx(0.0124, rel=0.1)
    fc6 = model.get_layer("fc6")
    assert fc6.kernel.numpy().std() == pytest.approx(np.sqrt(2.0 / 512), rel=0.01)
    assert not np.any(fc6.bias.numpy()) and not np.any(model.get_layer("conv1_1").bias.numpy())
    assert model.input.shape == (None, 32, 32, 1)


def test_init_follows_keras_global_seed():
    def weights():
        return networks.build("resnet18", 5, 32, width_multiplier=1 / 16).get_weights()

    keras.utils.set_random_seed(3)
    first = weights()
    keras.utils.set_random_seed(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(first, weights()))


def test_model_rebuilds_from_config():
    model = networks.build("googlenet", 5, 32, width_multiplier=1 / 16)
    clone = keras.Model.from_config(model.get_config())
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    clone.set_weights(model.get_weights())
    images = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clone(images), model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, stem, smallest", [
    ("resnet18", "imagenet", 1), ("vgg11_bn", "small", 32), ("densenet121", "imagenet", 29),
    ("densenet121", "small", 8), ("googlenet", "imagenet", 15), ("googlenet", "small", 2)])
def test_minimum_image_size(arch, stem, smallest):
    model = networks.build(arch, 3, smallest, stem=stem, width_multiplier=1 / 16)
    assert model.output.shape == (None, 3)
    with pytest.raises(ValueError, match=f"Received: image_size={smallest - 1}"):
        networks.build(arch, 3, smallest - 1, stem=stem, width_multiplier=1 / 16)


@pytest.mark.parametrize("kwargs, received", [
    (dict(arch="resnet101"), "arch='resnet101'"),
    (dict(stem="cifar"), "stem='cifar'"),
    (dict(head="softmax"), "head='softmax'"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(num_classes=None), "num_classes=None"),
    (dict(width_multiplier=0), "width_multiplier=0"),
    (dict(width_multiplier=-0.5), "width_multiplier=-0.5"),
    (dict(width_multiplier=float("nan")), "width_multiplier=nan"),
    (dict(head="embedding", embedding_dim=0), "embedding_dim=0"),
    (dict(channels=0), "channels=0"),
    (dict(arch="vgg11_bn", image_size=31), "image_size=31"),
])
def test_bad_arguments_raise(kwargs, received):
    args = dict(arch="resnet18", num_classes=10, image_size=32) | kwargs
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        networks.build(**args)


# --- FusedBatchNormalization: Keras's BatchNormalization through the fused kernel ----------------

def _bn_pair(shape, rng, **kwargs):
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)
    for layer in (ref, fused):
        layer.build(shape)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ref.weights]
    ref.set_weights(weights)
    fused.set_weights(weights)
    return ref, fused


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (6, 7, 3, 16), (3, 6), (2, 3, 4, 5, 6)])
def test_fused_batch_norm_matches_keras(shape):
    """Outputs, gradients and moving statistics (biased batch variance, moving = moving * m +
    batch * (1 - m)) within 1e-5 of keras.layers.BatchNormalization, in training and inference;
    ranks other than 4 take Keras's own path."""
    rng = np.random.default_rng(0)
    ref, fused = _bn_pair(shape, rng)
    x = tf.constant(rng.normal(1.0, 3.0, size=shape).astype("float32"))
    for training in (True, True, False):
        outs, grads = [], []
        for layer in (ref, fused):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(y * tf.cos(y))
            outs.append(y.numpy())
            grads.append([g.numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)])
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(*grads):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        for a, b in zip(ref.weights, fused.weights):
            assert a.name == b.name
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_fused_batch_norm_frozen_uses_moving_statistics():
    rng = np.random.default_rng(1)
    ref, fused = _bn_pair((4, 3, 3, 8), rng)
    ref.trainable = fused.trainable = False
    x = rng.normal(size=(4, 3, 3, 8)).astype("float32")
    np.testing.assert_allclose(fused(x, training=True), ref(x, training=True), atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), ref.moving_mean.numpy())


def test_fused_batch_norm_mixed_bfloat16():
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        rng = np.random.default_rng(2)
        ref, fused = _bn_pair((4, 5, 5, 8), rng)
        x = tf.cast(rng.normal(size=(4, 5, 5, 8)), "bfloat16")
        with tf.GradientTape() as tape:
            y = fused(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
        grads = tape.gradient(loss, fused.trainable_weights)
        assert y.dtype == "bfloat16" and all(g.dtype == "float32" for g in grads)
        assert all(w.dtype == "float32" for w in fused.weights)
        np.testing.assert_allclose(tf.cast(y, "float32"), tf.cast(ref(x, training=True), "float32"),
                                   atol=0.05)
        np.testing.assert_allclose(fused.moving_variance.numpy(), ref.moving_variance.numpy(),
                                   rtol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fused_batch_norm_config_round_trip():
    layer = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")
    assert layer.get_config() | {"name": "bn"} == keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, name="bn").get_config()
    model = networks.build("resnet18", 3, 16, width_multiplier=1 / 16)
    clone = keras.models.clone_model(model)
    assert type(clone.get_layer("bn1")) is FusedBatchNormalization
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is FusedBatchNormalization


# --- Conv2D: small outputs as im2col + matmul ----------------------------------------------------

@pytest.mark.parametrize("size, c_in, kernel, strides, padding, use_bias, gemm, batch", [
    (2, 256, 3, 1, "same", False, True, 4),    # ResNet18 layer4 at 64 px
    (6, 256, 3, 2, "valid", True, True, 4),    # its strided first conv, after ZeroPadding2D
    (4, 2048, 1, 2, "valid", False, True, 4),  # a strided 1x1 projection
    (3, 256, 3, 1, "valid", False, True, 4),   # a 1x1 output
    (8, 256, 3, 1, "same", False, False, 4),   # 8x8 outputs: the direct kernel
    (2, 64, 3, 1, "same", False, False, 4),    # patches too small
    (4, 256, 2, 1, "same", False, False, 4),   # even kernel with "same"
    # strided 1x1 convs of < 16 input channels (oneDNN's AVX-512 kernel corrupts the heap at odd
    # batches), at odd batches: ResNet18 x1/16 and slim digits shortcuts, odd sizes, "same"
    (32, 4, 1, 2, "valid", False, True, 15),
    (32, 13, 1, 2, "valid", False, True, 25),
    (31, 8, 1, 2, "same", True, True, 25),
    (17, 3, 1, 3, "valid", False, True, 5),
    (32, 16, 1, 2, "valid", False, False, 25),  # 16 channels: the direct kernel is fine
    (32, 4, 1, 1, "valid", False, False, 25),   # stride 1: too
])
def test_gemm_conv_matches_keras(size, c_in, kernel, strides, padding, use_bias, gemm, batch):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, size, size, c_in)).astype("float32"))
    ref = keras.layers.Conv2D(8, kernel, strides, padding=padding, use_bias=use_bias)
    ours = network_layers.Conv2D(8, kernel, strides, padding=padding, use_bias=use_bias)
    for layer in (ref, ours):
        layer.build(x.shape)
    ours.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in ref.weights])
    ref.set_weights(ours.get_weights())
    assert (ours._gemm_geometry(x) is not None) == gemm
    results = []
    for layer in (ref, ours):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        results.append([y] + tape.gradient(loss, [x] + layer.trainable_weights))
    for a, b in zip(*results):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(a.numpy()).max()))
    assert {k: v for k, v in ours.get_config().items() if k != "name"} == {
        k: v for k, v in ref.get_config().items() if k != "name"}


def test_gemm_conv_under_mixed_bfloat16():
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        layer = network_layers.Conv2D(16, 3, padding="same")
        x = tf.cast(np.random.default_rng(1).normal(size=(2, 2, 2, 256)), "bfloat16")
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
        assert layer._gemm_geometry(x) is not None
        assert y.dtype == "bfloat16" and layer.kernel.dtype == "float32"
        assert tape.gradient(loss, layer.kernel).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
