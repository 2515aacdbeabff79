"""Layer helpers shared by the architectures, with PyTorch's semantics.

Initialization follows the official KE code (PyTorch): conv and dense kernels are He-normal
(fan_in, ReLU gain, *not* truncated: `kaiming_normal_`), biases zero. BatchNormalization uses
PyTorch's defaults, momentum 0.1 (which Keras spells 0.9) and epsilon 1e-5; Keras' own defaults
(0.99, 1e-3) would average the statistics ten times slower.

Padding is PyTorch's symmetric zero padding, so feature-map sizes and the alignment of strided
convolutions match torchvision.

Two layers subclass Keras's own for speed only (same variables, names, config and numerics;
docs/performance.md): `FusedBatchNormalization` runs BatchNormalization through TensorFlow's
fused kernel, `Conv2D` computes convolutions with tiny outputs (ResNet's last stage on small
images) as one matrix multiplication, and strided 1x1 convolutions of under 16 input channels
too (TensorFlow's oneDNN AVX-512 kernel corrupts the heap there: docs/performance.md, the oneDNN crash). `CosineDense` is AdaCos's cosine classifier
(`--loss=adacos`).
"""
import keras
import tensorflow as tf

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def he_normal():
    """N(0, 2 / fan_in), untruncated: PyTorch's kaiming_normal_(nonlinearity="relu")."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal")


def scale(channels, width_multiplier):
    """A channel count times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width_multiplier)))


# A convolution whose output has at most GEMM_MAX_POSITIONS positions per image and whose patches
# have at least GEMM_MIN_PATCH values (k*k*C_in) runs as im2col + one matrix multiplication:
# oneDNN's direct kernels are slow there (ResNet18's layer4 at 64 px: 2x2 outputs, 3x3x512
# patches; 2.2x faster forward + backward in float32, 2.4x in bfloat16, measured on the
# benchmark CPU). Larger outputs keep the direct kernel, which wins from 4x4 outputs on.
GEMM_MAX_POSITIONS = 4
GEMM_MIN_PATCH = 2048
# A strided 1x1 convolution with fewer than ONEDNN_1X1_MIN_CHANNELS input channels also runs as a
# (strided slice +) matrix multiplication: TensorFlow 2.21's oneDNN AVX-512 backward-weights
# kernel for it (`jit_1x1:avx512_core`) corrupts the heap at odd batch sizes with 2+ threads
# (docs/performance.md, the oneDNN crash; tools/onednn_crash_repro.py). ResNet shortcuts of nets under 1/4 width or
# slim nets hit it; the matmul computes the same numbers.
ONEDNN_1X1_MIN_CHANNELS = 16


