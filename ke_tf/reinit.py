"""Re-initialization between generations, Eq. 1 of the paper: W = M*W + (1-M)*W_r.

W_r is a fresh random draw for every masked variable (conv and dense kernels and biases; see
`ke_tf.masks`). Fit weights, BatchNorm variables and statistics, and anything without a mask are
left bit-for-bit unchanged (sec. 3.1: "We transfer the learned batch norm Z across generations").

Where W_r comes from (`reset_init`):
- "layer" (default): the layer's own initializer, "the default initialization distribution"
  of the paper. Keras 3 initializers return the same values on every call, seeded or not, so
  each draw rebuilds the initializer from its config with a seed derived from
  (run seed, generation, variable path): different in every generation, reproducible per run.
- "torch_default": U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases, which is what the
  official PyTorch code draws (nn.Conv2d/nn.Linear reset_parameters: kaiming_uniform, a=sqrt(5)).

`fresh_values` is a pure function (model and seed in, arrays out, no global RNG); `apply` does
the one assignment; `reset` is both.
"""
from __future__ import annotations

import zlib
from typing import Dict, Sequence, Union

import keras
import numpy as np

from ke_tf import graph
from ke_tf import masks as masks_lib
from ke_tf.config import RESET_INITS

Seed = Union[int, Sequence[int]]


def _seed_words(seed: Seed, path: str) -> list:
    words = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    if any(w < 0 for w in words):
        raise ValueError(f"seeds must be >= 0. Received: seed={seed!r}")
    return words + [zlib.crc32(path.encode())]


def _initializer_of(layer, var, role: str = ""):
    """The initializer the layer used for `var` (of `masks.masked_layers` role `role`)."""
    if isinstance(layer, keras.layers.MultiHeadAttention):  # its initializers: config only
        which = "bias_initializer" if role.endswith("bias") else "kernel_initializer"
        return keras.initializers.get(layer.get_config()[which])
    if var is getattr(layer, "bias", None):
        return layer.bias_initializer
    if isinstance(layer, graph.DEPTHWISE) or var is getattr(layer, "depthwise_kernel", None):
        return layer.depthwise_initializer
    if var is getattr(layer, "pointwise_kernel", None):
        return layer.pointwise_initializer
    return layer.kernel_initializer


def _fan_in(layer, var, role: str = "") -> int:
    """PyTorch's fan_in of the layer owning `var`: (C_in / groups) * prod(kernel size); an
    attention projection's input width (heads x dim for the output projection)."""
    if role in ("heads_in", "head_bias"):
        return int(graph.attention_variables(layer)["query/kernel"].shape[0])
    if role == "heads_out" or (role == "bias" and isinstance(layer, keras.layers.MultiHeadAttention)):
        return int(np.prod(graph.attention_variables(layer)["attention_output/kernel"].shape[:-1]))
    if isinstance(layer, graph.DEPTHWISE):
        return int(np.prod(layer.kernel.shape[:-2]))
    if var is getattr(layer, "depthwise_kernel", None):
        return int(np.prod(layer.depthwise_kernel.shape[:-2]))
    kernel = layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel
    return int(np.prod(kernel.shape[:-1]))


def _layer_draw(layer, var, role, words) -> np.ndarray:
    init = _initializer_of(layer, var, role)
    config = init.get_config()
    if "seed" in config:
        config["seed"] = int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)
    fresh = type(init).from_config(config)
    return np.asarray(fresh(tuple(var.shape), dtype=var.dtype))


def _torch_draw(layer, var, role, words) -> np.ndarray:
    bound = 1.0 / np.sqrt(_fan_in(layer, var, role))
    rng = np.random.default_rng(words)
    return rng.uniform(-bound, bound, size=tuple(var.shape)).astype(var.dtype)


def zero_values(model: keras.Model, masks: masks_lib.Masks) -> Dict[str, np.ndarray]:
    """W_r = 0 for every masked variable: the "reset to zero" ablation (--evolve_mode=zero)."""
    return {v.path: np.zeros(tuple(v.shape), v.dtype) for v in model.weights if v.path in masks}


def fresh_values(model: keras.Model, masks: masks_lib.Masks, seed: Seed,
                 reset_init: str = "layer") -> Dict[str, np.ndarray]:
    """A fresh random tensor W_r for every masked variable of `model` (Eq. 1).

    Args:
      model: the network (only its layers' shapes and initializers are read).
      masks: {variable.path: mask}; only variables named here are drawn.
      seed: an int or a sequence of ints, e.g. (run_seed, generation): the same seed gives the
        same values, any other seed independent ones.
      reset_init: "layer" or "torch_default" (see the module docstring).
    """
    if reset_init not in RESET_INITS:
        raise ValueError(f"reset_init must be one of {RESET_INITS}. Received: reset_init={reset_init!r}")
    draw = _layer_draw if reset_init == "layer" else _torch_draw
    values = {}
    for layer, roles in masks_lib.masked_layers(model):
        for var, role in roles:
            if var.path in masks:
                values[var.path] = draw(layer, var, role, _seed_words(seed, var.path))
    return values


def combine(weights: np.ndarray, mask: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Eq. 1: M*W + (1-M)*W_r, keeping fit entries bit-for-bit."""
    return np.where(mask, weights, fresh).astype(weights.dtype)


def apply(model: keras.Model, masks: masks_lib.Masks, fresh: Dict[str, np.ndarray]) -> None:
    """Assign Eq. 1 to the model's variables in place (the one step with side effects)."""
    by_path = {v.path: v for v in model.weights}
    missing = sorted(set(masks) - set(by_path))
    if missing:
        raise ValueError(f"Masks name variables the model does not have. Received: {missing[:5]}")
    for path, mask in masks.items():
        var = by_path[path]
        var.assign(combine(var.numpy(), mask, fresh[path]))


def reset(model: keras.Model, masks: masks_lib.Masks, seed: Seed, reset_init: str = "layer") -> None:
    """Re-initialize the reset hypothesis of `model` in place: fresh_values, then apply."""
    apply(model, masks, fresh_values(model, masks, seed, reset_init))
