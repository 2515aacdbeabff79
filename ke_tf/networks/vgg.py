"""VGG-11 with batch norm (configuration A of Simonyan & Zisserman, ICLR 2015) as
torchvision.models.vgg11_bn: 3x3 convs with bias + BN + ReLU, five 2x2/2 max-pools, then fc6 and
fc7 (4096 units, ReLU, dropout 0.5). Unlike torchvision there is no AdaptiveAvgPool2d((7, 7)):
fc6 sees the flattened last feature map, which at 224 px is 7 x 7 x 512 = 25088 inputs, as in
torchvision. VGG has a single stem; the `stem` argument is ignored.

Layer names (Caffe's VGG): conv{b}_{i}, bn{b}_{i}, relu{b}_{i} (block b, conv i), pool{b};
flatten, fc6, relu6, dropout6, fc7, relu7, dropout7.
"""
import keras

from ke_tf.networks.layers import conv_bn_relu, dense, relu, scale

# Five 2x2/2 max-pools floor the size, which must stay >= 1.
MIN_IMAGE_SIZE = {"imagenet": 32, "small": 32}

_CFG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # Channels per conv, per block.


def backbone(x, arch, stem, width_multiplier):
    """Images -> fc7 features of "vgg11_bn" (`arch` and `stem` are accepted for uniformity)."""
    for b, block in enumerate(_CFG_A, start=1):
        for i, channels in enumerate(block, start=1):
            x = conv_bn_relu(x, scale(channels, width_multiplier), 3, "", f"{b}_{i}", padding=1,
                             use_bias=True)
        x = keras.layers.MaxPooling2D(2, name=f"pool{b}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = dense(x, scale(4096, width_multiplier), f"fc{i}")
        x = relu(x, f"relu{i}")
        x = keras.layers.Dropout(0.5, name=f"dropout{i}")(x)
    return x
