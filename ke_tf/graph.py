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
- DepthwiseConv2D (and Conv2D with groups = input channels): output channel c*m+j is fit iff
  input channel c is; a grouped convolution keeps the same channels in every group, its
  input (chosen so by what produces it, `ke_tf.masks`) and its output alike;
- Flatten / Reshape: the set broadcast over the input's spatial positions and reshaped, so a
  Flatten of an HxWxC map keeps the features i with (i mod C) fit; a Reshape must leave every
  output channel uniformly fit or reset;
- layers that mix all channels without a kernel (LayerNormalization, Softmax, L2
  normalization, a softmax activation), and MultiHeadAttention (KELS splits its heads
  inside it, `ke_tf.masks`), keep their inputs and output whole: every mixing layer whose output
  reaches them through channel-wise layers keeps all its filters (`whole_producers`);
- element-wise ops written between layers (`x + 3.0`, `x * y`: keras.ops in a functional graph,
  as MobileNetV3's hard sigmoid) combine channel by channel like Add and Multiply; an input
  broadcast over the channels (last dimension 1) or a number does not constrain them.

How a layer type's channels flow is a rule registered for it (`register_layer`), the package's
own layers included; a user's layer is taught the same way:

    ke_tf.graph.register_layer(MyScale, ke_tf.graph.PER_CHANNEL)   # output c follows input c
    ke_tf.graph.register_layer(MyGate, ke_tf.graph.ELEMENTWISE)    # several inputs, channel-wise
    ke_tf.graph.register_layer(MyNorm, ke_tf.graph.MIXES_ALL)      # needs its input whole
    ke_tf.graph.register_layer(MyOp, lambda layer, sets: ...)      # any rule: sets -> out set

A layer with no rule raises `UnsupportedLayerError` naming it and saying how to register it.
A registered layer's own weights are never split (like BatchNorm's, sec. 3.1): its
per-channel weights (last dimension = its input channels) are sliced for the slim network.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Union

import keras
import numpy as np

from ke_tf import internals
from ke_tf.config import ConfigError

L = keras.layers

# Layers whose kernel mixes all input channels into all output channels.
MIXING = (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense, L.SeparableConv1D, L.SeparableConv2D)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
PER_CHANNEL_LAYERS = (
    L.BatchNormalization, L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
    L.AveragePooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.Rescaling, L.Normalization, L.Identity,
    L.Activation,  # a channel-mixing one (softmax) is told apart first: `_mixes_all`
    L.ActivityRegularization,
)
ELEMENTWISE_LAYERS = (L.Add, L.Multiply, L.Subtract, L.Average, L.Maximum, L.Minimum)
RESHAPING = (L.Flatten, L.Reshape)
# Layers that mix channels without weights: fine only where every channel is fit.
MIXES_ALL_LAYERS = (L.Softmax, L.UnitNormalization, L.LayerNormalization)
CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


# The rules a layer type can be registered with (`register_layer`).
PER_CHANNEL = "per_channel"  # output channel c follows input channel c
ELEMENTWISE = "elementwise"  # several inputs of the same channels, combined channel-wise
MIXES_ALL = "mixes_all"  # every output depends on every input channel: inputs stay whole
Rule = Union[str, Callable[[object, List[np.ndarray]], np.ndarray]]
_RULES: Dict[object, Rule] = {}  # layer class, or a class name for Keras-internal classes


def register_layer(layer_type: Union[type, str], rule: Rule) -> None:
    """Teach the graph code how the channels of `layer_type` (a Layer subclass; or, for a
    class Keras does not export, its name) flow: `PER_CHANNEL`, `ELEMENTWISE`, `MIXES_ALL`,
    or a function `(layer, input_sets) -> output_set` of boolean channel sets (True: fit). The
    most specific registered class of a layer's type wins; registering again replaces. (The
    slim network is rebuilt from the model's config, so a user's layer must also be known to
    Keras's serialization: `@keras.saving.register_keras_serializable()`.)"""
    if not (rule in (PER_CHANNEL, ELEMENTWISE, MIXES_ALL) or callable(rule)):
        raise ValueError(f"rule must be ke_tf.graph.PER_CHANNEL, ELEMENTWISE, MIXES_ALL or a "
                         f"function (layer, input_sets) -> output_set. Received: rule={rule!r}")
    if not (isinstance(layer_type, str) or isinstance(layer_type, type)):
        raise ValueError(f"layer_type must be a class or a class name. Received: "
                         f"layer_type={layer_type!r}")
    _RULES[layer_type] = rule


