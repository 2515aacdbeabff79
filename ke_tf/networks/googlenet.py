"""GoogLeNet (Szegedy et al., CVPR 2015) as torchvision.models.googlenet without the auxiliary
classifiers (aux_logits=False).

BasicConv2d is conv (no bias) + BN (epsilon 0.001) + ReLU. Inception modules 3a-5b concatenate a
1x1 branch, a 1x1-3x3 branch, a second 1x1-3x3 branch (torchvision's 3x3 where the paper has 5x5)
and a 3x3/1 max-pool-1x1 branch. Max-pools use ceil_mode as torchvision. Dropout 0.2 before fc.
stem="imagenet": conv1 7x7/2, maxpool1, conv2 1x1, conv3 3x3, maxpool2; "small": conv1 3x3/1,
conv2, conv3 and no max-pool (maxpool3 and maxpool4 stay).

Layer names are torchvision's with "_" for ".": conv{1,2,3}_conv, _bn, _relu; maxpool{1..4};
inception{3a..5b}_branch1_conv, _branch2_0_conv, _branch2_1_conv, _branch3_0_conv,
_branch3_1_conv, _branch4_0_pool, _branch4_1_conv (each conv with its _bn and _relu), _concat;
avgpool, dropout. conv1 has its ZeroPadding2D "conv1_conv_pad".
"""
import keras

from ke_tf.networks.layers import conv_bn_relu, scale

# maxpool{1,2,3} (3x3/2, ceil_mode) need >= 2 px: conv1 gives ceil(15 / 2) = 8 -> 4 -> 2 -> 1.
MIN_IMAGE_SIZE = {"imagenet": 15, "small": 2}


def basic_conv(x, filters, kernel_size, prefix, strides=1, padding=0):
    """torchvision's BasicConv2d."""
    return conv_bn_relu(x, filters, kernel_size, prefix, strides=strides, padding=padding,
                        epsilon=1e-3)


def max_pool_ceil(x, pool_size, name):
    """torchvision's MaxPool2d(pool_size, stride=2, ceil_mode=True).

    Where the windows do not tile the input exactly, ceil_mode adds a last, partial window; Keras'
    "same" does the same by padding one trailing row and column. Where they do, "valid" is exact
    ("same" would pad both sides)."""
    padding = "valid" if (x.shape[1] - pool_size) % 2 == 0 else "same"
    return keras.layers.MaxPooling2D(pool_size, strides=2, padding=padding, name=name)(x)


def inception(x, name, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, width_multiplier):
    """Inception module `name` ("3a", ...); channel counts as torchvision's Inception arguments."""
    prefix = f"inception{name}_"
    ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = (
        scale(c, width_multiplier) for c in (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj))
    branch1 = basic_conv(x, ch1x1, 1, f"{prefix}branch1_")
    branch2 = basic_conv(x, ch3x3red, 1, f"{prefix}branch2_0_")
    branch2 = basic_conv(branch2, ch3x3, 3, f"{prefix}branch2_1_", padding=1)
    branch3 = basic_conv(x, ch5x5red, 1, f"{prefix}branch3_0_")
    branch3 = basic_conv(branch3, ch5x5, 3, f"{prefix}branch3_1_", padding=1)
    branch4 = keras.layers.MaxPooling2D(3, strides=1, padding="same",
                                        name=f"{prefix}branch4_0_pool")(x)
    branch4 = basic_conv(branch4, pool_proj, 1, f"{prefix}branch4_1_")
    return keras.layers.Concatenate(name=f"{prefix}concat")([branch1, branch2, branch3, branch4])


def backbone(x, arch, stem, width_multiplier):
    """Images -> globally pooled, dropped-out features of "googlenet" (`arch` is accepted for
    uniformity)."""
    w = width_multiplier
    if stem == "imagenet":
        x = basic_conv(x, scale(64, w), 7, "conv1_", strides=2, padding=3)
        x = max_pool_ceil(x, 3, "maxpool1")
    else:
        x = basic_conv(x, scale(64, w), 3, "conv1_", padding=1)
    x = basic_conv(x, scale(64, w), 1, "conv2_")
    x = basic_conv(x, scale(192, w), 3, "conv3_", padding=1)
    if stem == "imagenet":
        x = max_pool_ceil(x, 3, "maxpool2")
    x = inception(x, "3a", 64, 96, 128, 16, 32, 32, w)
    x = inception(x, "3b", 128, 128, 192, 32, 96, 64, w)
    x = max_pool_ceil(x, 3, "maxpool3")
    x = inception(x, "4a", 192, 96, 208, 16, 48, 64, w)
    x = inception(x, "4b", 160, 112, 224, 24, 64, 64, w)
    x = inception(x, "4c", 128, 128, 256, 24, 64, 64, w)
    x = inception(x, "4d", 112, 144, 288, 32, 64, 64, w)
    x = inception(x, "4e", 256, 160, 320, 32, 128, 128, w)
    x = max_pool_ceil(x, 2, "maxpool4")
    x = inception(x, "5a", 256, 160, 320, 32, 128, 128, w)
    x = inception(x, "5b", 384, 192, 384, 48, 128, 128, w)
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.layers.Dropout(0.2, name="dropout")(x)
