"""How a run executes, not what it trains: the flags of the execution topic.

- `strategy(config)`: the `tf.distribute` strategy (--strategy): the default one, or
  `MirroredStrategy` over every local GPU (or logical CPU device), the global batch split among
  them; `synchronize_batchnorm` makes BatchNorm statistics those of the global batch.
- `precision_policy(config)`: the Keras dtype policy the networks are built with
  (--mixed_precision): float32, or mixed_float16 on a GPU / mixed_bfloat16 on a CPU with float32
  master weights.

These never change the numbers a run should reach, so a run may be resumed with other values
(`config.NOT_TRAINING`).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ke_tf.config import RunConfig


def strategy(config: RunConfig) -> tf.distribute.Strategy:
    """The strategy of --strategy ("none": TensorFlow's default strategy)."""
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def synchronize_batchnorm(config: RunConfig, network: keras.Model) -> None:
    """Under a multi-replica strategy, BatchNorm statistics over the global batch, so that N
    devices compute what one device would."""
    if config.strategy != "none":
        for layer in network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True


def precision_policy(config: RunConfig) -> str:
    """The Keras dtype policy of --mixed_precision: float16 on a GPU, bfloat16 on a CPU."""
    if not config.mixed_precision:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
