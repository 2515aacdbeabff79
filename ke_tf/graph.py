"""Channel sets through a Keras functional graph.

KELS (sec. 3.2, Fig. 3) keeps the *first* ceil(s*C) filters of every layer, and a layer's input
channels belong to the fit hypothesis exactly when the layer that produced them kept them. With
residual links, concatenations (appendix B, Fig. 10-11), depthwise convolutions and flattening,
"the channels the producer kept" must be followed through the graph. This module does that, for
any functional model, from its layers alone (no per-architecture tables).

A *channel set* is a boolean numpy vector over the last (channels-last) axis of a tensor: True
for the channels that belong to the fit hypothesis. `channel_flow(model, choose_out)` walks the
graph in topological order and returns, per layer, the channel sets of its inputs and output.
The caller decides the one thing that is a choice, the output channels of a layer that mixes
channels (Conv, Dense, the pointwise half of SeparableConv2D); everything else follows:

- the image input: all channels (so the first conv keeps all its input channels, Alg. 1 l.5);
- per-channel layers (BatchNorm, activations, pooling, padding, dropout, rescaling,
  normalization): pass the set through;
- Add / Multiply / Subtract / Average / Maximum / Minimum: all inputs must hold the same set,
  which the output keeps (KELS gives every branch the same first-k prefix);
- Concatenate on the channel axis: each input's set, offset by its position (Fig. 10-11);
- DepthwiseConv2D: output channel c*m+j is fit iff input channel c is;
- Flatten / Reshape: the set broadcast over the input's spatial positions and reshaped, so a
  Flatten of an HxWxC map keeps the features i with (i mod C) fit; a Reshape must leave every
  output channel uniformly fit or reset;
- Softmax-like and L2-normalizing layers mix channels and need an all-fit input.

Anything else raises `UnsupportedLayerError` naming the layer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

import keras
import numpy as np

from ke_tf import internals
from ke_tf.config import ConfigError

L = keras.layers

# Layers whose kernel mixes all input channels into all output channels.
MIXING = (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense, L.SeparableConv1D, L.SeparableConv2D)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
PER_CHANNEL = (
    L.BatchNormalization, L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
    L.AveragePooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.Rescaling, L.Normalization, L.Identity,
    L.ActivityRegularization,
)
ELEMENTWISE = (L.Add, L.Multiply, L.Subtract, L.Average, L.Maximum, L.Minimum)
RESHAPING = (L.Flatten, L.Reshape)
# Layers that mix channels without weights: fine only where every channel is fit.
NEEDS_ALL_FIT = (L.Softmax, L.UnitNormalization, L.LayerNormalization)
CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


class UnsupportedLayerError(ConfigError):
    """A layer whose channels cannot be followed through the graph (a ValueError; bad input:
    the command line exits 2 with the message, which names the layer and its type)."""


@dataclasses.dataclass(frozen=True)
class Flow:
    """Fit-channel sets of one layer's inputs (in call order) and of its output."""

    inputs: List[np.ndarray]
    output: np.ndarray


ChooseOut = Callable[[keras.layers.Layer, np.ndarray], np.ndarray]


def functional(model) -> keras.Model:
    """`model` as a flat functional graph, the form the masks, slim extraction and
    re-initialization walk: a functional `keras.Model` as it is, a `keras.Sequential` that
    starts with a `keras.Input` as the functional model of its layers (the same layers and
    weights); anything else raises ConfigError saying what is needed."""
    if isinstance(model, keras.Sequential):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as err:
            raise ConfigError(f"the Sequential model '{model.name}' has no known input: start "
                              "it with keras.Input(shape) so that its graph exists") from err
        one = lambda tensors: tensors[0] if len(tensors) == 1 else tensors  # noqa: E731
        return keras.Model(one(inputs), one(outputs), name=model.name)
    if not internals.is_functional(model):
        raise ConfigError(f"{type(model).__name__} is not a functional keras.Model (a subclassed "
                          "model has no graph to split into fit and reset hypotheses, sec. 3.2): "
                          "build it as keras.Model(inputs, outputs) or as a keras.Sequential "
                          f"starting with keras.Input. Received: model={model!r}")
    return model


def layers_in_order(model: keras.Model) -> List[keras.layers.Layer]:
    """The model's layers in topological order; rejects graphs this module cannot walk."""
    for op in model.operations:
        if not isinstance(op, keras.layers.Layer):
            raise UnsupportedLayerError(
                f"Operation '{op.name}' ({type(op).__name__}) is a raw op in the functional "
                "graph; wrap it in a keras layer. Received: operation=" + op.name)
        if isinstance(op, keras.Model):
            raise UnsupportedLayerError(
                f"Layer '{op.name}' ({type(op).__name__}) is a nested model; build the "
                f"network as one flat functional graph. Received: layer={op.name}")
        if internals.call_count(op) > 1:
            raise UnsupportedLayerError(
                f"Layer '{op.name}' ({type(op).__name__}) is shared (called "
                f"{internals.call_count(op)} times); shared layers are not supported. "
                f"Received: layer={op.name}")
    return list(model.operations)


def _inputs(layer) -> list:
    x = layer.input
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _channels(tensor) -> int:
    return int(tensor.shape[-1])


