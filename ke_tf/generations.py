"""GenerationRunner: the Knowledge Evolution loop (sec. 3.1, Algorithm 1 lines 16-28).

Built once: data, the dense network N, its split masks M, the KEModel with its optimizer and
compiled train function, and the networks evaluated every generation. Then, for g = 1..G:

    train N for e epochs (optimizer state and lr schedule restarted; same settings every g)
    extract the slim H_g: copy the fit hypothesis into it, re-estimate its BatchNorm statistics
    evaluate N_g and H_g; record the rows and the mean |w| of both hypotheses (`RunState`)
    the hooks: TensorBoard and console, results.csv, checkpoints (`ke_tf.hooks`)
    if g < G: the method's rule between generations, for KE Eq. 1: W = M*W + (1-M)*W_r

What differs between methods (KE, the long baseline, LLF, DSD, DNR, ...) is asked of the run's
`ke_tf.methods` object; the loop never tests a method's name. Weights pass from one generation
to the next in memory; the exported networks are the last generation's N_G and H_G. Files are
for watching, resuming and shipping a run, not for handing generations over.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ke_tf import atomic, checkpoint, config as config_lib, cost, data as data_lib, execution
from ke_tf import export, faults, multi_worker
from ke_tf import masks as masks_lib, methods, model as model_lib, networks, results, slim, tasks
from ke_tf.config import ConfigError, RunConfig, RunError
from ke_tf.hooks import Evaluation, Hook, Hooks
from ke_tf.monitor import Monitor
from ke_tf.state import RunState

OUTPUTS = (results.RESULTS, results.HYPOTHESES, "config.json", "masks.npz", "tensorboard",
           "export", checkpoint.DIR, checkpoint.NETWORK_JSON)
HEAD_COLUMNS = ("generation", "net", "method", "split_mode", "split_rate")
COST_COLUMNS = ("params", "macs", "seconds")


def _labels(dataset) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataset])


def check_finite(run_dir: str, generation: int, epoch: int, logs: Dict[str, float],
                 network: keras.Model) -> None:
    """RunError (exit 1) if the epoch's loss or metrics, or the weights, are NaN or infinite:
    the run stops before checkpointing them, and the last good checkpoint stays."""
    where = f"generation {generation}, epoch {epoch}"
    kept = (f"; the run stopped. The last good checkpoint (the epoch before) is kept in "
            f"{checkpoint.last_dir(run_dir)}. Lower --lr or check the data, and start again "
            "with --overwrite")
    bad = ", ".join(f"{k}={v}" for k, v in logs.items() if not np.isfinite(v))
    if bad:
        raise RunError(f"{where}: training diverged ({bad}){kept}")
    weights = [v.path for v in network.variables if not np.isfinite(v.numpy()).all()]
    if weights:
        raise RunError(f"{where}: the weights are no longer finite ({weights[0]}, ...){kept}")


class _EpochEnd(keras.callbacks.Callback):
    """After every epoch of `fit`: stop on non-finite numbers (`check_finite`), else advance
    the state by the epoch (reading `logs`) and call the hooks' `epoch_end`."""

    def __init__(self, run: "GenerationRunner", state: RunState, hooks: Hooks):
        super().__init__()
        self.run, self.state, self.hooks = run, state, hooks

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        check_finite(self.run.config.run_dir, self.state.generation, epoch + 1, logs,
                     self.run.network)
        self.state.end_epoch(epoch + 1, logs)
        self.run.use_masks(self.run.method.after_epoch(self.run, epoch + 1))
        self.hooks.epoch_end(self.run, self.state)


