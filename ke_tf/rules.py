"""Every rule a run's flags must follow, run in one place: `check(config)`.

The command line (`ke_tf.main` through `ke_tf.presets`), the presets and `ke_tf.evolve` all
call `check`, and so does the `GenerationRunner` (a config built by hand from Python), so one
set of rules holds for every way a run starts. A broken rule raises `ConfigError` naming the
flag (the command line exits 2) before any data is read or any network built. The rules live
where their flags do and are run from here:

- each flag's own range and the rules between flags of `ke_tf.config` (`RunConfig.validate`);
- the method's own flags (`ke_tf.methods`: a method declares them as `Setting`s, each with
  its rule) and the method's rules (`Method.validate`);
- the generation a run ships (`ke_tf.selection`): --select_by names a validation metric of the
  task;
- the network: ke_tf's architectures need an image size they can shrink (`min_image_size`),
  a network given from Python needs --arch=custom and no --strategy;
- rules that need facts only the run knows, run where it knows them: `check_classes` (the
  loss and the number of classes), `check_replicas` (the global batch and the devices of
  --strategy) and `selection.check_validation` (a validation split to select by).
"""
from __future__ import annotations

from typing import Dict, Optional

from ke_tf import methods, selection
from ke_tf.config import CUSTOM_ARCH, ConfigError, RunConfig


def defaults() -> Dict[str, object]:
    """Every flag's default, flat: `RunConfig()`'s and every method's own."""
    return {**RunConfig().to_flags(),
            **{name: setting.default for name, setting in methods.settings().items()}}


def check(config: RunConfig, network_given: Optional[bool] = None) -> RunConfig:
    """`config` if it follows every rule that its flags alone decide, else ConfigError naming
    the flag. `network_given`: whether a network comes from Python (`ke_tf.evolve`; None: not
    known yet, the rules of --arch=custom wait for the runner)."""
    config.validate()
    names = methods.names()
    if config.method not in names:
        raise ConfigError(f"--method must be one of {', '.join(names)}. "
                          f"Received: method={config.method!r}")
    declared = methods.settings()
    unknown = sorted(set(config.method_flags) - set(declared))
    if unknown:
        raise ConfigError(f"unknown flags: {', '.join(unknown)} (no --method declares them). "
                          f"Received: {', '.join(f'{k}={config.method_flags[k]!r}' for k in unknown)}")
    for name, value in config.method_flags.items():
        declared[name].check(name, value)
    methods.get(config.method).validate(config)
    selection.check(config)
    _check_network(config, network_given)
    return config


def _check_network(config: RunConfig, network_given: Optional[bool]) -> None:
    from ke_tf import networks  # Keras: only once the flags have passed their own rules

    m = config.model
    if network_given is not None and network_given != (m.arch == CUSTOM_ARCH):
        raise ConfigError(f"--arch={m.arch}: a network given from Python needs "
                          f"arch={CUSTOM_ARCH!r}, and that arch needs one")
    if m.arch == CUSTOM_ARCH:
        if config.strategy != "none":
            raise ConfigError(f"--strategy={config.strategy} builds the network in the "
                              "strategy's scope: it cannot take a network built outside it")
        return
    size = config.data.image_size
    stem = m.stem or networks.default_stem(size)
    smallest = networks.min_image_size(m.arch, stem)
    if size < smallest:
        raise ConfigError(f"--image_size must be >= {smallest} for --arch={m.arch} with the "
                          f"{stem} stem. Received: image_size={size}")


def check_classes(config: RunConfig, num_classes: int) -> None:
    """The rules of the number of classes the data brought (known once it is read)."""
    if config.train.loss == "adacos" and num_classes < 3:
        # sqrt(2) ln(C - 1) = 0, and AdaCos's update keeps it there
        raise ConfigError(f"--loss=adacos needs at least 3 classes: with {num_classes} "
                          "AdaCos's scale sqrt(2) ln(C - 1) is 0 and stays 0 (nothing would be "
                          f"learned). Received: num_classes={num_classes}")


def check_replicas(config: RunConfig, replicas: int, workers: int) -> None:
    """ConfigError (exit 2) unless every one of the `replicas` of --strategy gets an equal share
    of the global batch (of its anchors and of their partners with CS-KD), as one process would
    compute."""
    share = 2 * replicas if config.train.regularizer == "cskd" else replicas
    batch = config.data.batch_size
    if batch % share:
        what = f"the {replicas} replicas"
        if share != replicas:
            what = (f"2 x {what} with --regularizer=cskd (each replica's share: its anchors, "
                    "then their partners)")
        raise ConfigError(f"--batch_size must divide by {what} of --strategy=multi_worker "
                          f"({workers} workers x {replicas // max(workers, 1)} device each): the "
                          f"global batch is split equally among them. Received: "
                          f"batch_size={batch}")
