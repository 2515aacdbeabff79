"""Dynamic neural regeneration (Ramkumar et al., NeurIPS 2024): after every generation a
data-aware mask keeps the share s (--split_rate) of conv/dense kernel weights with the largest
connection sensitivity |w * sum over batches of |dL/dw|| (plain cross entropy on
--dnr_data_fraction of the training images, no augmentation, the network in inference mode),
with one global threshold as in DNR or one per layer (--dnr_threshold); the rest is
re-initialized by Eq. 1. BatchNorm and biases are never reset."""
from __future__ import annotations

import math
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from ke_tf import losses, masks as masks_lib
from ke_tf.methods.base import Method, Setting, require


def connection_sensitivity(model: keras.Model, batches, num_batches: int) -> masks_lib.Masks:
    """|w * sum over `num_batches` batches of |dL/dw|| for every masked kernel (DNR's score).

    L is plain cross entropy of the model in inference mode (BatchNorm statistics untouched)."""
    kernels = [var for _, roles in masks_lib.masked_layers(model)
               for var, role in roles if role != "bias"]
    sums = [np.zeros(tuple(v.shape), np.float64) for v in kernels]
    for x, y in batches.take(num_batches):
        with tf.GradientTape() as tape:
            loss = losses.sparse_cross_entropy(y, model(x, training=False))
        for acc, g in zip(sums, tape.gradient(loss, kernels)):
            acc += np.abs(g.numpy())
    return {v.path: np.abs(v.numpy()) * acc for v, acc in zip(kernels, sums)}


def dnr_masks(model: keras.Model, batches, num_batches: int, keep: float,
              per_layer: bool = False) -> masks_lib.Masks:
    """Keep (True) the share `keep` of kernel weights with the highest connection sensitivity,
    over all kernels at once (DNR) or per kernel; biases are always kept."""
    scores = connection_sensitivity(model, batches, num_batches)

    def top(values: np.ndarray, share: float) -> float:
        k = max(1, int(round(share * values.size)))
        return np.partition(values, values.size - k)[values.size - k]

    everything = np.concatenate([s.ravel() for s in scores.values()])
    threshold = None if per_layer else top(everything, keep)
    masks: masks_lib.Masks = {}
    for _, roles in masks_lib.masked_layers(model):
        for var, role in roles:
            if role == "bias":
                masks[var.path] = np.ones(tuple(var.shape), bool)
            else:
                s = scores[var.path]
                masks[var.path] = s >= (top(s.ravel(), keep) if per_layer else threshold)
    return masks


def dnr_batches(num_train: int, batch_size: int, fraction: float) -> int:
    """Batches that hold `fraction` of the training images (at least one)."""
    return max(1, math.ceil(fraction * num_train / batch_size))


class DynamicNeuralRegeneration(Method):
    name = "dnr"
    settings = {
        "dnr_data_fraction": Setting(0.2, "--method=dnr: share of the training images that score "
                                     "the weights.", ok=lambda v: 0 < v <= 1,
                                     rule="must be in (0, 1]"),
        "dnr_threshold": Setting("global", "--method=dnr: keep the top --split_rate over the network "
                                 "or per layer.", kind="enum", choices=("global", "layer")),
    }

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        require(config.data.task == "classification", "method",
                "dnr scores weights with cross entropy: it needs --task=classification",
                config.method)

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        """Score this generation's trained weights, then re-draw the low-scoring ones."""
        info = run.data.info
        n = dnr_batches(info.num_train, self.config.data.batch_size,
                        self.setting("dnr_data_fraction"))
        masks = dnr_masks(run.network, run.data.train_plain, n, self.config.split.split_rate,
                          per_layer=self.setting("dnr_threshold") == "layer")
        self.reinitialize(run.network, masks, generation)
        return masks

    def split_columns(self) -> Dict[str, object]:
        return {"split_mode": "dnr", "split_rate": self.config.split.split_rate}
