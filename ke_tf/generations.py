"""GenerationRunner: the Knowledge Evolution loop (sec. 3.1, Algorithm 1 lines 16-28).

Built once: data, the dense network N, its split masks M, the KEModel with its optimizer and
compiled train function. Then for g = 1..G:

    train N for e epochs (lr schedule and optimizer state restarted; same settings every g)
    evaluate the dense N_g, and for KELS the slim H_g (as extracted, and with its BatchNorm
        statistics re-estimated), and the mean |w| of both hypotheses per layer
    write results.csv (atomically) and TensorBoard
    if g < G: re-initialize the reset hypothesis, W = M*W + (1-M)*W_r (Eq. 1)

Weights pass from one generation to the next in memory; the exported networks are the last
generation's trained N_G and H_G. Files are for watching and shipping a run, not for handing
generations over.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from ke_tf import atomic, checkpoint, config as config_lib, cost, data as data_lib, export, faults
from ke_tf import masks as masks_lib, methods, model as model_lib, networks, reinit, results
from ke_tf import slim, tasks
from ke_tf.config import ConfigError, RunConfig, RunError
from ke_tf.monitor import Monitor

OUTPUTS = (results.RESULTS, results.HYPOTHESES, "config.json", "masks.npz", "tensorboard",
           "export", checkpoint.DIR)
HEAD_COLUMNS = ("generation", "net", "method", "split_mode", "split_rate")
COST_COLUMNS = ("params", "macs", "seconds")


def _labels(dataset) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataset])


class _EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: stop on a NaN or infinite loss (the last good checkpoint stays), else
    record the epoch's metrics and write `checkpoints/last`."""

    def __init__(self, runner: "GenerationRunner", generation: int):
        super().__init__()
        self.runner, self.generation = runner, generation

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not all(np.isfinite(v) for v in logs.values()):
            bad = ", ".join(f"{k}={v}" for k, v in logs.items() if not np.isfinite(v))
            last = checkpoint.last_dir(self.runner.config.run_dir)
            raise RunError(f"generation {self.generation}, epoch {epoch + 1}: training diverged "
                           f"({bad}); the run stopped. The last good checkpoint (the epoch "
                           f"before) is kept in {last}. Lower --lr or check the data, and "
                           "start again with --overwrite")
        self.runner._train = {f"train_{k}": v for k, v in logs.items()}
        self.runner.save_checkpoint(self.generation, epoch + 1, evaluated=False)
        faults.point("epoch")


