"""The slim KELS architecture (`ke_tf.slim.architecture` of a fresh dense network) trained from
scratch for g*e epochs: does KE's slim network H_g beat the same architecture trained alone?
Nothing is masked or reset; the one network evaluated is the slim one."""
from __future__ import annotations

from typing import Dict, Tuple

import keras

from ke_tf import masks as masks_lib, slim
from ke_tf.methods.base import Method, require


class SlimScratch(Method):
    name = "slim_scratch"

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        require(config.split.split_mode == "kels", "split_mode",
                "must be kels with --method=slim_scratch (the slim network is KELS's)",
                config.split.split_mode)

    def schedule(self) -> Tuple[int, int]:
        t = self.config.train
        return 1, t.generations * t.epochs

    def network(self, dense: keras.Model) -> keras.Model:
        return self.slim_architecture(dense, {})

    def networks_to_evaluate(self, network, masks) -> Dict[str, keras.Model]:
        return {"slim": network}

    def split_columns(self) -> Dict[str, object]:
        s = self.config.split
        return {"split_mode": s.split_mode, "split_rate": s.split_rate}

    def slim_architecture(self, dense, masks):
        """The KELS slim architecture of `dense` at --split_rate (no masks are saved)."""
        return slim.architecture(dense, masks_lib.compute(dense, "kels",
                                                          self.config.split.split_rate))
