"""The methods a run trains, one object per method behind one interface (`base.Method`).

Every method is trained by the same `GenerationRunner` loop; a method only answers the
questions that loop asks: how many generations of how many epochs (`schedule`), which network
is trained and with which masks (`network`, `initial_masks`), which networks are evaluated
every generation (`networks_to_evaluate`: dense N_g, slim H_g, H_g with re-estimated
BatchNorm statistics), what happens between two generations (`between_generations`: Eq. 1,
DSD's pruning, DNR's re-scoring, ...) and which flag combinations it accepts (`validate`).

| --method | file | paper |
|---|---|---|
| ke | `ke.py` | Knowledge Evolution (sec. 3) |
| long | `long.py` | one generation of g*e epochs: the equal-budget baseline |
| slim_scratch | `slim_scratch.py` | the slim KELS architecture trained from scratch |
| llf | `llf.py` | later-layer forgetting (Zhou et al., ICLR 2022) |
| dsd | `dsd.py` | KE+DSD (appendix C.1) |
| dnr | `dnr.py` | dynamic neural regeneration (Ramkumar et al., NeurIPS 2024) |
| repr | `repr.py` | RePr (Prakash et al., CVPR 2019): redundant filters dropped, re-initialized orthogonally |
| bans | `bans.py` | Born-Again Networks (Furlanello et al., ICML 2018): each generation distilled from the last |
| dsd_only | `dsd_only.py` | Dense-Sparse-Dense (Han et al., ICLR 2017), once: the paper's DSD baseline row |

Adding a method: one file here with a `Method` subclass, one line in `REGISTRY`, its tests.
The modules are imported when a method is first asked for, so that the command line parses its
flags (and answers --help or bad usage) without loading TensorFlow.
"""
from __future__ import annotations

import importlib

# --method value -> "module:class" in this package.
REGISTRY = {
    "ke": "ke:KnowledgeEvolution",
    "long": "long:Long",
    "slim_scratch": "slim_scratch:SlimScratch",
    "llf": "llf:LaterLayerForgetting",
    "dsd": "dsd:DenseSparseDense",
    "dnr": "dnr:DynamicNeuralRegeneration",
    "repr": "repr:RePr",
    "bans": "bans:BornAgainNetworks",
    "dsd_only": "dsd_only:DSDOnly",
}
NAMES = tuple(REGISTRY)


def get(name: str):
    """The `Method` subclass registered as `name` (a --method value)."""
    if name not in REGISTRY:
        raise KeyError(f"no method {name!r}; the methods are {', '.join(NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def create(config):
    """The method of `config.method`, bound to the run's (validated) `RunConfig`."""
    return get(config.method)(config)
