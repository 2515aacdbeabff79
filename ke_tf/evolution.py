"""Knowledge Evolution for your own Keras model and data: `ke_tf.evolve`.

    import ke_tf
    result = ke_tf.evolve(model, train, test=test, generations=3, epochs=30, lr=0.05)
    result.rows                   # the rows of results.csv: N_g and H_g of every generation
    result.dense, result.slim     # the shipped N_g and H_g, keras.Models (the last by default)

    result = ke_tf.evolve(model, train, test=test, validation=val, generations=20,
                          select_by="val_top1", patience=4)
    result.selected, result.stopped   # {"dense": 7, "slim": 9}, why it stopped early (or "")

`model` is any functional `keras.Model` (a `keras.Sequential` that starts with `keras.Input`
is one), built and randomly initialized, outputting logits (no softmax); it is trained in
place. Its `compile()` settings, if any, are not used: KE trains with its own optimizer and
loss, set by the flags (SGD with PyTorch's coupled weight decay, warm-up + cosine lr restarted
every generation, the task's loss). `train` is a batched `tf.data.Dataset` of (images, integer
labels), preprocessed and augmented as the user likes (`test` / `validation` likewise, in one
fixed order), or the path of an image folder (PATH/{train,test[,val]}/<class>/<image>, read as
`--dataset=folder:PATH` at the model's input size; `val_fraction=` holds out a validation
split of it). Every other keyword is a flag of
`python -m ke_tf.main` by name (`generations=`, `epochs=`, `split_mode=`, `split_rate=`,
`method=`, `lr=`, `weight_decay=`, `seed=`, ...), the paper's value when not given.

The run is the command line's: the same GenerationRunner, methods, hooks (TensorBoard,
results.csv, checkpoints) and export, in `run_dir` (None: a temporary directory, removed after
the run). A `run_dir` holding an unfinished run of the same flags is resumed: pass the same
model (same layer names) and data again. The command line is a user of `run`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from ke_tf import data as data_lib, graph, presets
from ke_tf.config import CUSTOM_ARCH, IN_MEMORY, ConfigError, RunConfig
from ke_tf.generations import GenerationRunner
from ke_tf.hooks import Hook


@dataclasses.dataclass
class Evolved:
    """What a run gives back: `rows` (results.csv), the shipped networks `dense` (N_g) and
    `slim` (H_g, BatchNorm re-estimated; None without one) of the generations `selected`
    ({"dense": g, "slim": g}: the last, or the best by `select_by`), why the run `stopped`
    early ("" if it trained every generation), the `runner` (its `state`, `nets`, `masks`) and
    the `run_dir` (None once a temporary one is removed)."""

    rows: List[Dict]
    dense: Optional[keras.Model]
    slim: Optional[keras.Model]
    runner: GenerationRunner
    run_dir: Optional[str]
    selected: Dict[str, int] = dataclasses.field(default_factory=dict)
    stopped: str = ""


def run(config: RunConfig, *, network: Optional[keras.Model] = None,
        data: Optional[data_lib.Data] = None, verbose: bool = True,
        hooks: Sequence[Hook] = ()) -> Evolved:
    """One KE run of `config` (of its own architecture and data, or of the given ones)."""
    with data_lib.naming_undecodable(config.data):  # a damaged image found late, named
        runner = GenerationRunner(config, data=data, verbose=verbose, hooks=hooks,
                                  network=network)
        rows = runner.run()
    shipped = runner.shipped()
    return Evolved(rows, shipped.get("dense"), shipped.get("slim"), runner, config.run_dir,
                   dict(runner.state.selected), runner.state.stopped)


def evolve(model, train, *, test: Optional[tf.data.Dataset] = None,
           validation: Optional[tf.data.Dataset] = None, run_dir: Optional[str] = None,
           verbose: bool = True, hooks: Sequence[Hook] = (), **flags) -> Evolved:
    """Train `model` with Knowledge Evolution on `train` (module docstring); returns Evolved."""
    network = graph.functional(model)
    if len(network.outputs) != 1 or len(network.inputs) != 1:
        raise ConfigError(f"the model must have one input and one output (images -> logits). "
                          f"Received: {len(network.inputs)} inputs, {len(network.outputs)} outputs")
    last = network.layers[-1]
    if getattr(last, "activation", None) is keras.activations.softmax:
        raise ConfigError(f"the model's output layer '{last.name}' applies softmax: KE trains on "
                          "logits (build that layer with activation=None)")
    inputs, outputs = network.inputs[0], network.outputs[0]
    num_classes, side = int(outputs.shape[-1]), inputs.shape[1]
    flat = dict(flags, arch=CUSTOM_ARCH)
    if isinstance(train, (str, os.PathLike)):
        if side is None or side != inputs.shape[2]:
            raise ConfigError(f"a folder dataset is read at the model's square input size: the "
                              f"model takes {tuple(inputs.shape[1:])}")
        data = None
        flat.update(dataset=f"folder:{os.fspath(train)}", image_size=int(side))
    elif isinstance(train, tf.data.Dataset):
        if flat.get("regularizer") == "cskd":
            raise ConfigError("--regularizer=cskd needs ke_tf's anchor/partner batches: pass the "
                              "data as an image folder, not a tf.data.Dataset")
        data = data_lib.from_datasets(train, test, validation, num_classes=num_classes)
        first_batch = int(tf.shape(next(iter(train))[0])[0])
        flat.update(dataset=IN_MEMORY, image_size=data.info.image_size,
                    batch_size=flat.get("batch_size", first_batch))
    else:
        raise ConfigError(f"`train` must be a batched tf.data.Dataset of (images, labels) or an "
                          f"image folder's path. Received: {type(train).__name__}")
    temporary = run_dir is None
    flat["run_dir"] = tempfile.mkdtemp(prefix="ke_tf-") if temporary else os.fspath(run_dir)
    config = presets.config(flat)
    try:
        result = run(config, network=network, data=data, verbose=verbose, hooks=hooks)
    finally:
        if temporary:
            shutil.rmtree(flat["run_dir"], ignore_errors=True)
    if temporary:
        result.run_dir = None
    return result
