"""Tests for ke_tf.networks: torchvision's parameter counts, shapes, names, init and validation."""
import functools
import re

import keras
import numpy as np
import pytest

from ke_tf import config, networks

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
    keras.layers.UnitNormalization)


@functools.cache
def tiny_model(arch, stem):
    return networks.build(arch, 7, 32, stem=stem, width_multiplier=1 / 16)


def layers_of(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


def kernel_shape(model, name):
    return tuple(model.get_layer(name).kernel.shape)


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_archs_match_config():
    assert networks.ARCHS == config.ARCHS
    assert networks.STEMS == config.STEMS
    assert networks.HEADS == config.HEADS


@pytest.mark.parametrize("arch", networks.ARCHS)
def test_torchvision_parameter_count_and_layer_settings(arch):
    model = networks.build(arch, 1000, 224, stem="imagenet")
    assert model.name == arch
    assert trainable_params(model) == TORCHVISION_PARAMS[arch]
    assert model.output.shape == (None, 1000)
    assert model.get_layer("fc").activation is keras.activations.linear
    for layer in layers_of(model, keras.layers.Conv2D):
        assert layer.use_bias == (arch == "vgg11_bn"), layer.name
    for layer in layers_of(model, keras.layers.BatchNormalization):
        assert layer.momentum == 0.9, layer.name
        assert layer.epsilon == (1e-3 if arch == "googlenet" else 1e-5), layer.name
    for layer in layers_of(model, keras.layers.Conv2D) + layers_of(model, keras.layers.Dense):
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
