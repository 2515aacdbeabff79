"""The methods a KE run can be compared with, each as a rule of the same GenerationRunner.

- "ke": Knowledge Evolution (sec. 3.1): a fixed KELS/WELS mask, the reset hypothesis re-drawn
  after every generation.
- "llf": later-layer forgetting (Zhou et al., ICLR 2022): the reset hypothesis is every kernel
  of the layers from a named block onward (`--reset_from=layer4` for ResNet18, which also resets
  the classifier), re-initialized each generation; earlier layers, BatchNorm and the classifier
  bias are kept.
- "long": one generation trained for g*e epochs with one schedule, the fair comparison for any
  g-generation method.
- "slim_scratch": the slim KELS architecture (`ke_tf.slim.architecture` of a fresh dense
  network) trained from scratch for g*e epochs: does KE's slim network beat it?
- "dsd": KE+DSD (appendix C.1, Algorithm 2 of Han et al. turned into generations): odd
  generations train dense; before each even generation the `dsd_sparsity` (30%) smallest-
  magnitude weights of every kernel, taken from the previous generation's trained weights, are
  set to zero and held at zero after every optimizer step; the next (dense) generation frees
  them, starting from zero. Nothing is re-initialized randomly.
"""
from __future__ import annotations

from typing import Tuple

import keras
import numpy as np

from ke_tf import graph
from ke_tf import masks as masks_lib
from ke_tf.config import ConfigError, RunConfig

ONE_LONG_GENERATION = ("long", "slim_scratch")


def schedule(cfg: RunConfig) -> Tuple[int, int]:
    """(generations, epochs per generation) that `cfg.method` trains."""
    g, e = cfg.train.generations, cfg.train.epochs
    return (1, g * e) if cfg.method in ONE_LONG_GENERATION else (g, e)


def llf_masks(model: keras.Model, reset_from: str) -> masks_lib.Masks:
    """Masks resetting every kernel (and hidden bias) of the layers from the first layer whose
    name starts with `reset_from` onward, in graph order; the output layer's bias stays fit."""
    order = [layer.name for layer in graph.layers_in_order(model)]
    start = next((i for i, name in enumerate(order) if name.startswith(reset_from)), None)
    if start is None:
        raise ConfigError(f"--reset_from={reset_from} names no layer of {model.name} (its layers "
                          f"are named like {', '.join(order[1:4])}, ...). "
                          f"Received: reset_from={reset_from!r}")
    outputs = set(graph.output_layers(model))
    masks: masks_lib.Masks = {}
    for layer, roles in masks_lib.masked_layers(model):
        later = order.index(layer.name) >= start
        for var, role in roles:
            keep = not later or (role == "bias" and layer.name in outputs)
            masks[var.path] = np.full(tuple(var.shape), keep, bool)
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