def rule_of(op) -> Optional[Rule]:
    """The registered rule of a layer or op (its class's or its nearest base class's), None
    if it has none."""
    for cls in type(op).__mro__:
        for key in (cls, cls.__name__):
            if key in _RULES:
                return _RULES[key]
    return None


for _type in PER_CHANNEL_LAYERS:
    register_layer(_type, PER_CHANNEL)
for _type in ELEMENTWISE_LAYERS:
    register_layer(_type, ELEMENTWISE)
for _type in MIXES_ALL_LAYERS:
    register_layer(_type, MIXES_ALL)
# keras.ops written between layers of a functional graph (their class names: keras.src.ops
# has no public classes): channel-wise maths, of one tensor or several broadcasting ones.
for _name in ("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum",
              "Power", "Negative", "Abs", "Square", "Sqrt", "Exp", "Log", "Tanh", "Sigmoid",
              "Relu", "Relu6", "HardSigmoid", "HardSilu", "Silu", "Gelu", "Elu", "Selu",
              "LeakyRelu", "Softplus", "Softsign", "Clip", "Cast", "Erf", "Reciprocal"):
    register_layer(_name, ELEMENTWISE)
# keras.applications' own layers (not exported): InceptionResNetV2 adds a scaled residual
# (x + scale * branch); ConvNeXt scales every channel by a learned gamma.
register_layer("CustomScaleLayer", ELEMENTWISE)
register_layer("LayerScale", PER_CHANNEL)


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


def _operations(model: keras.Model) -> list:
    """The operations of a functional model's graph, or of a Sequential's, in topological
    order, checked: ops ke_tf can follow, no layer called twice, nested models of one input
    and one output."""
    ops = model.operations if hasattr(model, "operations") else \
        keras.Model(model.inputs, model.outputs).operations  # a Sequential's own graph
    for op in ops:
        if not isinstance(op, keras.layers.Layer) and rule_of(op) is None:
            raise UnsupportedLayerError(
                f"Operation '{op.name}' ({type(op).__name__}) is an op in the functional graph "
                "whose channels ke_tf cannot follow; wrap it in a layer and register that "
                "(ke_tf.graph.register_layer). Received: operation=" + op.name)
        if isinstance(op, keras.Model) and (len(op.inputs) != 1 or len(op.outputs) != 1):
            raise UnsupportedLayerError(
                f"Layer '{op.name}' ({type(op).__name__}) is a nested model with "
                f"{len(op.inputs)} inputs and {len(op.outputs)} outputs; ke_tf follows nested "
                f"models of one input and one output. Received: layer={op.name}")
        sequential = not hasattr(model, "operations")  # calls each of its layers once
        if isinstance(op, keras.layers.Layer) and not sequential and internals.call_count(op) > 1:
            raise UnsupportedLayerError(
                f"Layer '{op.name}' ({type(op).__name__}) is shared (called "
                f"{internals.call_count(op)} times); shared layers are not supported. "
                f"Received: layer={op.name}")
    return list(ops)


def layers_in_order(model: keras.Model) -> List[keras.layers.Layer]:
    """The model's layers (and keras.ops ops) in topological order, the layers of nested
    models (a Sequential or functional model inside the graph, ConvNeXt's stem) in place of
    them; rejects graphs this module cannot walk."""
    out = []
    for op in _operations(model):
        out += layers_in_order(op) if isinstance(op, keras.Model) else [op]
    return out


