"""The run directory: a fresh start, a resume, and refusing another run's directory.

A run directory holds one run: config.json (its flags), masks.npz, results.csv,
hypotheses.csv, tensorboard/, checkpoints/ and export/ (`OUTPUTS`). The GenerationRunner asks
this module three things, beside its loop:

- `refuse_other_run(config)`, before any work: --run_dir must be new, or hold this very run
  (the same training flags: `config.differences`) to resume it, unless --overwrite;
- `start(run)`: a fresh directory and `RunState`, or the state and arrays of
  `checkpoints/last` put back into the runner (`restore`) to go on where the run stopped;
- `hooks(run, resumed)`: the hooks that write it as the run goes (TensorBoard, results.csv,
  checkpoints: the chief's only);
- `arrays(run)`: what `checkpoints/last` holds besides the state (`ke_tf.checkpoint` writes it).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Tuple

import numpy as np

from ke_tf import atomic, checkpoint, config as config_lib, distribution, masks as masks_lib
from ke_tf import results, rules, slim
from ke_tf.config import ConfigError, RunConfig
from ke_tf.hooks import Hook
from ke_tf.monitor import Monitor
from ke_tf.state import RunState

OUTPUTS = (results.RESULTS, results.HYPOTHESES, "config.json", "masks.npz", "tensorboard",
           "export", checkpoint.DIR, checkpoint.NETWORK_JSON)


def refuse_other_run(config: RunConfig) -> None:
    """Before any work: --run_dir must be new, or hold this very run (to resume)."""
    if config.overwrite:
        return
    run_dir = config.run_dir
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            saved = _flags_of_checkpoint(run_dir)
            if saved is None:
                raise ConfigError(f"--run_dir {run_dir}: {config_path} is unreadable ({err}) and "
                                  "no intact checkpoint holds the run's flags; pass --overwrite "
                                  "to replace the run") from err
            if not config_lib.differences(saved, config.to_flags(), defaults=rules.defaults()):
                with atomic.open_atomic(config_path) as f:
                    json.dump(saved, f, indent=2, sort_keys=True)
                print(f"{config_path} was unreadable ({err}): rewritten from "
                      f"{checkpoint.last_dir(run_dir)}")
        diff = config_lib.differences(saved, config.to_flags(), defaults=rules.defaults())
        if diff:
            raise ConfigError(f"--run_dir {run_dir} holds a run with other flags: "
                              f"{'; '.join(diff)}. Pass the same flags to resume it, "
                              "--overwrite to replace it, or choose another --run_dir")
        return
    used = [n for n in OUTPUTS if os.path.exists(os.path.join(run_dir, n))]
    if used:
        raise ConfigError(f"--run_dir {run_dir} already holds files of a run "
                          f"({', '.join(used)}) but no config.json; pass --overwrite to "
                          f"replace them or choose another --run_dir. "
                          f"Received: run_dir={run_dir!r}")


def _flags_of_checkpoint(run_dir: str):
    """The run's flags as its intact `checkpoints/last` (or `previous`) records them, or None."""
    for path in (checkpoint.last_dir(run_dir), checkpoint.previous_dir(run_dir)):
        if checkpoint.problem(path) is None:
            with open(os.path.join(path, checkpoint.STATE)) as f:
                flags = json.load(f).get("flags")
            if flags is not None:
                return flags
    return None


def start(run) -> Tuple[RunState, bool]:
    """(state, resumed) of the GenerationRunner `run`: a fresh run directory and state, or the
    run to resume in it (its arrays put back into `run`)."""
    cfg, run_dir = run.config, run.config.run_dir
    point = None
    if run.chief:
        checkpoint.clean(run_dir)
        if not cfg.overwrite:  # same flags: `refuse_other_run`; a damaged last: its previous
            point = checkpoint.resume_point(run_dir)
            if point and point[2] and run.verbose:
                print(point[2])
    distribution.barrier(run.strategy)  # the chief's clean-up is done before anyone reads
    if not run.chief and not cfg.overwrite and os.path.isdir(checkpoint.last_dir(run_dir)):
        point = (*checkpoint.load(checkpoint.last_dir(run_dir)), "")
    if point is not None:
        saved, arrays, _ = point
        state = RunState.from_json(saved)
        restore(run, state, arrays)
        return state, True
    if not run.chief:  # the other workers of --strategy=multi_worker write nothing
        return RunState(), False
    os.makedirs(run_dir, exist_ok=True)
    for name in OUTPUTS:  # a fresh start: nothing of a previous run survives
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    with atomic.open_atomic(os.path.join(run_dir, "config.json")) as f:
        json.dump(cfg.to_flags(), f, indent=2, sort_keys=True)
    masks_lib.save(os.path.join(run_dir, "masks.npz"), run.masks)
    if cfg.model.arch == config_lib.CUSTOM_ARCH:  # what `ke_tf.export` rebuilds it from
        with atomic.open_atomic(os.path.join(run_dir, checkpoint.NETWORK_JSON)) as f:
            f.write(run.network.to_json())
    return RunState(), False