@keras.saving.register_keras_serializable(package="ke_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that computes small-output convolutions as im2col + matmul.

    Same kernel/bias variables and config as Keras's Conv2D; only `convolution_op` changes, and
    only for channels-last, ungrouped, undilated convolutions with static spatial sizes, an
    output of at most GEMM_MAX_POSITIONS positions and patches of at least GEMM_MIN_PATCH
    values ("valid" padding, or "same" at stride 1 with an odd kernel), and for strided 1x1
    convolutions of fewer than ONEDNN_1X1_MIN_CHANNELS input channels (a oneDNN crash). The
    patches are strided slices of the (padded) input concatenated along channels, so gradients
    are slices and pads.
    """

    def _gemm_geometry(self, inputs):
        if (keras.backend.backend() != "tensorflow" or self.data_format != "channels_last"
                or self.groups != 1 or tuple(self.dilation_rate) != (1, 1)
                or len(inputs.shape) != 4 or None in tuple(inputs.shape[1:])):
            return None
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        h, w, c = (int(d) for d in inputs.shape[1:])
        if (kh, kw) == (1, 1) and (sh, sw) != (1, 1) and c < ONEDNN_1X1_MIN_CHANNELS and (
                self.padding in ("same", "valid")):  # 1x1: "same" pads nothing either
            return (0, 0), (h - 1) // sh + 1, (w - 1) // sw + 1
        if self.padding == "same":
            if (sh, sw) != (1, 1) or kh % 2 == 0 or kw % 2 == 0:
                return None
            pads = (kh // 2, kw // 2)
        elif self.padding == "valid":
            pads = (0, 0)
        else:
            return None
        ho, wo = (h + 2 * pads[0] - kh) // sh + 1, (w + 2 * pads[1] - kw) // sw + 1
        if ho < 1 or wo < 1 or ho * wo > GEMM_MAX_POSITIONS or kh * kw * c < GEMM_MIN_PATCH:
            return None
        return pads, ho, wo

    def convolution_op(self, inputs, kernel):
        geometry = self._gemm_geometry(inputs)
        if geometry is None:
            return super().convolution_op(inputs, kernel)
        (ph, pw), ho, wo = geometry
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        kernel = tf.cast(tf.convert_to_tensor(kernel), inputs.dtype)
        c_in, c_out = int(kernel.shape[2]), int(kernel.shape[3])
        h, w = int(inputs.shape[1]), int(inputs.shape[2])
        # Plain Slice ops only (their gradient is a Pad; StridedSliceGrad is slow on CPU): a
        # strided patch is a slice of sh*ho x sw*wo (zero-extended at the bottom/right), viewed
        # as [N*ho, sh, wo, sw*C_in] and sliced at offset 0 of both strides: 4-D throughout, as
        # TensorFlow Lite's SLICE takes at most 5-D (a 6-D view failed to convert).
        extra_h = max(0, (kh - 1) + sh * ho - (h + 2 * ph))
        extra_w = max(0, (kw - 1) + sw * wo - (w + 2 * pw))
        x = inputs
        if ph or pw or extra_h or extra_w:
            x = tf.pad(x, [[0, 0], [ph, ph + extra_h], [pw, pw + extra_w], [0, 0]])
        patches = []
        for i in range(kh):
            for j in range(kw):
                patch = tf.slice(x, [0, i, j, 0], [-1, sh * ho, sw * wo, -1])
                if (sh, sw) != (1, 1):
                    patch = tf.reshape(patch, [-1, sh, wo, sw * c_in])
                    patch = tf.reshape(tf.slice(patch, [0] * 4, [-1, 1, wo, c_in]),
                                       [-1, ho, wo, c_in])
                patches.append(patch)
        cols = tf.concat(patches, axis=-1) if len(patches) > 1 else patches[0]
        y = tf.matmul(tf.reshape(cols, [-1, kh * kw * c_in]),
                      tf.reshape(kernel, [kh * kw * c_in, c_out]))
        return tf.reshape(y, [-1, ho, wo, c_out])


def conv(x, filters, kernel_size, name, strides=1, padding=0, use_bias=False):
    """Conv2D with PyTorch's `padding` (0 or kernel_size // 2 on every side).

    A strided, padded conv gets its own ZeroPadding2D "{name}_pad": Keras' "same" would pad only
    the bottom and right of an even-sized input. At stride 1, "same" is PyTorch's padding.
    """
    if padding and strides > 1:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
        padding = 0
    return Conv2D(
        filters, kernel_size, strides, padding="same" if padding else "valid", use_bias=use_bias,
        kernel_initializer=he_normal(), name=name)(x)


_FUSED_DTYPES = ("float16", "bfloat16", "float32")


@keras.saving.register_keras_serializable(package="ke_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` run by TensorFlow's fused kernel (FusedBatchNormV3).

    Keras 3 normalizes with separate moments / rsqrt / multiply-add ops (and, under mixed
    precision, casts the activations to float32 and back); the fused kernel does the same in
    one pass, reading bfloat16/float16 activations with float32 statistics. Variables (gamma,
    beta, moving_mean, moving_variance), their names, `get_config` and the numerics are Keras's:
    training normalizes with the batch mean and the *biased* batch variance and updates
    moving = moving * momentum + batch * (1 - momentum) with that same biased variance
    (PyTorch would store the unbiased one); inference uses the moving statistics. Everything
    else (other ranks, channels-first, masks, renorm, synchronized, no scale/center, float64,
    a symbolic `training`, backends other than TensorFlow) runs Keras's own `call`.
    """

    def _fusable(self, inputs, training, mask):
        rank = len(inputs.shape)
        return (keras.backend.backend() == "tensorflow" and rank == 4 and mask is None
                and self.axis in (-1, rank - 1) and self.scale and self.center
                and not getattr(self, "renorm", False)  # Keras 3.12 has no renorm
                and not self.synchronized
                and isinstance(training, (bool, type(None)))
                and keras.backend.standardize_dtype(self.compute_dtype) in _FUSED_DTYPES)

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, self.compute_dtype)
        gamma, beta = tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32")
        if training and self.trainable:
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.constant([], "float32"),
                variance=tf.constant([], "float32"), epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            # The kernel returns the unbiased variance; Keras keeps the biased one.
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=False)
        return y


def batch_norm(x, name, epsilon=BN_EPSILON):
    return FusedBatchNormalization(momentum=BN_MOMENTUM, epsilon=epsilon, name=name)(x)


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


@keras.saving.register_keras_serializable(package="ke_tf")
class CosineDense(keras.layers.Dense):
    """The classifier of AdaCos (Zhang et al., CVPR 2019, sec. 3): outputs the cosines
    cos_ij = <x_i / |x_i|, w_j / |w_j|> between the L2-normalised input features and the
    L2-normalised class weights (the kernel's columns), in [-1, 1]; no bias.

    A `keras.layers.Dense` (same `kernel` variable, [D, C], and config), so KE splits it as any
    Dense classifier: KELS masks its fit input rows, Eq. 1 resets the others, slim extraction
    keeps the fit rows. Its dtype is float32 whatever the global policy (the cosines feed an
    exponential with a scale around ln C), inputs cast in. `ke_tf.losses.AdaCosLoss` scales the
    cosines for training; at evaluation they are the logits (the scale changes no arg max).

    The norm |x_i| runs over all input features, so the dense network with its reset
    hypothesis zeroed and the slim network agree up to a positive factor per image,
    |x_fit| / |x| (same top-k), and exactly where the reset features are 0.
    """

    def __init__(self, units, **kwargs):
        if kwargs.pop("use_bias", False):
            raise ValueError("CosineDense has no bias. Received: use_bias=True")
        kwargs.setdefault("dtype", "float32")
        super().__init__(units, use_bias=False, **kwargs)

    def call(self, inputs, training=None):
        x = tf.math.l2_normalize(tf.cast(inputs, "float32"), axis=-1)
        w = tf.math.l2_normalize(tf.cast(self.kernel, "float32"), axis=0)
        return tf.matmul(x, w)


CLASSIFIERS = ("linear", "cosine")


def dense(x, units, name, classifier="linear"):
    """Dense(units) named `name`, He-normal kernel: "linear" (with bias) or "cosine"
    (`CosineDense`)."""
    layer = CosineDense if classifier == "cosine" else keras.layers.Dense
    return layer(units, kernel_initializer=he_normal(), name=name)(x)