def _links(model: keras.Model) -> Dict[int, object]:
    """{id(input tensor of a nested model's own graph): the tensor that feeds it outside}."""
    links = {}
    for op in _operations(model):
        if isinstance(op, keras.Model):
            links[id(op.inputs[0])] = _inputs(op)[0]
            links.update(_links(op))
    return links


def _producer(tensor, links: Dict[int, object]):
    """The leaf layer or op that made `tensor`, looking through nested models (into their
    output, out of their input) with `links`."""
    op = internals.producer(tensor)
    while True:
        if isinstance(op, keras.Model):
            tensor = op.outputs[0]
        elif isinstance(op, L.InputLayer) and id(tensor) in links:
            tensor = links[id(tensor)]
        else:
            return op
        op = internals.producer(tensor)


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
    names, links = [], _links(model)
    for out in model.outputs:
        layer = _producer(out, links)
        while not isinstance(layer, MIXING + DEPTHWISE):
            ins = _inputs(layer) if not isinstance(layer, L.InputLayer) else []
            if len(ins) != 1 or getattr(layer, "weights", None):
                raise UnsupportedLayerError(
                    f"Cannot find the output layer of the model: '{layer.name}' "
                    f"({type(layer).__name__}) stands between it and the output. "
                    f"Received: layer={layer.name}")
            layer = _producer(ins[0], links)
        names.append(layer.name)
    return names


def whole_producers(model: keras.Model) -> set:
    """Names of the mixing layers (Conv, Dense) that must keep all their filters under KELS:
    their output reaches, through channel-wise layers only, a layer that mixes all channels
    without a kernel (LayerNormalization, Softmax, ...), whose input stays whole. In a
    transformer block this keeps the residual stream whole (every projection into it) while
    the MLP's hidden width is split."""
    found, seen, links = set(), set(), _links(model)

    def walk(tensor) -> None:
        op = _producer(tensor, links)
        if id(op) in seen:
            return
        seen.add(id(op))
        if isinstance(op, MIXING) and not channel_wise_groups(op):
            found.add(op.name)
        elif isinstance(op, DEPTHWISE + RESHAPING + (L.Concatenate, L.Activation)) or \
                channel_wise_groups(op) or \
                rule_of(op) in (PER_CHANNEL, ELEMENTWISE):
            width = _channels(op.output)
            for t in _inputs(op):  # a Concatenate's every input; a broadcast one: none
                if _channels(t) == width or isinstance(op, (L.Concatenate,) + RESHAPING):
                    walk(t)

    for op in layers_in_order(model):
        if _mixes_all(op):
            for t in _inputs(op):
                walk(t)
    return found


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
    """Fit-channel sets of every layer's inputs and output, in topological order, by layer
    name (the layers of nested models too, and each nested model: its input and output).

    `choose_out(layer, in_set)` returns the output channel set of a MIXING layer given its
    input set; for SeparableConv layers it receives the depthwise half's output set."""
    flows: Dict[str, Flow] = {}
    _flow(model, {}, flows, choose_out)
    return flows


def _flow(model, sets: Dict[int, np.ndarray], flows: Dict[str, Flow], choose_out) -> None:
    """`channel_flow` of one graph; `sets` (id(KerasTensor) -> channel set) holds the sets of
    a nested model's inputs when it is entered."""
    for layer in _operations(model):
        if layer.name in flows:
            raise UnsupportedLayerError(
                f"Two layers of the model are named '{layer.name}' (one inside a nested model): "
                f"ke_tf tells layers apart by name. Received: layer={layer.name}")
        if isinstance(layer, L.InputLayer):
            out = sets.setdefault(id(layer.output), np.ones(_channels(layer.output), bool))
            flows[layer.name] = Flow([], out)
            continue
        tensors, output = _call_in(layer, sets)
        ins = [sets[id(t)] for t in tensors]
        if isinstance(layer, keras.Model):  # its own graph, fed by the outer tensor's set
            sets[id(layer.inputs[0])] = ins[0]
            _flow(layer, sets, flows, choose_out)
            out = sets[id(layer.outputs[0])]
        else:
            out = _output_set(layer, tensors, ins, choose_out)
        if out.shape != (_channels(layer.output),):
            raise UnsupportedLayerError(
                f"Channel bookkeeping failed at layer '{layer.name}' ({type(layer).__name__}). "
                f"Received: layer={layer.name}")
        flows[layer.name] = Flow(ins, out)
        sets[id(output)] = out


