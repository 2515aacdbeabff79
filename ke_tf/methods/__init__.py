"""The methods a run trains, one object per method behind one interface (`base.Method`).

Every method is trained by the same `GenerationRunner` loop; a method only answers the
questions that loop asks: how many generations of how many epochs (`schedule`), which network
is trained and with which masks (`network`, `initial_masks`), which networks are evaluated
every generation (`networks_to_evaluate`: dense N_g, slim H_g, H_g with re-estimated
BatchNorm statistics), what happens between two generations (`between_generations`: Eq. 1,
DSD's pruning, DNR's re-scoring, ...) and which flag combinations it accepts (`validate`); its own flags (`settings`, e.g.
--dsd_sparsity) are declared in its file too.

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

Adding a method: one file here with a `Method` subclass (its settings, rules and behaviour),
one line in `REGISTRY` and its name in `ke_tf.config.METHODS`, its tests. A method defined
outside the package is `register`ed instead (tests/test_methods.py shows one).
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
_REGISTERED: dict = {}  # name -> Method subclass defined outside this package (`register`)


def register(cls) -> None:
    """Make the `Method` subclass `cls` a --method value of this process (`cls.name`), e.g. a
    method a user or a test defines in its own file; the package's own are in `REGISTRY`."""
    if cls.name in REGISTRY:
        raise ValueError(f"--method={cls.name} is one of ke_tf's own methods. "
                         f"Received: name={cls.name!r}")
    _REGISTERED[cls.name] = cls


def names() -> tuple:
    """Every --method value: the package's own, then the registered ones."""
    return NAMES + tuple(_REGISTERED)


def get(name: str):
    """The `Method` subclass registered as `name` (a --method value)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in REGISTRY:
        raise KeyError(f"no method {name!r}; the methods are {', '.join(names())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def settings() -> dict:
    """{flag name: `base.Setting`} of every method's own flags (a flag two methods share, such
    as DSD's --dsd_sparsity, once)."""
    out = {}
    for name in names():
        out.update(get(name).settings)
    return out


def create(config):
    """The method of `config.method`, bound to the run's (validated) `RunConfig`."""
    return get(config.method)(config)
