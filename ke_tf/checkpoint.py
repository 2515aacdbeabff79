"""Checkpoints of a run: resume after a crash, export any kept generation.

Layout under `<run_dir>/checkpoints/`, every directory written atomically (`ke_tf.atomic`):

- `last/`: where training stands. Written at the end of every epoch, once more when a
  generation has been evaluated and when the run ends (the `Checkpoints` hook); the one it
  replaces becomes `previous/`. `state.json` (the run's `ke_tf.state.RunState`: generation,
  epochs done, whether evaluated, the rows of results.csv and hypotheses.csv so far, the last
  training metrics, seconds spent; and the run's flags, config.json's content),
  `network.npz` (every variable of the trained network by path: weights, BatchNorm statistics),
  `optimizer.npz` (momentum buffers, iteration count, learning rate), `masks.npz` (the masks in
  use: WELS masks are random, so they are restored, never re-drawn) and `held.npz` (DSD's 0/1
  multipliers).
- `generation_NNN/`: the networks of finished generation NNN as evaluated: `dense.npz`,
  `slim.npz` (the BatchNorm-recalibrated slim network when the run recalibrates) and the masks,
  plus `state.json` with what an export needs (class names, output name). `--keep_generations`
  bounds how many are kept (the most recent, and always the generations the run ships:
  `--select_by`).

Every checkpoint directory holds `manifest.json`: the size and SHA-256 of each of its files.
`load` verifies it and refuses a damaged checkpoint by name (`DamagedCheckpoint`, exit 2); a
resume whose `last/` is damaged goes on from `previous/` (`resume_point`).

Files only ever hold arrays (`np.load(allow_pickle=False)`) and JSON: loading a checkpoint never
executes code. Generations still hand weights over in memory; these files are for resuming and
exporting.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from typing import Dict, Optional, Tuple

import numpy as np

from ke_tf import atomic, faults
from ke_tf.config import CUSTOM_ARCH, ConfigError, RunConfig
from ke_tf.hooks import Hook

DIR = "checkpoints"
NETWORK_JSON = "network.json"  # the architecture of a network given from Python (arch "custom")
LAST = "last"
PREVIOUS = "previous"  # the `last` before the newest: what a damaged `last` is resumed from
STATE = "state.json"
MANIFEST = "manifest.json"  # {"files": {name: {"bytes": n, "sha256": hex}}} of the directory


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not match its manifest (truncated, overwritten, missing)."""


def generation_dir(run_dir: str, generation: int) -> str:
    return os.path.join(run_dir, DIR, f"generation_{generation:03d}")


def last_dir(run_dir: str) -> str:
    return os.path.join(run_dir, DIR, LAST)


def previous_dir(run_dir: str) -> str:
    return os.path.join(run_dir, DIR, PREVIOUS)


def variables_of(variables) -> Dict[str, np.ndarray]:
    """{variable path: value} of `variables` (a list of Keras/TF variables); paths must be
    unique, as they are in a functional model with unique layer names."""
    out = {}
    for v in variables:
        key = getattr(v, "path", None) or v.name
        if key in out:
            raise ValueError(f"two variables share the path {key!r}: cannot checkpoint by path")
        out[key] = np.asarray(v.numpy())
    return out


# A network rebuilt in another process (the export command, from network.json) may name some
# variables otherwise than the one that was trained: Keras numbers the random state of a Dropout
# by a process-wide counter ("seed_generator_N/seed_generator_state"), and a nested Sequential
# built where it was first called prefixes its variables with its name ("stem/conv/kernel")
# where one deserialized is built before (no prefix). Its variables come in the same order.
_SEED_STATE = re.compile(r"(^|/)seed_generator(_\d+)?/seed_generator_state$")


def _same_variable(mine: str, saved: str) -> bool:
    if _SEED_STATE.search(mine) and _SEED_STATE.search(saved):
        return True
    return mine == saved or mine.endswith("/" + saved) or saved.endswith("/" + mine)


def renaming(paths: list, values: Dict[str, np.ndarray]) -> Dict[str, str]:
    """{saved key: path} pairing `values` (saved in the order of the network's variables) with
    `paths` (the order of a rebuilt network's): in order, when every pair names the same layer's
    variable up to a prefix or a seed-generator number (above); otherwise the identity."""
    if len(paths) == len(values) and set(paths) != set(values) and all(
            _same_variable(mine, saved) for mine, saved in zip(paths, values)):
        return dict(zip(values, paths))
    return {k: k for k in values}