def _call_in(op, sets: Dict[int, np.ndarray]) -> tuple:
    """(input tensors, output tensor) of the call of `op` in the graph being walked: the last
    call whose inputs the walk has reached (a Sequential rebuilt from its config holds an
    earlier call of its first layer that its graph does not use)."""
    calls = [(ins, outs) for ins, outs in internals.node_tensors(op)
             if all(id(t) in sets for t in ins)]
    if not calls:
        return _inputs(op), op.output
    ins, outs = calls[-1]
    return ins, outs[0]


def attention_variables(layer) -> Dict[str, object]:
    """{"query/kernel": variable, ...} of a `MultiHeadAttention`: the query, key and value
    projections ([D, heads, dim] kernels, [heads, dim] biases) and the output projection
    ([heads, dim, D] kernel, [D] bias). Refuses a gated one (Keras 3.15's use_gate)."""
    if layer.get_config().get("use_gate"):
        raise UnsupportedLayerError(
            f"MultiHeadAttention '{layer.name}' is gated (use_gate=True); ke_tf splits the "
            f"heads of ungated attention. Received: layer={layer.name}")
    return {"/".join(v.path.split("/")[-2:]): v for v in layer.weights}


def channel_wise_groups(layer) -> bool:
    """A grouped convolution with one input channel a group (Conv2D(groups=C_in)): depthwise,
    its output channel j*m+k made of input channel j alone, like DepthwiseConv2D."""
    groups = getattr(layer, "groups", 1)
    return isinstance(layer, MIXING) and groups > 1 and _channels(layer.input) == groups


def _mixes_all(layer) -> bool:
    """Whether `layer` needs its inputs whole and gives a whole output: it combines all input
    channels into each output without a kernel KELS splits (registered MIXES_ALL, a softmax
    activation) or is attention, whose heads KELS splits inside it (`attention_heads`)."""
    if isinstance(layer, L.MultiHeadAttention):
        return True
    if isinstance(layer, L.Activation):
        act = getattr(layer.activation, "__name__", str(layer.activation))
        return act in CHANNEL_MIXING_ACTIVATIONS
    return rule_of(layer) == MIXES_ALL and not isinstance(layer, MIXING + DEPTHWISE)