def output_layers(model: keras.Model) -> List[str]:
    """Names of the weighted layers that produce the model's outputs (classifier, embedding).

    Walks back from each output through weightless single-input layers (activation, softmax,
    L2 normalization, reshape, flatten, dropout), so a Dense head and MobileNet's 1x1 Conv2D +
    Reshape head are both found."""
    names = []
    for out in model.outputs:
        layer = internals.producer(out)
        while not isinstance(layer, MIXING + DEPTHWISE):
            ins = _inputs(layer) if not isinstance(layer, L.InputLayer) else []
            if len(ins) != 1 or layer.weights:
                raise UnsupportedLayerError(
                    f"Cannot find the output layer of the model: '{layer.name}' "
                    f"({type(layer).__name__}) stands between it and the output. "
                    f"Received: layer={layer.name}")
            layer = internals.producer(ins[0])
        names.append(layer.name)
    return names


def _reshape_set(in_set: np.ndarray, in_shape, out_shape, layer) -> np.ndarray:
    """Broadcast a channel set over the input's positions, reshape, read the output channels."""
    full = np.broadcast_to(in_set, tuple(in_shape[1:])).reshape(tuple(out_shape[1:]))
    flat = full.reshape(-1, full.shape[-1])
    out = flat[0].copy()
    if not (flat == out).all():
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' reshapes so that an output channel mixes fit and reset "
            f"channels. Received: layer={layer.name}")
    return out


def channel_flow(model: keras.Model, choose_out: ChooseOut) -> Dict[str, Flow]:
    """Fit-channel sets of every layer's inputs and output, in topological order.

    `choose_out(layer, in_set)` returns the output channel set of a MIXING layer given its
    input set; for SeparableConv layers it receives the depthwise half's output set."""
    sets: Dict[int, np.ndarray] = {}  # id(KerasTensor) -> channel set
    flows: Dict[str, Flow] = {}
    for layer in layers_in_order(model):
        if isinstance(layer, L.InputLayer):
            out = np.ones(_channels(layer.output), bool)
            flows[layer.name] = Flow([], out)
            sets[id(layer.output)] = out
            continue
        tensors = _inputs(layer)
        ins = [sets[id(t)] for t in tensors]
        out = _output_set(layer, tensors, ins, choose_out)
        if out.shape != (_channels(layer.output),):
            raise UnsupportedLayerError(
                f"Channel bookkeeping failed at layer '{layer.name}' ({type(layer).__name__}). "
                f"Received: layer={layer.name}")
        flows[layer.name] = Flow(ins, out)
        sets[id(layer.output)] = out
    return flows


def _output_set(layer, tensors, ins, choose_out) -> np.ndarray:
    name, kind = layer.name, type(layer).__name__
    if isinstance(layer, MIXING + DEPTHWISE + PER_CHANNEL) and getattr(
            layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(
            f"Layer '{name}' is channels_first; only channels_last graphs are supported. "
            f"Received: data_format={layer.data_format}")
    if isinstance(layer, DEPTHWISE):
        return np.repeat(ins[0], layer.depth_multiplier)
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        return choose_out(layer, np.repeat(ins[0], layer.depth_multiplier))
    if isinstance(layer, MIXING):
        if getattr(layer, "groups", 1) != 1:
            raise UnsupportedLayerError(
                f"Layer '{name}' is a grouped convolution. Received: groups={layer.groups}")
        return choose_out(layer, ins[0])
    if isinstance(layer, L.BatchNormalization) and layer.axis not in (-1, len(tensors[0].shape) - 1):
        raise UnsupportedLayerError(
            f"BatchNormalization '{name}' normalizes axis {layer.axis}, not the channel axis. "
            f"Received: axis={layer.axis}")
    if isinstance(layer, PER_CHANNEL):
        return ins[0]
    if isinstance(layer, L.Activation):
        act = getattr(layer.activation, "__name__", str(layer.activation))
        if act in CHANNEL_MIXING_ACTIVATIONS and not ins[0].all():
            raise UnsupportedLayerError(
                f"Activation '{name}' ({act}) mixes channels but its input is split into fit "
                f"and reset channels. Received: layer={name}")
        return ins[0]
    if isinstance(layer, NEEDS_ALL_FIT):
        if not ins[0].all():
            raise UnsupportedLayerError(
                f"Layer '{name}' ({kind}) mixes channels but its input is split into fit and "
                f"reset channels; it may only follow the output layer. Received: layer={name}")
        return ins[0]
    if isinstance(layer, L.Concatenate):
        rank = len(tensors[0].shape)
        if layer.axis in (-1, rank - 1):
            return np.concatenate(ins)
    if isinstance(layer, ELEMENTWISE + (L.Concatenate,)):
        if any(s.shape != ins[0].shape or (s != ins[0]).any() for s in ins[1:]):
            raise UnsupportedLayerError(
                f"Layer '{name}' ({kind}) combines inputs whose fit channels differ; every "
                f"branch must keep the same channels. Received: layer={name}")
        return ins[0]
    if isinstance(layer, RESHAPING):
        return _reshape_set(ins[0], tensors[0].shape, layer.output.shape, layer)
    raise UnsupportedLayerError(
        f"Layer '{name}' of type {kind} is not supported by Split-Nets (KELS/slim). "
        f"Received: layer={name}")