class GenerationRunner:
    """Trains the generations of `config.method` and evaluates every one of them.

    Args:
      config: a `RunConfig` (validated here).
      data: the loaded data (default: `ke_tf.data.load(config.data)`), for tests and reuse.
      verbose: progress bars and tables on the console.
      hooks: more `ke_tf.hooks.Hook`s, called after the run's own at every point.
      network: a functional `keras.Model` to train instead of building `config.model.arch`
        (which must then be "custom"; see `ke_tf.evolution`): trained in place, its
        architecture saved as network.json for `ke_tf.export`.

    After `run()`: `state` (`ke_tf.state.RunState`: the rows of results.csv, ...), `network`
    (the trained N_G), `nets` (the networks evaluated, by row name), `masks`.
    """

    def __init__(self, config: RunConfig, data: Optional[data_lib.Data] = None,
                 verbose: bool = True, hooks: Sequence[Hook] = (),
                 network: Optional[keras.Model] = None):
        self.config = config.validate()
        # First: MultiWorkerMirroredStrategy must precede every other TensorFlow op.
        self.strategy = execution.strategy(config)
        self.chief = execution.is_chief(config)  # writes the run directory
        self.method = methods.create(config)
        self.verbose, self.extra_hooks = verbose, list(hooks)
        m, size = config.model, config.data.image_size
        stem = m.stem or networks.default_stem(size)
        if (network is None) == (m.arch == config_lib.CUSTOM_ARCH):
            raise ConfigError(f"--arch={m.arch}: a network given from Python needs "
                              f"arch={config_lib.CUSTOM_ARCH!r}, and that arch needs one")
        if network is not None and config.strategy != "none":
            raise ConfigError(f"--strategy={config.strategy} builds the network in the "
                              "strategy's scope: it cannot take a network built outside it")
        self._network = network
        self._refuse_other_run()
        if network is None and size < networks.min_image_size(m.arch, stem):
            raise ConfigError(f"--image_size must be >= {networks.min_image_size(m.arch, stem)} "
                              f"for --arch={m.arch} with the {stem} stem. Received: image_size={size}")
        self.data = data if data is not None else data_lib.load(config.data)
        self.task = tasks.TASKS[config.data.task]
        info = self.data.info
        if info.skipped_files and verbose:
            print(f"--skip_corrupt_images: left out {len(info.skipped_files)} corrupt or "
                  f"non-image files, e.g. {info.skipped_files[0]}")
        self.generations, self.epochs = self.method.schedule()
        if config.deterministic:  # bit-identical reruns and resumes (TensorFlow op determinism)
            tf.config.experimental.enable_op_determinism()
        policy = keras.mixed_precision.global_policy()
        # layers keep the policy they were built with
        keras.mixed_precision.set_global_policy(execution.precision_policy(config))
        try:
            with self.strategy.scope():
                self._build(info)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        self.eval_splits = {split: (ds, _labels(ds)) for split, ds in
                            (("test", self.data.test), ("val", self.data.val))
                            if ds is not None and split in self.task.splits}
        self.columns = list(HEAD_COLUMNS + self.task.columns + self.task.train_columns + COST_COLUMNS)
        self.info = {"num_classes": info.num_classes, "class_names": list(info.class_names),
                     "output_name": self.task.output_name}  # what an export needs
        self.state: Optional[RunState] = None

    def _build(self, info) -> None:
        """The networks, masks and compiled KEModel (under the strategy's scope)."""
        config, m, size = self.config, self.config.model, self.config.data.image_size
        keras.utils.set_random_seed(config.seed)  # the initial weights of N_1
        dense = self._network or networks.build(
            m.arch, info.num_classes, size, stem=m.stem, head=m.head, embedding_dim=m.embedding_dim,
            width_multiplier=m.width_multiplier,
            classifier=networks.classifier_for(config.train.loss))
        execution.synchronize_batchnorm(config, dense)
        self.network = self.method.network(dense)
        self.masks = self.method.initial_masks(self.network)
        # The networks evaluated every generation, built once (their predict functions too).
        self.nets: Dict[str, keras.Model] = self.method.networks_to_evaluate(self.network,
                                                                             self.masks)
        self.costs = {name: cost.total(net) for name, net in self.nets.items()}
        t = config.train
        cskd = (t.cskd_temperature, t.cskd_lambda) if t.regularizer == "cskd" else None
        self.model = model_lib.KEModel(self.network, weight_decay=t.weight_decay, cskd=cskd,
                                       held_at_zero=self.method.held_at_zero(self.network),
                                       teacher=self.method.teacher(self.network))
        # AdaCos's loss has a state (its scale): restarted with the optimizer, checkpointed.
        self.loss = self.task.make_loss(config, info.num_classes)
        self.model.compile(
            # a fixed name: the checkpoint keys its variables by path ("sgd/...")
            optimizer=keras.optimizers.SGD(learning_rate=t.lr, momentum=t.momentum, name="sgd"),
            loss=self.loss, metrics=self.task.make_metrics(info.num_classes),
            jit_compile=config.jit_compile)

    def _refuse_other_run(self) -> None:
        """Before any work: --run_dir must be new, or hold this very run (to resume)."""
        cfg = self.config
        if cfg.overwrite:
            return
        config_path = os.path.join(cfg.run_dir, "config.json")
        if os.path.exists(config_path):
            try:
                with open(config_path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--run_dir {cfg.run_dir}: {config_path} is unreadable "
                                  f"({err}); pass --overwrite to replace the run") from err
            diff = config_lib.differences(saved, cfg.to_flags())
            if diff:
                raise ConfigError(f"--run_dir {cfg.run_dir} holds a run with other flags: "
                                  f"{'; '.join(diff)}. Pass the same flags to resume it, "
                                  "--overwrite to replace it, or choose another --run_dir")
            return
        used = [n for n in OUTPUTS if os.path.exists(os.path.join(cfg.run_dir, n))]
        if used:
            raise ConfigError(f"--run_dir {cfg.run_dir} already holds files of a run "
                              f"({', '.join(used)}) but no config.json; pass --overwrite to "
                              f"replace them or choose another --run_dir. "
                              f"Received: run_dir={cfg.run_dir!r}")

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        """All generations; writes the run directory; returns the rows of results.csv.

        A run directory holding an unfinished run with the same flags is resumed: its
        `RunState` and arrays are loaded from `checkpoints/last` and the same loop goes on
        (same generation, last completed epoch, masks, optimizer and schedule position)."""
        state, resumed = self._start()
        self.state = state
        if state.finished:
            if self.verbose:
                print(f"{self.config.run_dir} holds a finished run; --overwrite starts it again")
            return state.rows
        hooks = self._hooks(resumed)
        try:
            for g in range(state.generation, self.generations + 1):
                if not state.evaluated:
                    train = self.train(state, hooks)  # optimizer and lr schedule restarted
                    self.extract_slim()  # H_g: the fit hypothesis, BatchNorm re-estimated
                    evaluation = self.evaluate(g, train)
                    state.record(evaluation.rows, evaluation.hypotheses)
                    hooks.generation_end(self, state, evaluation)
                if g < self.generations:
                    self.between_generations(g)  # the method's rule; KE: Eq. 1
                    state.next_generation()
            if self.config.export and self.chief:
                self.export(os.path.join(self.config.run_dir, "export"))
            state.finished = True
            hooks.run_end(self, state)
        finally:
            hooks.close()
        return state.rows

    # --- the steps of the loop -------------------------------------------------------------------

    def train(self, state: RunState, hooks: Hooks) -> Dict[str, float]:
        """Train generation `state.generation` for its e epochs, from `state.epoch` (0: the
        optimizer state zeroed and the schedule restarted, sec. 3.1; more: a resumed
        generation goes on); returns the last epoch's training metrics as results.csv has
        them (`train_loss`, `train_top1` in percent, ...). A loss with a state restarts with
        the optimizer (AdaCos's scale: sqrt(2) ln(C - 1) again)."""
        t = self.config.train
        if state.epoch == 0:
            model_lib.restart_optimizer(self.model.optimizer)
            if hasattr(self.loss, "restart"):  # AdaCos: its scale starts afresh too
                self.loss.restart()
        hooks.generation_start(self, state)
        callbacks = [model_lib.LearningRateSchedule(t.lr, self.epochs, t.warmup_epochs),
                     _EpochEnd(self, state, hooks)]
        if faults.active("batch"):
            callbacks.append(faults.BatchFaults())
        batches = self.data.train_from((state.generation - 1) * self.epochs + state.epoch)
        if multi_worker.is_multi_worker(self.strategy):  # Keras's fit fails there (keras#20585)
            multi_worker.fit(self.model, batches, steps_per_epoch=self.data.steps_per_epoch,
                             initial_epoch=state.epoch, epochs=self.epochs, callbacks=callbacks,
                             class_pairs=self.config.data.class_pairs)
        else:
            self.model.fit(batches, steps_per_epoch=self.data.steps_per_epoch,
                           initial_epoch=state.epoch, epochs=self.epochs, verbose=0,
                           shuffle=False, callbacks=callbacks)
        return {k: (100.0 * v if k != "train_loss" else v) for k, v in state.train.items()
                if k in self.task.train_columns}

    def extract_slim(self) -> None:
        """H_g (sec. 3.2): copy the trained fit hypothesis into every slim network, and
        re-estimate the BatchNorm statistics of "slim_recal" on training images."""
        for name, net in self.nets.items():
            if net is not self.network:
                slim.copy_fit_weights(self.network, self.masks, net)
            if name == "slim_recal":
                slim.recalibrate_batchnorm(net, self.data.train_plain, self.config.data.recal_images)

    def evaluate(self, generation: int, train: Dict[str, float]) -> Evaluation:
        """The rows of results.csv for every network evaluated (test, and val where the
        dataset has it) and the mean |w| of the fit and reset hypotheses per variable."""
        # Under multi_worker every worker predicts alone, in the dataset's order.
        predict = (multi_worker.predict if multi_worker.is_multi_worker(self.strategy)
                   else lambda net, dataset: net.predict(dataset, verbose=0))
        rows = []
        for name, net in self.nets.items():
            row = dict.fromkeys(self.columns, "")
            row.update(generation=generation, net=name, method=self.method.name, **train,
                       **self.method.split_columns())
            for split, (dataset, labels) in self.eval_splits.items():
                outputs = np.asarray(predict(net, dataset), np.float32)
                row.update(self.task.evaluate(outputs, labels, split, self.config.seed))
            row["params"], row["macs"] = self.costs[name]
            rows.append(row)
        return Evaluation(generation, rows, train,
                          masks_lib.hypothesis_magnitudes(self.network, self.masks))

    def between_generations(self, generation: int) -> None:
        """The method's rule after generation g (KE: Eq. 1 on the reset hypothesis); masks it
        changes (WELS-Rand, DNR) are saved as masks.npz."""
        self.use_masks(self.method.between_generations(self, generation))

    def use_masks(self, masks: masks_lib.Masks) -> None:
        """The masks a method returned: new ones are used from now on and saved as masks.npz."""
        if masks is not self.masks:
            self.masks = masks
            if self.chief:
                masks_lib.save(os.path.join(self.config.run_dir, "masks.npz"), masks)

    def shipped(self) -> Dict[str, keras.Model]:
        """The networks a generation ships (checkpoint, export): the dense N_g and the slim
        H_g (BatchNorm-recalibrated unless --slim_bn_recalibration=false), those it has."""
        nets = {"dense": self.nets.get("dense"),
                "slim": self.nets.get("slim_recal", self.nets.get("slim"))}
        return {name: net for name, net in nets.items() if net is not None}

    def export(self, directory: str) -> None:
        """The last generation's shipped networks as SavedModels (and the class names)."""
        for name, net in self.shipped().items():
            export.save_saved_model(net, os.path.join(directory, name), self.task.output_name)
            faults.point("export")
        if self.task.output_name == "logits":
            export.write_class_names(directory, self.data.info.class_names)

    # --- run directory, hooks and checkpoints ------------------------------------------------------

    def _hooks(self, resumed: bool) -> Hooks:
        """The run's hooks; under --strategy=multi_worker the workers' agreement check first,
        and only the chief writes (TensorBoard, results, checkpoints)."""
        run_dir = self.config.run_dir
        own = []
        if multi_worker.is_multi_worker(self.strategy):
            own.append(multi_worker.SameOnEveryWorker(self.strategy))
        if self.chief:
            own += [Monitor(os.path.join(run_dir, "tensorboard"), self.config.to_flags(),
                            verbose=self.verbose, resumed=resumed),
                    results.Tables(run_dir, self.columns),
                    checkpoint.Checkpoints(run_dir, self.config.keep_generations)]
        return Hooks(own + [faults.FaultPoints()] + self.extra_hooks)

    def arrays(self) -> Dict[str, Dict[str, np.ndarray]]:
        """What `checkpoints/last` holds besides the state: network and optimizer variables by
        path, the masks in use, the 0/1 multipliers of weights held at zero (DSD, RePr), the
        loss's state (AdaCos's scale) and the method's own arrays, if any."""
        groups = {"network": checkpoint.variables_of(self.network.variables),
                  "optimizer": checkpoint.variables_of(self.model.optimizer.variables),
                  "masks": self.masks,
                  "held": {str(i): v for i, v in enumerate(self.model.held_values())}}
        loss_state = getattr(self.loss, "variables", [])  # AdaCos's scale; other losses: none
        if loss_state:
            groups["loss"] = checkpoint.variables_of(loss_state)
        extra = self.method.arrays(self)
        if extra:
            groups["method"] = extra
        return groups

    def _start(self) -> Tuple[RunState, bool]:
        """(state, resumed): a fresh run directory and state, or the run to resume in it."""
        cfg, run_dir = self.config, self.config.run_dir
        last = checkpoint.last_dir(run_dir)
        if self.chief:
            checkpoint.clean(run_dir)
        multi_worker.barrier(self.strategy)  # the chief's clean-up is done before anyone reads
        if not cfg.overwrite and os.path.isdir(last):  # same flags: checked in __init__
            saved, arrays = checkpoint.load(last)
            state = RunState.from_json(saved)
            self._restore(state, arrays)
            return state, True
        if not self.chief:  # the other workers of --strategy=multi_worker write nothing
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
        masks_lib.save(os.path.join(run_dir, "masks.npz"), self.masks)
        if cfg.model.arch == config_lib.CUSTOM_ARCH:  # what `ke_tf.export` rebuilds it from
            with atomic.open_atomic(os.path.join(run_dir, checkpoint.NETWORK_JSON)) as f:
                f.write(self.network.to_json())
        return RunState(), False

    def _restore(self, state: RunState, arrays: dict) -> None:
        """Put the arrays back as `checkpoints/last` holds them for `state`."""
        checkpoint.assign(self.network.variables, arrays["network"], "network")
        optimizer = self.model.optimizer
        if not optimizer.built:
            with self.strategy.scope():
                optimizer.build(self.model.trainable_variables)
        checkpoint.assign(optimizer.variables, arrays["optimizer"], "optimizer state")
        self.masks = {k: v.astype(bool) for k, v in arrays.get("masks", {}).items()}
        if getattr(self.loss, "variables", []):
            checkpoint.assign(self.loss.variables, arrays.get("loss", {}), "loss state")
        held = arrays.get("held", {})
        self.model.held_values([held[str(i)] for i in range(len(held))])
        self.method.restore(self, arrays.get("method", {}))
        if state.evaluated:  # the slim networks as evaluated, exported next: the fit weights,
            for net in self.nets.values():  # and the shipped one exactly as kept
                if net is not self.network:
                    slim.copy_fit_weights(self.network, self.masks, net)
            shipped = self.shipped().get("slim")
            if shipped is not None and shipped is not self.network:
                _, kept = checkpoint.load(
                    checkpoint.generation_dir(self.config.run_dir, state.generation))
                checkpoint.assign(shipped.variables, kept["slim"], "slim network")
