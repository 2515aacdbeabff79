"""Later-layer forgetting (Zhou et al., "Fortuitous forgetting", ICLR 2022): the reset
hypothesis is every kernel of the layers from a named block onward (`--reset_from=layer4` for
ResNet18, which also resets the classifier), re-initialized after every generation as KE's
(Eq. 1); earlier layers, every bias and every BatchNorm are kept."""
from __future__ import annotations

import keras
import numpy as np

from ke_tf import graph, masks as masks_lib
from ke_tf.config import ConfigError
from ke_tf.methods.base import Method, Setting


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


class LaterLayerForgetting(Method):
    name = "llf"
    settings = {"reset_from": Setting("layer4", "--method=llf: name prefix of the first layer reset.",
                                      kind="string", ok=bool, rule="must name a layer prefix")}

    def initial_masks(self, network: keras.Model) -> masks_lib.Masks:
        return llf_masks(network, self.setting("reset_from"))

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        self.reinitialize(run.network, run.masks, generation)
        return run.masks