def assign(variables, values: Dict[str, np.ndarray], what: str) -> Dict[str, str]:
    """Assign `values` (from `variables_of`) back; every path and shape must match (up to the
    renaming of a rebuilt network, `renaming`). Returns that renaming, {saved key: path}."""
    variables = list(variables)
    paths = [getattr(v, "path", None) or v.name for v in variables]
    renamed = renaming(paths, values)
    values = {renamed[k]: v for k, v in values.items()}
    if sorted(paths) != sorted(values):
        missing = sorted(set(paths) - set(values))[:3]
        extra = sorted(set(values) - set(paths))[:3]
        raise ConfigError(f"the checkpoint's {what} does not fit this network (missing "
                          f"{missing}, unexpected {extra}): was it written by other flags?")
    for path, var in zip(paths, variables):
        value = values[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ConfigError(f"the checkpoint's {what} has {path} of shape {value.shape}, the "
                              f"network {tuple(var.shape)}")
        var.assign(value.astype(var.dtype.name if hasattr(var.dtype, "name") else var.dtype))
    return renamed


def save(path: str, state: dict, arrays: Dict[str, Dict[str, np.ndarray]],
         keep_old_as: Optional[str] = None) -> None:
    """Write `state` (JSON) and each group of `arrays` (`<group>.npz`) as one directory, whole
    or not at all, with its manifest; the directory it replaces is deleted, or becomes
    `keep_old_as`. A full disk raises ConfigError (exit 2) and leaves the previous one intact."""
    try:
        with atomic.atomic_dir(path, keep_old_as) as tmp:
            for group, values in arrays.items():
                np.savez(os.path.join(tmp, f"{group}.npz"), **values)
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
            files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                            "sha256": _sha256(os.path.join(tmp, name))}
                     for name in sorted(os.listdir(tmp))}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"files": files}, f, indent=1, sort_keys=True)
            faults.point("checkpoint")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(f"no space left on the device while writing the checkpoint {path} "
                              f"({err.strerror}); the previous checkpoint is intact: free some "
                              "space and run the same command again to resume") from err
        raise


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problem(path: str) -> Optional[str]:
    """Why the checkpoint directory `path` cannot be trusted, or None if every file its
    manifest lists is there with its size and checksum."""
    if not os.path.isdir(path):
        return "it does not exist"
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, (size, digest) in sorted(expected.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, its manifest says {size}"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def load(path: str) -> Tuple[dict, Dict[str, Dict[str, np.ndarray]]]:
    """(state, {group: {key: array}}) of a checkpoint directory written by `save`, verified
    against its manifest (DamagedCheckpoint otherwise)."""
    why = problem(path)
    if why:
        raise DamagedCheckpoint(f"the checkpoint {path} is damaged: {why}")
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    arrays = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".npz"):
            with np.load(os.path.join(path, name), allow_pickle=False) as npz:
                arrays[name[:-len(".npz")]] = {k: npz[k] for k in npz.files}
    return state, arrays


def resume_point(run_dir: str):
    """What `run_dir`'s run resumes from, loaded and verified once: (state, arrays, what to tell
    the user) of `last`, or, if `last` is damaged and `previous` intact, of `previous`, moved to
    `last` (the work after it is done again); None if the run has no checkpoint.
    DamagedCheckpoint if none is intact."""
    last, previous = last_dir(run_dir), previous_dir(run_dir)
    if not os.path.isdir(last) and not os.path.isdir(previous):
        return None
    try:
        return (*load(last), "")
    except DamagedCheckpoint:
        why = problem(last)
    try:
        state, arrays = load(previous)
    except DamagedCheckpoint:
        raise DamagedCheckpoint(
            f"--run_dir {run_dir}: the checkpoint {last} is damaged ({why}) and no intact one "
            f"precedes it ({previous}: {problem(previous)}); pass --overwrite to start the run "
            "again") from None
    shutil.rmtree(last, ignore_errors=True)
    os.replace(previous, last)
    where = (f"generation {state['generation']} after epoch {state['epoch']}"
             + (", evaluated" if state.get("evaluated") else ""))
    return state, arrays, (f"{last} was damaged ({why}): going on from the checkpoint before it "
                           f"({where}); the work after it (at most one epoch and an evaluation) "
                           "is done again")


def clean(run_dir: str) -> None:
    """After a crash: remove half-written temporary files and directories (`.tmp-*`) of the run,
    and if the crash fell between the two renames that replace `last`, put it back."""
    root = os.path.join(run_dir, DIR)
    for directory in (run_dir, root, os.path.join(run_dir, "export")):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith(".old-") and directory == root and not os.path.isdir(
                    last_dir(run_dir)) and os.path.isfile(os.path.join(path, STATE)):
                os.replace(path, last_dir(run_dir))
            elif name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def kept_generations(run_dir: str) -> list:
    """The finished generations whose checkpoints are on disk, ascending."""
    root = os.path.join(run_dir, DIR)
    found = [re.fullmatch(r"generation_(\d{3,})", n) for n in
             (os.listdir(root) if os.path.isdir(root) else [])]
    return sorted(int(m.group(1)) for m in found if m)