def _output_set(layer, tensors, ins, choose_out) -> np.ndarray:
    name, kind = layer.name, type(layer).__name__
    if isinstance(layer, MIXING + DEPTHWISE + PER_CHANNEL_LAYERS) and getattr(
            layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(
            f"Layer '{name}' is channels_first; only channels_last graphs are supported. "
            f"Received: data_format={layer.data_format}")
    if isinstance(layer, DEPTHWISE):
        return np.repeat(ins[0], layer.depth_multiplier)
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        return choose_out(layer, np.repeat(ins[0], layer.depth_multiplier))
    if channel_wise_groups(layer):  # groups == input channels: a depthwise convolution
        return np.repeat(ins[0], layer.filters // layer.groups)
    if isinstance(layer, MIXING):
        groups = getattr(layer, "groups", 1)
        if groups > 1 and not (ins[0].reshape(groups, -1) == ins[0][:len(ins[0]) // groups]).all():
            raise GroupConflict(layer, tensors[0])
        return choose_out(layer, ins[0])
    if isinstance(layer, L.BatchNormalization) and layer.axis not in (-1, len(tensors[0].shape) - 1):
        raise UnsupportedLayerError(
            f"BatchNormalization '{name}' normalizes axis {layer.axis}, not the channel axis. "
            f"Received: axis={layer.axis}")
    if _mixes_all(layer):
        if not all(s.all() for s in ins):
            raise UnsupportedLayerError(
                f"Layer '{name}' ({kind}) mixes all channels but its input is split into fit "
                f"and reset channels. Received: layer={name}")
        return np.ones(_channels(layer.output), bool)
    if isinstance(layer, L.Concatenate):
        rank = len(tensors[0].shape)
        if layer.axis in (-1, rank - 1):
            return np.concatenate(ins)
        return _merge(layer, tensors, ins)
    if isinstance(layer, RESHAPING):
        return _reshape_set(ins[0], tensors[0].shape, layer.output.shape, layer)
    rule = rule_of(layer)
    if rule == PER_CHANNEL:
        return ins[0]
    if rule == ELEMENTWISE:
        return _merge(layer, tensors, ins)
    if callable(rule):
        return np.asarray(rule(layer, ins), bool)
    raise UnsupportedLayerError(
        f"Layer '{name}' of type {kind} is not supported by Split-Nets (KELS/slim): register "
        f"how its channels flow, e.g. ke_tf.graph.register_layer({kind}, "
        f"ke_tf.graph.PER_CHANNEL), or use --split_mode=wels. Received: layer={name}")


class MergeConflict(UnsupportedLayerError):
    """A layer that combines inputs channel by channel got different fit channel sets:
    `tensors` and their `sets`, the ones of the output's width. `ke_tf.masks` resolves it by
    giving the branches' free producers one set (`free_producers`)."""

    def __init__(self, layer, tensors, sets):
        super().__init__(
            f"Layer '{layer.name}' ({type(layer).__name__}) combines inputs whose fit channels "
            "differ and no choice of filters makes them equal; use --split_mode=wels. "
            f"Received: layer={layer.name}")
        self.layer, self.tensors, self.sets = layer, tensors, sets


def _merge(layer, tensors, ins) -> np.ndarray:
    """Inputs combined channel by channel: those with the output's channels must hold the same
    set (KELS gives every branch the same first-k prefix, or `ke_tf.masks` one solved set); an
    input broadcast over the channels (last dimension 1) does not constrain them."""
    width = _channels(layer.output)
    full = [(t, s) for t, s in zip(tensors, ins) if _channels(t) == width]
    if any(s.shape != full[0][1].shape or (s != full[0][1]).any() for _, s in full[1:]):
        raise MergeConflict(layer, [t for t, _ in full], [s for _, s in full])
    return full[0][1] if full else np.ones(width, bool)


class GroupConflict(UnsupportedLayerError):
    """A grouped convolution's input does not keep the same channels in every group (what a
    slim grouped convolution needs): `tensor`'s free producers must choose per group
    (`ke_tf.masks`)."""

    def __init__(self, layer, tensor):
        super().__init__(
            f"Layer '{layer.name}' is a grouped convolution ({layer.groups} groups) whose input "
            "channels cannot keep the same fit channels in every group; use --split_mode=wels. "
            f"Received: layer={layer.name}")
        self.layer, self.tensor = layer, tensor


def free_producers(model: keras.Model, tensor, links=None) -> Optional[List[str]]:
    """The mixing layers (Conv, Dense) whose chosen filters alone decide the fit channels of
    `tensor` (of `model`'s graph), through channel-wise layers and merges of the same width;
    None if something else decides them too (the image, a Concatenate, a depthwise
    multiplier, a reshape)."""
    links = _links(model) if links is None else links
    op = _producer(tensor, links)
    if isinstance(op, MIXING) and not channel_wise_groups(op):
        return [op.name]
    one_to_one = (isinstance(op, DEPTHWISE) and op.depth_multiplier == 1) or (
        channel_wise_groups(op) and op.filters == op.groups) or (
        not isinstance(op, MIXING + DEPTHWISE + RESHAPING + (L.Concatenate, L.InputLayer))
        and not _mixes_all(op) and rule_of(op) in (PER_CHANNEL, ELEMENTWISE))
    if not one_to_one:
        return None
    width, names = _channels(op.output), []
    for t in _inputs(op):
        if _channels(t) == width:
            found = free_producers(model, t, links)
            if found is None:
                return None
            names += found
    return names