class GenerationRunner:
    """Trains `config.train.generations` generations of KE and evaluates every one of them.

    Args:
      config: a validated `RunConfig`.
      data: the loaded data (default: `ke_tf.data.load(config.data)`), for tests and reuse.
      verbose: progress bars and tables on the console.
    """

    def __init__(self, config: RunConfig, data: Optional[data_lib.Data] = None, verbose: bool = True):
        self.config = config.validate()
        self.verbose = verbose
        m, size = config.model, config.data.image_size
        stem = m.stem or networks.default_stem(size)
        self._refuse_other_run()
        if size < networks.min_image_size(m.arch, stem):
            raise ConfigError(f"--image_size must be >= {networks.min_image_size(m.arch, stem)} "
                              f"for --arch={m.arch} with the {stem} stem. Received: image_size={size}")
        self.data = data if data is not None else data_lib.load(config.data)
        self.task = tasks.TASKS[config.data.task]
        info = self.data.info
        if info.skipped_files and verbose:
            print(f"--skip_corrupt_images: left out {len(info.skipped_files)} corrupt or "
                  f"non-image files, e.g. {info.skipped_files[0]}")
        self.generations, self.epochs = methods.schedule(config)
        if config.deterministic:  # bit-identical reruns and resumes (TensorFlow op determinism)
            tf.config.experimental.enable_op_determinism()
        self.strategy = (tf.distribute.MirroredStrategy() if config.strategy == "mirrored"
                         else tf.distribute.get_strategy())
        policy = keras.mixed_precision.global_policy()
        if config.mixed_precision:  # layers keep the policy they were built with
            gpu = bool(tf.config.list_logical_devices("GPU"))
            keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
        try:
            with self.strategy.scope():
                self._build(info)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        self.eval_splits = {split: (ds, _labels(ds)) for split, ds in
                            (("test", self.data.test), ("val", self.data.val))
                            if ds is not None and split in self.task.splits}
        self.columns = list(HEAD_COLUMNS + self.task.columns + self.task.train_columns + COST_COLUMNS)
        self.rows: List[Dict] = []
        self.hypotheses: List[Dict] = []
        self._train: Dict[str, float] = {}  # the last epoch's training metrics
        self._seconds, self._since = 0.0, time.time()  # the current generation's time
        self._info = {"num_classes": info.num_classes, "class_names": list(info.class_names),
                      "output_name": self.task.output_name}

    def _build(self, info) -> None:
        """The networks, masks and compiled KEModel (under the strategy's scope)."""
        config, m, size = self.config, self.config.model, self.config.data.image_size
        keras.utils.set_random_seed(config.seed)  # the initial weights of N_1
        dense = networks.build(m.arch, info.num_classes, size, stem=m.stem, head=m.head,
                               embedding_dim=m.embedding_dim, width_multiplier=m.width_multiplier)
        if config.strategy == "mirrored":  # BatchNorm statistics over the global batch, so
            for layer in dense.layers:  # that N devices compute what one device would
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
        s = config.split
        if config.method == "slim_scratch":  # the slim architecture, fresh weights, nothing reset
            self.network = slim.architecture(dense, masks_lib.compute(dense, "kels", s.split_rate))
            self.masks = {}
        elif config.method == "llf":
            self.network, self.masks = dense, methods.llf_masks(dense, s.reset_from)
        elif config.method in ("dsd", "dnr"):  # DSD never re-draws; DNR's masks come from data
            self.network, self.masks = dense, {}
        else:
            self.network = dense
            self.masks = masks_lib.compute(dense, s.split_mode, s.split_rate, seed=config.seed)
        # The networks evaluated every generation, built once (their predict functions too).
        self.nets: Dict[str, keras.Model] = {
            "slim" if config.method == "slim_scratch" else "dense": self.network}
        if config.method in ("ke", "long") and s.split_mode == "kels":
            self.nets["slim"] = slim.architecture(self.network, self.masks)
            if config.train.slim_bn_recalibration:
                self.nets["slim_recal"] = slim.architecture(self.network, self.masks)
        self.costs = {name: cost.total(net) for name, net in self.nets.items()}
        t = config.train
        held = list(methods.dsd_keep(dense, t.dsd_sparsity)) if config.method == "dsd" else ()
        cskd = (t.cskd_temperature, t.cskd_lambda) if t.regularizer == "cskd" else None
        self.model = model_lib.KEModel(self.network, weight_decay=t.weight_decay, cskd=cskd,
                                       held_at_zero=held)
        self.model.compile(
            # a fixed name: the checkpoint keys its variables by path ("sgd/...")
            optimizer=keras.optimizers.SGD(learning_rate=t.lr, momentum=t.momentum, name="sgd"),
            loss=self.task.make_loss(config), metrics=self.task.make_metrics(info.num_classes),
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

    # --- one generation ---------------------------------------------------------------------

    def train_generation(self, generation: int, monitor: Monitor,
                         first_epoch: int = 0) -> Dict[str, float]:
        """Train the current weights for e epochs (from `first_epoch` when resuming) with a
        restarted optimizer and schedule; checkpoints after every epoch; returns the last
        epoch's training metrics (`train_loss`, `train_top1`, ...)."""
        t = self.config.train
        if first_epoch == 0:
            model_lib.restart_optimizer(self.model.optimizer)
        callbacks = [model_lib.LearningRateSchedule(t.lr, self.epochs, t.warmup_epochs),
                     monitor.epoch_callback(generation, self.generations, self.epochs,
                                            first_epoch=first_epoch),
                     _EpochCheckpoint(self, generation)]
        if faults.active("batch"):
            callbacks.append(faults.BatchFaults())
        history = self.model.fit(
            self.data.train_from((generation - 1) * self.epochs + first_epoch),
            steps_per_epoch=self.data.steps_per_epoch, initial_epoch=first_epoch,
            epochs=self.epochs, verbose=0, shuffle=False, callbacks=callbacks)
        if history.history:
            self._train = {f"train_{k}": float(v[-1]) for k, v in history.history.items()}
        return {k: (100.0 * v if k != "train_loss" else v) for k, v in self._train.items()
                if k in self.task.train_columns}

    def evaluate(self, generation: int, train: Dict[str, float]) -> List[Dict]:
        """Rows of results.csv for N_g and (KELS) H_g as extracted and BN-recalibrated."""
        rows = []
        for name, net in self.nets.items():
            if net is not self.network:
                slim.copy_fit_weights(self.network, self.masks, net)
            if name == "slim_recal":
                slim.recalibrate_batchnorm(net, self.data.train_plain, self.config.data.recal_images)
            row = dict.fromkeys(self.columns, "")
            s, method = self.config.split, self.config.method
            row.update(generation=generation, net=name, method=method, **train)
            if method in ("ke", "long", "slim_scratch", "dnr"):  # the methods that use them
                row["split_rate"] = s.split_rate
                row["split_mode"] = s.split_mode if method != "dnr" else "dnr"
            for split, (dataset, labels) in self.eval_splits.items():
                outputs = np.asarray(net.predict(dataset, verbose=0), np.float32)
                row.update(self.task.evaluate(outputs, labels, split, self.config.seed))
            row["params"], row["macs"] = self.costs[name]
            rows.append(row)
        return rows

    # --- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, generation: int, epochs_done: int, evaluated: bool,
                        finished: bool = False) -> None:
        """Write `checkpoints/last`: weights, optimizer state, masks and where the run stands."""
        state = {"generation": generation, "epoch": epochs_done, "evaluated": evaluated,
                 "finished": finished, "train": self._train, "rows": self.rows,
                 "hypotheses": self.hypotheses,
                 "seconds": self._seconds + time.time() - self._since, **self._info}
        network = checkpoint.variables_of(self.network.variables)
        bad = [path for path, value in network.items() if not np.isfinite(value).all()]
        if bad:
            raise RunError(f"generation {generation}, epoch {epochs_done}: the weights are no "
                           f"longer finite ({bad[0]}, ...); the run stopped. The last good "
                           f"checkpoint is kept in {checkpoint.last_dir(self.config.run_dir)}. "
                           "Lower --lr or check the data, and start again with --overwrite")
        checkpoint.save(checkpoint.last_dir(self.config.run_dir), state, {
            "network": network,
            "optimizer": checkpoint.variables_of(self.model.optimizer.variables),
            "masks": self.masks,
            "held": {str(i): v for i, v in enumerate(self.model.held_values())}})

    def save_generation(self, generation: int) -> None:
        """`checkpoints/generation_NNN`: the networks as evaluated (slim: recalibrated), for
        export; then prune to --keep_generations."""
        nets = {"dense": self.nets.get("dense"),
                "slim": self.nets.get("slim_recal", self.nets.get("slim"))}
        arrays = {name: checkpoint.variables_of(net.variables)
                  for name, net in nets.items() if net is not None}
        arrays["masks"] = self.masks
        checkpoint.save(checkpoint.generation_dir(self.config.run_dir, generation),
                        dict(self._info, generation=generation), arrays)
        checkpoint.prune(self.config.run_dir, self.config.keep_generations)

    def restore(self, state: dict, arrays: dict) -> None:
        """Put the run back where `checkpoints/last` says it stood."""
        checkpoint.assign(self.network.variables, arrays["network"], "network")
        optimizer = self.model.optimizer
        if not optimizer.built:
            with self.strategy.scope():
                optimizer.build(self.model.trainable_variables)
        checkpoint.assign(optimizer.variables, arrays["optimizer"], "optimizer state")
        self.masks = {k: v.astype(bool) for k, v in arrays.get("masks", {}).items()}
        held = arrays.get("held", {})
        self.model.held_values([held[str(i)] for i in range(len(held))])
        self.rows, self.hypotheses = state["rows"], state["hypotheses"]
        self._train, self._seconds = state["train"], state["seconds"]
        if state["evaluated"]:  # the slim networks as evaluated (and exported) next
            for net in self.nets.values():
                if net is not self.network:
                    slim.copy_fit_weights(self.network, self.masks, net)
            shipped = self.nets.get("slim_recal", self.nets.get("slim"))
            if shipped is not None and shipped is not self.network:
                _, kept = checkpoint.load(
                    checkpoint.generation_dir(self.config.run_dir, state["generation"]))
                checkpoint.assign(shipped.variables, kept["slim"], "slim network")

    def _start(self) -> Optional[dict]:
        """A fresh run directory (None), or the state of the run to resume in it."""
        cfg, run_dir = self.config, self.config.run_dir
        flags = cfg.to_flags()
        config_path = os.path.join(run_dir, "config.json")
        last = checkpoint.last_dir(run_dir)
        checkpoint.clean(run_dir)
        if not cfg.overwrite and os.path.isdir(last):  # same flags: checked in __init__
            state, arrays = checkpoint.load(last)
            self.restore(state, arrays)
            return state
        os.makedirs(run_dir, exist_ok=True)
        for name in OUTPUTS:  # a fresh start: nothing of a previous run survives
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
        with atomic.open_atomic(config_path) as f:
            json.dump(flags, f, indent=2, sort_keys=True)
        masks_lib.save(os.path.join(run_dir, "masks.npz"), self.masks)
        return None

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        """All generations; writes the run directory; returns the rows of results.csv.

        A run directory holding an unfinished run with the same flags is resumed from its last
        checkpoint (`ke_tf.checkpoint`): same generation, last completed epoch, masks, optimizer
        and schedule position; a finished one is left as it is."""
        cfg, run_dir = self.config, self.config.run_dir
        state = self._start()
        if state and state.get("finished"):
            if self.verbose:
                print(f"{run_dir} holds a finished run; --overwrite starts it again")
            return self.rows
        resume_g = state["generation"] if state else 1
        monitor = Monitor(os.path.join(run_dir, "tensorboard"), cfg.to_flags(),
                          verbose=self.verbose, resumed=state is not None)
        try:
            for g in range(resume_g, self.generations + 1):
                resuming = state is not None and g == resume_g
                if not (resuming and state["evaluated"]):
                    if not resuming:
                        self._seconds = 0.0
                    self._since = time.time()
                    train = self.train_generation(g, monitor, state["epoch"] if resuming else 0)
                    rows = self.evaluate(g, train)
                    seconds = self._seconds + time.time() - self._since
                    for row in rows:  # training and evaluation of this generation
                        row["seconds"] = seconds
                    hyp = masks_lib.hypothesis_magnitudes(self.network, self.masks)
                    self.rows += rows
                    self.hypotheses += [
                        {"generation": g, "variable": k, "fit_mean_abs": float(f.mean()),
                         "reset_mean_abs": float(r.mean()) if r.size else ""}
                        for k, (f, r) in hyp.items()]
                    monitor.log_generation(g, rows, self.task.columns, train, hyp)
                    results.write_csv(os.path.join(run_dir, results.RESULTS), self.rows,
                                      self.columns)
                    results.write_csv(os.path.join(run_dir, results.HYPOTHESES),
                                      self.hypotheses, results.HYPOTHESES_COLUMNS)
                    self.save_generation(g)
                    self.save_checkpoint(g, self.epochs, evaluated=True)
                    monitor.print_table(self.rows, [c for c in self.columns if c not in
                                                    ("method", "split_mode", "split_rate", "macs")
                                                    and any(r[c] != "" for r in self.rows)])
                faults.point("evaluated")
                if g < self.generations:
                    self.reinitialize(g)
            if cfg.export:
                self.export(os.path.join(run_dir, "export"))
            self._since = time.time()
            self.save_checkpoint(self.generations, self.epochs, evaluated=True, finished=True)
        finally:
            monitor.close()
        return self.rows

    def reinitialize(self, generation: int) -> None:
        """Between generation g and g+1: Eq. 1 on the reset hypothesis (its variants by flag)."""
        cfg, s = self.config, self.config.split
        if cfg.method == "dsd":  # the next generation is sparse if even, dense (freed) if odd
            sparse = (generation + 1) % 2 == 0
            self.model.hold_at_zero(
                methods.dsd_keep(self.network, cfg.train.dsd_sparsity) if sparse else None)
            return
        if s.wels_rand:  # appendix D(1): a new random mask every generation
            self.masks = masks_lib.compute(self.network, "wels", s.split_rate,
                                           seed=(cfg.seed, generation + 1))
            masks_lib.save(os.path.join(cfg.run_dir, "masks.npz"), self.masks)
        if cfg.method == "dnr":  # data-aware: scored on this generation's trained weights
            t, info = cfg.train, self.data.info
            n = methods.dnr_batches(info.num_train, cfg.data.batch_size, t.dnr_data_fraction)
            self.masks = methods.dnr_masks(self.network, self.data.train_plain, n, s.split_rate,
                                           per_layer=t.dnr_threshold == "layer")
            masks_lib.save(os.path.join(cfg.run_dir, "masks.npz"), self.masks)
        if s.evolve_mode == "zero":
            reinit.apply(self.network, self.masks, reinit.zero_values(self.network, self.masks))
        else:
            seed = (cfg.seed, 1 if s.fix_reset_seed else generation)
            reinit.reset(self.network, self.masks, seed=seed, reset_init=s.reset_init)

    def export(self, directory: str) -> None:
        """The last generation's dense N_G and slim H_G as SavedModels (slim: recalibrated
        unless --slim_bn_recalibration=false)."""
        last = {"dense": self.nets.get("dense"),
                "slim": self.nets.get("slim_recal", self.nets.get("slim"))}
        for name, net in last.items():
            if net is not None:
                export.save_saved_model(net, os.path.join(directory, name), self.task.output_name)
                faults.point("export")
        if self.task.output_name == "logits":
            export.write_class_names(directory, self.data.info.class_names)
