"""DenseNet-121/169 (Huang et al., CVPR 2017) as torchvision.models.densenet.

Growth rate 32, bottleneck width 4 x 32, 64 initial features, blocks of (6, 12, 24, 16) or
(6, 12, 32, 32) BN-ReLU-conv layers; transitions halve the channels (compression 0.5) and
average-pool 2x2/2; the end is BN + ReLU + global average pool. No dropout (torchvision's
drop_rate=0). stem="imagenet": conv0 7x7/2 + pool0 3x3/2 max-pool; "small": conv0 3x3/1.

Layer names are torchvision's with "_" for "." and "layer" for "denselayer": conv0, norm0, relu0,
pool0 (stem); denseblock{b}_layer{l}_norm1, _relu1, _conv1, _norm2, _relu2, _conv2, _concat;
transition{b}_norm, _relu, _conv, _pool; norm5, relu5, avgpool. A strided, padded layer has its
ZeroPadding2D "{name}_pad".
"""
import keras

from ke_tf.networks.layers import batch_norm, conv, relu, scale, stem_max_pool

# The stem halves twice (ceil), then three 2x2/2 average pools floor the size: 29 -> 15 -> 8 -> 1.
MIN_IMAGE_SIZE = {"imagenet": 29, "small": 8}

_BLOCKS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32)}


def _bn_relu_conv(x, filters, kernel_size, prefix, suffix="", padding=0):
    x = batch_norm(x, f"{prefix}norm{suffix}")
    x = relu(x, f"{prefix}relu{suffix}")
    return conv(x, filters, kernel_size, f"{prefix}conv{suffix}", padding=padding)


def dense_layer(x, growth_rate, prefix):
    y = _bn_relu_conv(x, 4 * growth_rate, 1, prefix, "1")
    y = _bn_relu_conv(y, growth_rate, 3, prefix, "2", padding=1)
    return keras.layers.Concatenate(name=f"{prefix}concat")([x, y])


def transition(x, prefix):
    x = _bn_relu_conv(x, x.shape[-1] // 2, 1, prefix)
    return keras.layers.AveragePooling2D(2, name=f"{prefix}pool")(x)


def backbone(x, arch, stem, width_multiplier):
    """Images -> globally pooled features of `arch` ("densenet121" or "densenet169")."""
    growth_rate = scale(32, width_multiplier)
    kernel_size, strides, padding = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
    x = conv(x, scale(64, width_multiplier), kernel_size, "conv0", strides, padding)
    x = relu(batch_norm(x, "norm0"), "relu0")
    if stem == "imagenet":
        x = stem_max_pool(x, "pool0")
    blocks = _BLOCKS[arch]
    for b, num_layers in enumerate(blocks, start=1):
        for i in range(1, num_layers + 1):
            x = dense_layer(x, growth_rate, f"denseblock{b}_layer{i}_")
        if b < len(blocks):
            x = transition(x, f"transition{b}_")
    x = relu(batch_norm(x, "norm5"), "relu5")
    return keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
