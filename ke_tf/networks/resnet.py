"""ResNet-18/34/50 (He et al., CVPR 2016) as torchvision.models.resnet.

ResNet-18/34 stack BasicBlocks, ResNet-50 Bottlenecks with the stride on the 3x3 conv ("v1.5").
A block whose shape changes gets a projection shortcut, 1x1 conv + BN ("downsample").
stem="imagenet": 7x7/2 conv + 3x3/2 max-pool (the paper's, Table 6); "small": 3x3/1 conv.

Layer names are torchvision's with "_" for ".": conv1, bn1, relu1, maxpool (stem);
layer{i}_{j}_conv{k}, _bn{k}, _relu{k}, _downsample_conv, _downsample_bn, _add and _out (the
block's last ReLU); avgpool. A strided, padded layer has its ZeroPadding2D "{name}_pad".
"""
import keras

from ke_tf.networks.layers import conv_bn, conv_bn_relu, relu, scale, stem_max_pool

# Every strided layer pads (or is 1x1), so each halving gives ceil(size / 2) >= 1.
MIN_IMAGE_SIZE = {"imagenet": 1, "small": 1}


def basic_block(x, planes, strides, width_multiplier, name):
    channels = scale(planes, width_multiplier)
    y = conv_bn_relu(x, channels, 3, f"{name}_", "1", strides=strides, padding=1)
    y = conv_bn(y, channels, 3, f"{name}_", "2", padding=1)
    return _add_shortcut_relu(y, x, strides, name)


def bottleneck(x, planes, strides, width_multiplier, name):
    channels = scale(planes, width_multiplier)
    y = conv_bn_relu(x, channels, 1, f"{name}_", "1")
    y = conv_bn_relu(y, channels, 3, f"{name}_", "2", strides=strides, padding=1)
    y = conv_bn(y, scale(4 * planes, width_multiplier), 1, f"{name}_", "3")
    return _add_shortcut_relu(y, x, strides, name)


def _add_shortcut_relu(y, x, strides, name):
    """ReLU(y + x), with x through a 1x1 conv + BN ("downsample") where the shapes differ."""
    if strides > 1 or x.shape[-1] != y.shape[-1]:
        x = conv_bn(x, y.shape[-1], 1, f"{name}_downsample_", strides=strides)
    y = keras.layers.Add(name=f"{name}_add")([y, x])
    return relu(y, f"{name}_out")


_CONFIGS = {
    "resnet18": (basic_block, (2, 2, 2, 2)),
    "resnet34": (basic_block, (3, 4, 6, 3)),
    "resnet50": (bottleneck, (3, 4, 6, 3)),
}


def backbone(x, arch, stem, width_multiplier):
    """Images -> globally pooled features of `arch` ("resnet18", "resnet34" or "resnet50")."""
    block, depths = _CONFIGS[arch]
    kernel_size, strides, padding = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
    x = conv_bn_relu(x, scale(64, width_multiplier), kernel_size, "", "1", strides=strides,
                     padding=padding)
    if stem == "imagenet":
        x = stem_max_pool(x, "maxpool")
    for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for j in range(depth):
            strides = 2 if i > 1 and j == 0 else 1
            x = block(x, planes, strides, width_multiplier, f"layer{i}_{j}")
    return keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