def repair(run, state: RunState) -> List[str]:
    """The chief, on resume: the outputs `checkpoints/last` defines (results.csv and
    hypotheses.csv from its state, masks.npz from its masks) rewritten where the files differ
    from it (rows lost, a file damaged); returns their names, and says so."""
    run_dir, fixed = run.config.run_dir, []
    expected = {"masks.npz": masks_lib.encode(run.masks)}
    if state.rows:
        expected[results.RESULTS] = results.csv_text(run.rows(), run.columns).encode()
        expected[results.HYPOTHESES] = results.csv_text(
            state.hypotheses, results.HYPOTHESES_COLUMNS).encode()
    for name, content in expected.items():
        path = os.path.join(run_dir, name)
        if _bytes_of(path) != content:  # damaged, short or missing
            with atomic.open_atomic(path, "wb") as f:
                f.write(content)
            fixed.append(name)
    if fixed and run.verbose:
        print(f"{', '.join(fixed)} did not match {checkpoint.last_dir(run_dir)}: rewritten from it")
    return fixed


def _bytes_of(path: str):
    """The content of the file `path`, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def hooks(run, resumed: bool) -> List[Hook]:
    """The run's own hooks, in order: under --strategy=multi_worker the workers' agreement
    check first (every worker), then, on the chief only, the ones that write the run directory:
    TensorBoard and the console (`Monitor`), results.csv (`results.Tables`), checkpoints/."""
    run_dir, own = run.config.run_dir, []
    if distribution.is_multi_worker(run.strategy):
        own.append(distribution.SameOnEveryWorker(run.strategy))
    if run.chief:
        own += [Monitor(os.path.join(run_dir, "tensorboard"), run.config.to_flags(),
                        verbose=run.verbose, resumed=resumed),
                results.Tables(run_dir, run.columns),
                checkpoint.Checkpoints(run_dir, run.config.keep_generations)]
    return own


def arrays(run) -> Dict[str, Dict[str, np.ndarray]]:
    """What `checkpoints/last` holds besides the state: network and optimizer variables by
    path, the masks in use, the 0/1 multipliers of weights held at zero (DSD, RePr), the loss's
    state (AdaCos's scale) and the method's own arrays, if any."""
    groups = {"network": checkpoint.variables_of(run.network.variables),
              "optimizer": checkpoint.variables_of(run.model.optimizer.variables),
              "masks": run.masks,
              "held": {str(i): v for i, v in enumerate(run.model.held_values())}}
    loss_state = getattr(run.model.loss, "variables", [])  # AdaCos's scale; others: none
    if loss_state:
        groups["loss"] = checkpoint.variables_of(loss_state)
    extra = run.method.arrays(run)
    if extra:
        groups["method"] = extra
    return groups


def restore(run, state: RunState, saved: dict) -> None:
    """Put the arrays back into `run` as `checkpoints/last` holds them for `state`."""
    checkpoint.assign(run.network.variables, saved["network"], "network")
    optimizer = run.model.optimizer
    if not optimizer.built:
        with run.strategy.scope():
            optimizer.build(run.model.trainable_variables)
    checkpoint.assign(optimizer.variables, saved["optimizer"], "optimizer state")
    run.masks = {k: v.astype(bool) for k, v in saved.get("masks", {}).items()}
    if getattr(run.model.loss, "variables", []):
        checkpoint.assign(run.model.loss.variables, saved.get("loss", {}), "loss state")
    held = saved.get("held", {})
    run.model.held_values([held[str(i)] for i in range(len(held))])
    run.method.restore(run, saved.get("method", {}))
    if state.evaluated:  # the slim networks as evaluated, exported next: the fit weights,
        for net in run.nets.values():  # and the shipped one exactly as kept
            if net is not run.network:
                slim.copy_fit_weights(run.network, run.masks, net)
        shipped = run.shipped().get("slim")
        if shipped is not None and shipped is not run.network:
            _, kept = checkpoint.load(checkpoint.generation_dir(run.config.run_dir,
                                                                state.generation))
            checkpoint.assign(shipped.variables, kept["slim"], "slim network")
