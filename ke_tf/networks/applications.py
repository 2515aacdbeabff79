"""Any `keras.applications` constructor as a network of a run: `--arch=keras:NAME`.

The application is built with `weights=None` (random initialization from its own
initializers, which Eq. 1 re-draws from), `include_top=False` and global average pooling, for
`image_size` x `image_size` x 3 images; ke_tf's own head follows, as on its architectures: the
"logits" head `fc` (Dense, or the cosine classifier of --loss=adacos) or the "embedding" head
(Dense + L2 normalization). The result is one flat functional graph, so KELS/WELS masks, slim
extraction and export work on it as on the package's own networks; a layer the graph code
cannot follow is refused by name (`ke_tf.graph.UnsupportedLayerError`, exit 2).
"""
from __future__ import annotations

import keras

from ke_tf.config import ConfigError

PREFIX = "keras:"
MIN_IMAGE_SIZE = 32  # what keras.applications accept with weights=None


def is_application(arch: str) -> bool:
    return arch.startswith(PREFIX)


def constructor(arch: str):
    """The keras.applications function `arch` ("keras:NAME") names."""
    name = arch[len(PREFIX):]
    found = getattr(keras.applications, name, None)
    if not name or not callable(found) or name.startswith("_"):
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ConfigError(f"--arch={arch}: keras.applications has no constructor {name!r} (it "
                          f"has {', '.join(known[:6])}, ...). Received: arch={arch!r}")
    return found


def backbone(arch: str, image_size: int) -> keras.Model:
    """The application without its top, global-average-pooled, randomly initialized."""
    build = constructor(arch)
    try:
        return build(include_top=False, weights=None, pooling="avg",
                     input_shape=(image_size, image_size, 3))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--arch={arch} cannot be built at --image_size={image_size}: "
                          f"{err}") from err
