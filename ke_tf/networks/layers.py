"""Layer helpers shared by the architectures, with PyTorch's semantics.

Initialization follows the official KE code (PyTorch): conv and dense kernels are He-normal
(fan_in, ReLU gain, *not* truncated: `kaiming_normal_`), biases zero. BatchNormalization uses
PyTorch's defaults, momentum 0.1 (which Keras spells 0.9) and epsilon 1e-5; Keras' own defaults
(0.99, 1e-3) would average the statistics ten times slower.

Padding is PyTorch's symmetric zero padding, so feature-map sizes and the alignment of strided
convolutions match torchvision.
"""
import keras

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def he_normal():
    """N(0, 2 / fan_in), untruncated: PyTorch's kaiming_normal_(nonlinearity="relu")."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal")


def scale(channels, width_multiplier):
    """A channel count times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width_multiplier)))


def conv(x, filters, kernel_size, name, strides=1, padding=0, use_bias=False):
    """Conv2D with PyTorch's `padding` (0 or kernel_size // 2 on every side).

    A strided, padded conv gets its own ZeroPadding2D "{name}_pad": Keras' "same" would pad only
    the bottom and right of an even-sized input. At stride 1, "same" is PyTorch's padding.
    """
    if padding and strides > 1:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
        padding = 0
    return keras.layers.Conv2D(
        filters, kernel_size, strides, padding="same" if padding else "valid", use_bias=use_bias,
        kernel_initializer=he_normal(), name=name)(x)


def batch_norm(x, name, epsilon=BN_EPSILON):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=epsilon, name=name)(x)


def relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def conv_bn(x, filters, kernel_size, prefix, suffix="", strides=1, padding=0, use_bias=False,
            epsilon=BN_EPSILON):
    """Conv + BN, named f"{prefix}conv{suffix}" and f"{prefix}bn{suffix}"."""
    x = conv(x, filters, kernel_size, f"{prefix}conv{suffix}", strides, padding, use_bias)
    return batch_norm(x, f"{prefix}bn{suffix}", epsilon)


def conv_bn_relu(x, filters, kernel_size, prefix, suffix="", **kwargs):
    """Conv + BN + ReLU, named as `conv_bn` plus f"{prefix}relu{suffix}"."""
    x = conv_bn(x, filters, kernel_size, prefix, suffix, **kwargs)
    return relu(x, f"{prefix}relu{suffix}")


def stem_max_pool(x, name):
    """PyTorch's MaxPool2d(3, stride=2, padding=1) of the ImageNet stems. Zero padding
    ("{name}_pad") is exact here because it follows a ReLU."""
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name=name)(x)


def dense(x, units, name):
    return keras.layers.Dense(units, kernel_initializer=he_normal(), name=name)(x)
