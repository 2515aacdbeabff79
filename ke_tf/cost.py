"""Inference cost of a network: parameters and multiply-accumulates (MACs), per layer.

Counts follow the usual conventions: parameters are trainable weights (BatchNorm's moving
statistics are not parameters); MACs are the multiply-accumulates of convolutions and dense
layers for one image (a kh x kw x C_in -> C_out conv costs H_out*W_out*kh*kw*C_in*C_out).
The paper's Table 6 reports twice these numbers (22.44 M "parameters", 3.63 "G-Ops" for
ResNet18): the official profiler counted the masks as parameters and multiplies plus adds as
two operations. Table 10's counts are of the same kind.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import keras
import numpy as np

from ke_tf import graph
from ke_tf import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One weighted layer: its trainable parameters, MACs per image and fit share (0..1)."""

    name: str
    kind: str
    params: int
    macs: int
    fit_share: Optional[float] = None


def _spatial(tensor) -> int:
    return int(np.prod(tensor.shape[1:-1])) if len(tensor.shape) > 2 else 1


def _macs(layer) -> int:
    if isinstance(layer, keras.layers.MultiHeadAttention):
        v = graph.attention_variables(layer)
        width, heads, key_dim = v["query/kernel"].shape
        value_dim, out = v["value/kernel"].shape[-1], v["attention_output/kernel"].shape[-1]
        query, value = layer.input[:2]
        tq, tv = _spatial(query), _spatial(value)  # tokens
        return int(tq * width * heads * key_dim + tv * width * heads * (key_dim + value_dim)
                   + tq * tv * heads * (key_dim + value_dim) + tq * heads * value_dim * out)
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        depthwise_positions = _spatial(layer.output)  # same padding/stride as the output
        return depthwise_positions * (int(np.prod(layer.depthwise_kernel.shape))
                                      + int(np.prod(layer.pointwise_kernel.shape)))
    if isinstance(layer, graph.MIXING + graph.DEPTHWISE):
        positions = _spatial(layer.output) if not isinstance(layer, keras.layers.Dense) \
            else _spatial(layer.input)
        return positions * int(np.prod(layer.kernel.shape))
    return 0


def layer_costs(model: keras.Model, masks: Optional[masks_lib.Masks] = None) -> List[LayerCost]:
    """Cost of every layer that has trainable weights or MACs, in graph order.

    With `masks`, each masked layer also reports the share of its masked weights in the fit
    hypothesis."""
    rows = []
    for layer in graph.layers_in_order(model):
        params = sum(int(np.prod(v.shape)) for v in getattr(layer, "trainable_weights", []))
        macs = _macs(layer)
        if not params and not macs:
            continue
        share = None
        if masks is not None:
            ms = [masks[v.path] for v in layer.weights if v.path in masks]
            if ms:
                share = sum(int(m.sum()) for m in ms) / sum(m.size for m in ms)
        rows.append(LayerCost(layer.name, type(layer).__name__, params, macs, share))
    return rows


def total(model: keras.Model) -> tuple:
    """(trainable parameters, MACs per image) of `model`."""
    rows = layer_costs(model)
    return sum(r.params for r in rows), sum(r.macs for r in rows)