def prune(run_dir: str, keep: Optional[int], protected=()) -> None:
    """Delete all but the `keep` most recent generation checkpoints (None: keep all) and the
    `protected` ones (the generations a run ships, `ke_tf.selection`)."""
    if keep is None:
        return
    for g in kept_generations(run_dir)[:-keep]:
        if g not in protected:
            shutil.rmtree(generation_dir(run_dir, g), ignore_errors=True)


def shipped_generation(run_dir: str, net: str) -> Optional[int]:
    """The generation that `run_dir`'s run ships of network `net` ("dense", "slim") as far as
    it got (`RunState.selected` in `checkpoints/last`); None if it records none."""
    path = last_dir(run_dir)
    if problem(path) is not None:
        return None
    with open(os.path.join(path, STATE)) as f:
        return json.load(f).get("selected", {}).get(net)


@dataclasses.dataclass
class Loaded:
    """The networks of one finished generation, rebuilt from a run directory."""

    nets: Dict[str, "object"]  # "dense" and/or "slim" -> keras.Model (float32, inference)
    generation: int
    class_names: Tuple[str, ...]
    output_name: str  # "logits" or "embeddings"
    config: RunConfig


def load_networks(run_dir: str, generation: Optional[int] = None) -> Loaded:
    """Rebuild the dense and slim networks of `generation` (default: the last kept one) of the
    run in `run_dir` from its config.json and `checkpoints/generation_NNN/`; no data needed.
    The run's method says which slim architecture its saved masks define."""
    from ke_tf import methods, networks  # keras: only when loading

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{run_dir} holds no run (no config.json)")
    with open(config_path) as f:
        config = RunConfig.from_flags(json.load(f))
    kept = kept_generations(run_dir)
    if not kept:
        raise ConfigError(f"{run_dir} has no finished generation with a checkpoint (looked in "
                          f"{os.path.join(run_dir, DIR)})")
    if generation is None:
        generation = kept[-1]
    if generation not in kept:
        raise ConfigError(f"--generation={generation}: {run_dir} keeps the checkpoints of "
                          f"generations {', '.join(map(str, kept))}")
    state, arrays = load(generation_dir(run_dir, generation))
    m, size = config.model, config.data.image_size
    dense = _network_of(run_dir) if m.arch == CUSTOM_ARCH else networks.build(
        m.arch, state["num_classes"], size, stem=m.stem, head=m.head,
        embedding_dim=m.embedding_dim, width_multiplier=m.width_multiplier,
        classifier=networks.classifier_for(config.train.loss))
    nets = {}
    renamed = {}
    if "dense" in arrays:
        renamed = assign(dense.variables, arrays["dense"], "dense network")
        nets["dense"] = dense
    if "slim" in arrays:
        saved_masks = arrays.get("masks", {})
        net = methods.create(config).slim_architecture(
            dense, {renamed.get(k, k): m for k, m in saved_masks.items()})
        assign(net.variables, arrays["slim"], "slim network")
        nets["slim"] = net
    return Loaded(nets=nets, generation=generation, class_names=tuple(state["class_names"]),
                  output_name=state["output_name"], config=config)


def _network_of(run_dir: str):
    """The network a run was given from Python, rebuilt (random weights) from network.json by
    Keras's safe deserialization: its layers must be Keras's, ke_tf's or registered ones."""
    import keras

    path = os.path.join(run_dir, NETWORK_JSON)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} was trained on a network given from Python but holds no "
                          f"{NETWORK_JSON}")
    with open(path) as f:
        return keras.saving.deserialize_keras_object(json.load(f), safe_mode=True)


class Checkpoints(Hook):
    """Writes `checkpoints/last` after every epoch, when a generation was evaluated and when
    the run ends, and `checkpoints/generation_NNN` (the shipped networks as evaluated, for
    export) for every evaluated generation, keeping the last `keep_generations` and the
    selected ones (`RunState.selected`)."""

    def __init__(self, run_dir: str, keep_generations: Optional[int]):
        self.run_dir, self.keep = run_dir, keep_generations

    def epoch_end(self, run, state) -> None:
        self._last(run, state)

    def generation_end(self, run, state, evaluation) -> None:
        arrays = {name: variables_of(net.variables) for name, net in run.shipped().items()}
        arrays["masks"] = run.masks
        save(generation_dir(self.run_dir, state.generation),
             dict(run.info, generation=state.generation), arrays)
        self._last(run, state)  # first: a resume must find the selection it prunes by
        prune(self.run_dir, self.keep, protected=set(state.selected.values()))

    def run_end(self, run, state) -> None:
        self._last(run, state)

    def _last(self, run, state) -> None:
        save(last_dir(self.run_dir), dict(state.to_json(), **run.info, flags=run.config.to_flags()),
             run.arrays(), keep_old_as=previous_dir(self.run_dir))
