"""The interface every method implements, and the defaults most methods share.

A `Method` is bound to a validated `RunConfig` and answers the GenerationRunner's questions; it
holds no training state of its own (the runner holds the network, masks and optimizer, and
`ke_tf.state.RunState` where the run stands), so a resumed run rebuilds the same method from
the same config and goes on.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import keras
import numpy as np

from ke_tf import masks as masks_lib, reinit, slim
from ke_tf.config import ConfigError, RunConfig


def require(cond: bool, flag: str, msg: str, value) -> None:
    """A method's flag rule: ConfigError naming `flag` unless `cond`."""
    if not cond:
        raise ConfigError(f"--{flag} {msg}. Received: {flag}={value!r}")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag of a method (e.g. --dsd_sparsity): its default, one line of help for --helpfull,
    its type ("float", "integer", "enum", "string"; `choices` for an enum) and its rule: `ok`
    (a predicate of the value; None passes when the default is None) and what `rule` says of
    it ("must be in (0, 1)"). The command line defines it, `RunConfig.method_flags` holds its
    value, `ke_tf.rules.check` applies the rule."""

    default: object
    help: str
    kind: str = "float"
    ok: Callable[[object], bool] = lambda value: True
    rule: str = ""
    choices: Tuple[str, ...] = ()

    def check(self, name: str, value) -> None:
        if value is None and self.default is None:
            return
        allowed = value in self.choices if self.kind == "enum" else self.ok(value)
        require(allowed, name, self.rule or f"must be one of {', '.join(self.choices)}", value)


class Method:
    """The defaults: g generations of e epochs, the dense network trained and evaluated, no
    masks, nothing done between generations. Subclasses override what their method changes."""

    name = ""  # the --method value
    settings: Dict[str, Setting] = {}  # the method's own flags, by name

    def __init__(self, config: RunConfig):
        self.config = config

    def setting(self, name: str):
        """The value of the method's own flag `name`: the run's, else its default."""
        return self.config.method_flags.get(name, self.settings[name].default)

    @classmethod
    def validate(cls, config: RunConfig) -> None:
        """The method's own cross-flag rules; raises ConfigError naming the flag."""
        require(not config.split.wels_rand, "wels_rand",
                f"only applies to --method=ke (got --method={cls.name})", config.split.wels_rand)

    def schedule(self) -> Tuple[int, int]:
        """(generations, epochs per generation) this method trains."""
        return self.config.train.generations, self.config.train.epochs

    def network(self, dense: keras.Model) -> keras.Model:
        """The network trained, given the freshly built dense N."""
        return dense

    def initial_masks(self, network: keras.Model) -> masks_lib.Masks:
        """The masks of generation 1 ({variable path: bool array}, fit = True)."""
        return {}

    def held_at_zero(self, network: keras.Model) -> Sequence[str]:
        """Paths of the variables the method may pin to zero after every step (DSD)."""
        return ()

    def teacher(self, network: keras.Model):
        """The distillation of every training step (`KEModel`'s `teacher`): (frozen teacher
        network, temperature, weight as a tf.Variable), built once from the trained `network`
        (Born-Again Networks); None (the default): no teacher."""
        return None

    def networks_to_evaluate(self, network: keras.Model,
                             masks: masks_lib.Masks) -> Dict[str, keras.Model]:
        """{row name: network} evaluated every generation, built once. A network other than
        `network` is a slim one: the runner copies the fit hypothesis into it before it is
        evaluated, and "slim_recal" has its BatchNorm statistics re-estimated first."""
        return {"dense": network}

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        """After generation `generation` (< G) was evaluated: change the weights for the next
        one, and return the masks it uses. `run` is the GenerationRunner (read `run.network`,
        `run.masks`, `run.model`, `run.data`); a new masks object is saved as masks.npz."""
        return run.masks

    def after_epoch(self, run, epoch: int) -> masks_lib.Masks:
        """After epoch `epoch` (1-based, within the generation) was trained and before it is
        checkpointed: a method that changes the weights during a generation (RePr, DSD's
        phases) does it here. Returns the masks in use, like `between_generations`."""
        return run.masks

    def arrays(self, run) -> Dict[str, np.ndarray]:
        """The method's own arrays that `checkpoints/last` keeps (e.g. a teacher's weights):
        {} for most methods. `restore` puts them back when a run is resumed."""
        return {}

    def restore(self, run, arrays: Dict[str, np.ndarray]) -> None:
        pass

    def split_columns(self) -> Dict[str, object]:
        """The `split_mode` and `split_rate` cells of this method's results.csv rows."""
        return {}

    def slim_architecture(self, dense: keras.Model,
                          masks: masks_lib.Masks) -> Optional[keras.Model]:
        """The architecture of the slim network this method ships, rebuilt from a dense network
        and the saved masks (to load a kept generation); None if it ships none."""
        return None

    # --- shared by the methods that re-draw a reset hypothesis ----------------------------------

    def reinitialize(self, network: keras.Model, masks: masks_lib.Masks, generation: int) -> None:
        """Eq. 1, W = M*W + (1-M)*W_r with W_r drawn fresh for generation g+1 from the run seed
        (`reinit.reset`), or the ablations of the flags: --evolve_mode=zero (W_r = 0) and
        --fix_reset_seed (the same W_r in every generation)."""
        s = self.config.split
        if s.evolve_mode == "zero":
            reinit.apply(network, masks, reinit.zero_values(network, masks))
        else:
            seed = (self.config.seed, 1 if s.fix_reset_seed else generation)
            reinit.reset(network, masks, seed=seed, reset_init=s.reset_init)

    def kels_slim_networks(self, network: keras.Model,
                           masks: masks_lib.Masks) -> Dict[str, keras.Model]:
        """H_g as extracted ("slim") and, unless --slim_bn_recalibration=false, with re-estimated
        BatchNorm statistics ("slim_recal"): two copies of the KELS slim architecture."""
        nets = {"slim": slim.architecture(network, masks)}
        if self.config.train.slim_bn_recalibration:
            nets["slim_recal"] = slim.architecture(network, masks)
        return nets
