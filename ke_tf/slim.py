"""The slim fit hypothesis H^Delta as a network of its own (sec. 3.2, appendix Table 6).

Under KELS the fit hypothesis of every layer is a block of the first filters over the fit input
channels, so H^Delta is a narrower network of the same graph: "equivalent to a dense network
with approximately (1 - s^2) sparsity" that runs on general-purpose hardware.

`architecture(model, masks)` re-creates every layer of the dense model's own functional graph
(from `model.get_config()`) with its fit channel count; `extract(model, masks)` also copies the
fit weights and the matching BatchNorm slices into it. Channel sets are read back from the masks
and followed through the graph by `ke_tf.graph`, so any supported graph works, keras.applications
models included. Invariant (tested): in inference mode `extract(model, masks)(x)` equals the
dense model with its reset hypothesis zeroed. (AdaCos's cosine classifier, `--loss=adacos`,
normalises its input over all features, reset ones included: there the two agree up to a
positive factor per image, the same ranking, and exactly where the reset features are 0.)
"""
from __future__ import annotations

from typing import Dict

import keras
import numpy as np

from ke_tf import graph
from ke_tf import masks as masks_lib


class NotKernelLevelError(ValueError):
    """The masks do not outline a slim network (e.g. WELS masks)."""


def _channel_flow(model: keras.Model, masks: masks_lib.Masks) -> Dict[str, graph.Flow]:
    """Channel sets of every layer, reading each mixing layer's kept filters from its mask."""

    def choose_out(layer, in_set):
        kernel = layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel
        mask = masks.get(kernel.path)
        if mask is None:
            raise ValueError(f"No mask for layer '{layer.name}'. Received: variable={kernel.path}")
        out = mask.reshape(-1, mask.shape[-1]).any(axis=0)
        per_group = in_set[:mask.shape[-2]] if getattr(layer, "groups", 1) > 1 else in_set
        if not np.array_equal(mask, np.broadcast_to(np.outer(per_group, out), mask.shape)):
            raise NotKernelLevelError(
                f"The mask of '{kernel.path}' is not kernel-level (fit input channels x first "
                "filters), so the fit hypothesis is no slim network; slim extraction needs KELS "
                f"masks. Received: variable={kernel.path}")
        return out

    return graph.channel_flow(model, choose_out)


def _heads(model: keras.Model, masks: masks_lib.Masks) -> Dict[str, np.ndarray]:
    """{attention layer name: its fit heads}, read from the query kernel's mask."""
    out = {}
    for layer in graph.layers_in_order(model):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            variables = graph.attention_variables(layer)
            mask = masks.get(variables["query/kernel"].path)
            if mask is None:
                raise ValueError(f"No mask for layer '{layer.name}'. Received: "
                                 f"variable={variables['query/kernel'].path}")
            heads = mask.any(axis=(0, 2))
            if not np.array_equal(mask, np.broadcast_to(heads[None, :, None], mask.shape)):
                raise NotKernelLevelError(
                    f"The mask of '{variables['query/kernel'].path}' does not keep whole "
                    "attention heads, so the fit hypothesis is no slim network; slim "
                    f"extraction needs KELS masks. Received: layer={layer.name}")
            out[layer.name] = heads
    return out


def architecture(model: keras.Model, masks: masks_lib.Masks) -> keras.Model:
    """The slim network's architecture with fresh (untrained) weights.

    Every layer of `model` is re-created from its config with its fit channel count: Conv
    `filters` and Dense `units` become the number of kept filters, and Reshape targets follow.
    This is also the "train the slim network from scratch" baseline."""
    return _rebuild(model, _channel_flow(model, masks), _heads(model, masks))


def _rebuild(model: keras.Model, flows: Dict[str, graph.Flow],
             heads: Dict[str, np.ndarray]) -> keras.Model:
    config = model.get_config()
    config["name"] = f"{model.name}_slim"
    _narrow(config["layers"], flows, heads)
    return keras.Model.from_config(config)


def _narrow(layer_configs: list, flows: Dict[str, graph.Flow],
            heads: Dict[str, np.ndarray]) -> None:
    """Every layer config of a graph (and of the graphs of nested models) with its fit
    channel count: Conv `filters`, Dense `units`, Reshape targets, a nested model's input."""
    for layer_config in layer_configs:
        layer_config.pop("build_config", None)
        layer_config.pop("compile_config", None)
        cfg, kind = layer_config["config"], layer_config["class_name"]
        if kind in ("Functional", "Sequential"):
            _narrow(cfg["layers"], flows, heads)
            if cfg.get("build_input_shape"):
                cfg["build_input_shape"] = _narrowed(cfg["build_input_shape"],
                                                     flows[cfg["name"]].inputs[0])
            continue
        kept = int(flows[cfg["name"]].output.sum())
        if "filters" in cfg:
            cfg["filters"] = kept
            if cfg.get("groups", 1) == len(flows[cfg["name"]].inputs[0]) > 1:
                cfg["groups"] = int(flows[cfg["name"]].inputs[0].sum())  # depthwise-grouped
        elif kind == "Dense":
            cfg["units"] = kept
        elif kind == "Reshape" and cfg["target_shape"][-1] != -1:
            cfg["target_shape"] = tuple(cfg["target_shape"][:-1]) + (kept,)
        elif cfg["name"] in heads:  # MultiHeadAttention: its fit heads
            cfg["num_heads"] = int(heads[cfg["name"]].sum())
        elif kind == "InputLayer" and cfg.get("batch_shape"):  # a nested model's input
            cfg["batch_shape"] = _narrowed(cfg["batch_shape"], flows[cfg["name"]].output)


