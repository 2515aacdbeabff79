"""The methods a KE run can be compared with, each as a rule of the same GenerationRunner.

- "ke": Knowledge Evolution (sec. 3.1): a fixed KELS/WELS mask, the reset hypothesis re-drawn
  after every generation.
- "llf": later-layer forgetting (Zhou et al., ICLR 2022): the reset hypothesis is every kernel
  of the layers from a named block onward (`--reset_from=layer4` for ResNet18, which also resets
  the classifier), re-initialized each generation; earlier layers, every bias and BatchNorm are
  kept.
- "long": one generation trained for g*e epochs with one schedule, the fair comparison for any
  g-generation method.
- "slim_scratch": the slim KELS architecture (`ke_tf.slim.architecture` of a fresh dense
  network) trained from scratch for g*e epochs: does KE's slim network beat it?
- "dsd": KE+DSD (appendix C.1, Algorithm 2 of Han et al. turned into generations): odd
  generations train dense; before each even generation the `dsd_sparsity` (30%) smallest-
  magnitude weights of every kernel, taken from the previous generation's trained weights, are
  set to zero and held at zero after every optimizer step; the next (dense) generation frees
  them, starting from zero. Nothing is re-initialized randomly.
- "dnr": dynamic neural regeneration (Ramkumar et al., NeurIPS 2024): after every generation a
  data-aware mask keeps the share s of conv/dense kernel weights with the largest connection
  sensitivity |w * sum over batches of |dL/dw|| (plain cross entropy on a fraction of the
  training images, no augmentation), with one global threshold as in DNR or one per layer; the
  rest is re-initialized. BatchNorm and biases are never reset.
"""
from __future__ import annotations

import math
from typing import Tuple

import keras
import numpy as np
import tensorflow as tf

from ke_tf import graph, losses
from ke_tf import masks as masks_lib
from ke_tf.config import ConfigError, RunConfig

ONE_LONG_GENERATION = ("long", "slim_scratch")


def schedule(cfg: RunConfig) -> Tuple[int, int]:
    """(generations, epochs per generation) that `cfg.method` trains."""
    g, e = cfg.train.generations, cfg.train.epochs
    return (1, g * e) if cfg.method in ONE_LONG_GENERATION else (g, e)


def llf_masks(model: keras.Model, reset_from: str) -> masks_lib.Masks:
    """Masks resetting every kernel of the layers from the first layer whose name starts with
    `reset_from` onward, in graph order; biases (the classifier's included) are kept."""
    order = [layer.name for layer in graph.layers_in_order(model)]
    start = next((i for i, name in enumerate(order) if name.startswith(reset_from)), None)
    if start is None:
        raise ConfigError(f"--reset_from={reset_from} names no layer of {model.name} (its layers "
                          f"are named like {', '.join(order[1:4])}, ...). "
                          f"Received: reset_from={reset_from!r}")
    masks: masks_lib.Masks = {}
    for layer, roles in masks_lib.masked_layers(model):
        later = order.index(layer.name) >= start
        for var, role in roles:
            masks[var.path] = np.full(tuple(var.shape), not later or role == "bias", bool)
    return masks


def dsd_keep(model: keras.Model, sparsity: float) -> masks_lib.Masks:
    """Per kernel, False for its round(sparsity * n) smallest-magnitude entries (DSD's prune)."""
    keep = {}
    for _, roles in masks_lib.masked_layers(model):
        for var, role in roles:
            if role == "bias":
                continue
            w = np.abs(var.numpy()).ravel()
            mask = np.ones(w.size, bool)
            mask[np.argsort(w, kind="stable")[:int(round(sparsity * w.size))]] = False
            keep[var.path] = mask.reshape(tuple(var.shape))
    return keep


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
