"""The equal-budget baseline: one generation trained for g*e epochs with one schedule (the fair
comparison for any g-generation method, sec. 4.1). Its masks and slim networks are KE's, so the
slim network of a long run is evaluated too: how good is H without the generations?"""
from __future__ import annotations

from typing import Tuple

from ke_tf.methods.ke import KnowledgeEvolution


class Long(KnowledgeEvolution):
    name = "long"

    @classmethod
    def validate(cls, config) -> None:
        super(KnowledgeEvolution, cls).validate(config)  # no --wels_rand: nothing is re-drawn

    def schedule(self) -> Tuple[int, int]:
        t = self.config.train
        return 1, t.generations * t.epochs