def _narrowed(shape, channel_set: np.ndarray) -> tuple:
    return tuple(shape[:-1]) + (int(channel_set.sum()),)


def _slice(layer, var, value: np.ndarray, flow: graph.Flow) -> np.ndarray:
    """The fit part of one variable of `layer`, in the slim layer's layout."""
    in_idx = np.flatnonzero(flow.inputs[0]) if flow.inputs else None
    out_idx = np.flatnonzero(flow.output)
    if var is getattr(layer, "bias", None):
        return value[out_idx]
    if isinstance(layer, graph.DEPTHWISE) or var is getattr(layer, "depthwise_kernel", None):
        return value[..., in_idx, :]
    if var is getattr(layer, "pointwise_kernel", None):
        mid_idx = np.flatnonzero(np.repeat(flow.inputs[0], layer.depth_multiplier))
        return value[..., mid_idx, :][..., out_idx]
    if graph.channel_wise_groups(layer):  # [kh, kw, 1, C_out]
        return value[..., out_idx]
    if isinstance(layer, graph.MIXING):  # grouped: the fit channels of one group (all alike)
        if getattr(layer, "groups", 1) > 1:
            in_idx = np.flatnonzero(flow.inputs[0][:value.shape[-2]])
        return value[..., in_idx, :][..., out_idx]
    # Per-channel variables (BatchNorm gamma/beta/moving statistics, Normalization mean/var).
    if in_idx is not None and value.ndim and value.shape[-1] == len(flow.inputs[0]):
        return value[..., in_idx]
    return value


def extract(model: keras.Model, masks: masks_lib.Masks) -> keras.Model:
    """The slim network H^Delta holding the fit-hypothesis weights of `model`.

    Args:
      model: the dense functional network N.
      masks: KELS masks of `model` (`ke_tf.masks.compute(model, "kels", s)`).
    Returns:
      A new functional `keras.Model`, same layer names, fit channels only.
    Raises:
      NotKernelLevelError: the masks are not kernel-level (WELS).
    """
    flows, heads = _channel_flow(model, masks), _heads(model, masks)
    small = _rebuild(model, flows, heads)
    _copy(model, flows, heads, small)
    return small


def copy_fit_weights(model: keras.Model, masks: masks_lib.Masks, target: keras.Model) -> None:
    """Load the fit hypothesis of `model` into an existing slim network `target` (built by
    `architecture` or `extract`), so a run re-uses one slim model (and its compiled functions)
    across generations."""
    _copy(model, _channel_flow(model, masks), _heads(model, masks), target)


def _copy(model: keras.Model, flows: Dict[str, graph.Flow], heads: Dict[str, np.ndarray],
          target: keras.Model) -> None:
    targets = {layer.name: layer for layer in graph.layers_in_order(target)}  # nested too
    for layer in graph.layers_in_order(model):
        if layer.name in heads:  # attention: [D, heads, dim], [heads, dim], [heads, dim, D]
            keep = np.flatnonzero(heads[layer.name])
            targets[layer.name].set_weights(
                [v.numpy()[:, keep] if v.path.endswith(("query/kernel", "key/kernel",
                                                        "value/kernel"))
                 else v.numpy() if v.path.endswith("attention_output/bias")
                 else v.numpy()[keep] for v in layer.weights])
        elif getattr(layer, "weights", None):  # a keras.ops op of the graph has none
            targets[layer.name].set_weights(
                [_slice(layer, v, v.numpy(), flows[layer.name]) for v in layer.weights])


def recalibrate_batchnorm(model: keras.Model, batches, max_images: int) -> int:
    """Re-estimate every BatchNorm's moving statistics of `model` on `batches` (beyond the paper).

    The extracted slim network keeps the dense network's BatchNorm statistics, which were
    gathered while the reset hypothesis also fed the fit channels; early generations' H_g then
    sits near chance. Running the slim network in training mode over un-augmented training
    images, with momentum (k-1)/k at the k-th batch, sets the statistics to the average of the
    batch statistics. Weights are not changed. Returns the number of images used."""
    bns = [layer for layer in graph.layers_in_order(model)  # nested models' too
           if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in bns]
    seen, k = 0, 0
    try:
        for x, _ in batches:
            if seen >= max_images:
                break
            k += 1
            for layer in bns:
                layer.momentum = (k - 1) / k
            model(x[: max_images - seen], training=True)
            seen += min(int(x.shape[0]), max_images - seen)
    finally:
        for layer, momentum in zip(bns, momenta):
            layer.momentum = momentum
    return seen
