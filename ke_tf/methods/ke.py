"""Knowledge Evolution (sec. 3.1, Algorithm 1): a fixed split of the network into a fit
hypothesis H (mask = 1) and a reset hypothesis R; after every generation R is re-drawn from the
layers' initializers (Eq. 1) while H and every BatchNorm variable are kept.

- KELS (sec. 3.2, kernel level): the first ceil(s * C) filters of every layer are H, so H is a
  slim network of its own (`ke_tf.slim`), evaluated every generation as H_g (as extracted and
  with re-estimated BatchNorm statistics) next to the dense N_g.
- WELS (weight level): a random share s of every kernel's weights is H; with --wels_rand a new
  random mask every generation (appendix D(1)).
"""
from __future__ import annotations

from typing import Dict

import keras

from ke_tf import masks as masks_lib, slim
from ke_tf.methods.base import Method


class KnowledgeEvolution(Method):
    name = "ke"

    @classmethod
    def validate(cls, config) -> None:
        pass  # every split flag applies

    def initial_masks(self, network: keras.Model) -> masks_lib.Masks:
        s = self.config.split
        return masks_lib.compute(network, s.split_mode, s.split_rate, seed=self.config.seed)

    def networks_to_evaluate(self, network, masks) -> Dict[str, keras.Model]:
        nets = {"dense": network}
        if self.config.split.split_mode == "kels":
            nets.update(self.kels_slim_networks(network, masks))
        return nets

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        s, masks = self.config.split, run.masks
        if s.wels_rand:  # appendix D(1): a new random mask for every generation
            masks = masks_lib.compute(run.network, "wels", s.split_rate,
                                      seed=(self.config.seed, generation + 1))
        self.reinitialize(run.network, masks, generation)
        return masks

    def split_columns(self) -> Dict[str, object]:
        s = self.config.split
        return {"split_mode": s.split_mode, "split_rate": s.split_rate}

    def slim_architecture(self, dense, masks):
        return slim.architecture(dense, masks)
