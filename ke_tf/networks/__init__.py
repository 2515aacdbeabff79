"""The architectures of the paper (Taha et al., CVPR 2021) as plain Keras functional models.

`build` returns a `keras.Model` of standard Keras layers (no nested models, channels-last), so
`ke_tf.graph` can walk it layer by layer and `ke_tf.slim` can rebuild a slimmer copy from
`model.get_config()`; Conv2D and BatchNormalization are `ke_tf.networks.layers`' registered
subclasses of Keras's, which only compute faster (same variables, config and numerics). At width_multiplier=1 every architecture is torchvision's (channels,
strides, biases, trainable parameter counts); each module cites its source and lists its layer
names. Weights are randomly initialized as in the official KE code (see `layers`).
"""
import keras

from ke_tf.config import ARCHS, HEADS, STEMS  # the names, defined once (no TensorFlow there)
from ke_tf.networks import applications, densenet, googlenet, resnet, vgg
from ke_tf.networks.layers import CLASSIFIERS, dense

_MODULES = {
    "resnet18": resnet,
    "resnet34": resnet,
    "resnet50": resnet,
    "vgg11_bn": vgg,
    "densenet121": densenet,
    "densenet169": densenet,
    "googlenet": googlenet,
}


def classifier_for(loss):
    """The classifier `build` gives the "logits" head for a run's `--loss`: "cosine" for
    AdaCos (its logits are scaled cosines), else "linear"."""
    return "cosine" if loss == "adacos" else "linear"


def from_config(config, num_classes):
    """The network of a run's `ke_tf.config.RunConfig` (--arch, --stem, --width_multiplier, the
    task's head, the loss's classifier) for its --image_size and `num_classes`."""
    m = config.model
    return build(m.arch, num_classes, config.data.image_size, stem=m.stem, head=m.head,
                 embedding_dim=m.embedding_dim, width_multiplier=m.width_multiplier,
                 classifier=classifier_for(config.train.loss))


def default_stem(image_size):
    """"small" (3x3/1 conv, no max-pool) for images <= 64 px, else "imagenet"."""
    return "small" if image_size <= 64 else "imagenet"


def min_image_size(arch, stem):
    """The smallest square image `arch` with `stem` accepts (no spatial size drops below 1)."""
    if applications.is_application(arch):
        applications.constructor(arch)  # an unknown name fails here, before any data is read
        return applications.MIN_IMAGE_SIZE
    return _MODULES[arch].MIN_IMAGE_SIZE[stem]


def build(arch, num_classes, image_size, stem=None, head="logits", embedding_dim=128,
          width_multiplier=1.0, channels=3, classifier="linear"):
    """Builds `arch` for `image_size` x `image_size` x `channels` images, randomly initialized.

    Args:
        arch: one of `ARCHS`, or "keras:NAME" for any `keras.applications` constructor
            (`applications.py`; `stem` and `width_multiplier` do not apply to it).
        num_classes: number of logits of the "logits" head; may be None for the "embedding" head.
        image_size: side of the square input images, in pixels.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "small" (3x3/1 conv, no max-pool, for
            CIFAR-sized images) or None: "small" for images <= 64 px, else "imagenet".
        head: "logits": Dense(num_classes) named "fc", no activation. "embedding":
            Dense(embedding_dim) named "embedding", L2-normalized by "l2_normalize".
        embedding_dim: size of the "embedding" head.
        width_multiplier: scales every internal channel count c to max(1, round(c * multiplier)).
        channels: input image channels.
        classifier: the "logits" head's "fc": "linear" (Dense with bias) or "cosine" (the
            cosines of AdaCos, `layers.CosineDense`, for `--loss=adacos`).

    Returns:
        A functional `keras.Model` named `arch`.
    """
    if arch not in ARCHS and not applications.is_application(arch):
        raise ValueError(f"Unknown `arch`, expected one of {ARCHS} or 'keras:NAME'. "
                         f"Received: arch={arch!r}")
    if stem is not None and stem not in STEMS:
        raise ValueError(f"Unknown `stem`, expected None or one of {STEMS}. "
                         f"Received: stem={stem!r}")
    if head not in HEADS:
        raise ValueError(f"Unknown `head`, expected one of {HEADS}. Received: head={head!r}")
    if (num_classes is None and head == "logits") or (num_classes is not None and num_classes < 1):
        raise ValueError("`num_classes` must be >= 1 (None only with head='embedding'). "
                         f"Received: num_classes={num_classes!r}")
    if head == "embedding" and embedding_dim < 1:
        raise ValueError(f"`embedding_dim` must be >= 1. Received: embedding_dim={embedding_dim!r}")
    if not width_multiplier > 0:  # Also rejects NaN.
        raise ValueError("`width_multiplier` must be > 0. "
                         f"Received: width_multiplier={width_multiplier!r}")
    if classifier not in CLASSIFIERS or (classifier != "linear" and head != "logits"):
        raise ValueError(f"`classifier` must be one of {CLASSIFIERS} ('cosine' with "
                         f"head='logits' only). Received: classifier={classifier!r}")
    if channels < 1:
        raise ValueError(f"`channels` must be >= 1. Received: channels={channels!r}")
    stem = default_stem(image_size) if stem is None else stem
    min_size = min_image_size(arch, stem)
    if image_size < min_size:
        raise ValueError(f"`image_size` must be >= {min_size} for {arch} with the {stem!r} stem. "
                         f"Received: image_size={image_size!r}")

    if applications.is_application(arch):
        base = applications.backbone(arch, image_size)
        inputs, x = base.input, base.output
    else:
        inputs = keras.Input((image_size, image_size, channels), name="input")
        x = _MODULES[arch].backbone(inputs, arch, stem, width_multiplier)
    if head == "logits":
        outputs = dense(x, num_classes, "fc", classifier)
    else:
        x = dense(x, embedding_dim, "embedding")
        outputs = keras.layers.UnitNormalization(name="l2_normalize")(x)
    return keras.Model(inputs, outputs, name=arch.replace(applications.PREFIX, ""))
