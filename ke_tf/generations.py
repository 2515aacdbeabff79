"""GenerationRunner: the Knowledge Evolution loop (sec. 3.1, Algorithm 1 lines 16-28).

Built once: data, the dense network N, its split masks M, the KEModel with its optimizer and
compiled train function, and the networks evaluated every generation. Then, for g = 1..G:

    train N for e epochs (optimizer state and lr schedule restarted; same settings every g)
    extract the slim H_g: copy the fit hypothesis into it, re-estimate its BatchNorm statistics
    evaluate N_g and H_g; record the rows and the mean |w| of both hypotheses (`RunState`)
    select the generation each shipped network would ship so far (`ke_tf.selection`)
    the hooks: TensorBoard and console, results.csv, checkpoints (`ke_tf.hooks`)
    stop if --patience generations brought no gain on the validation metric (sec. 6)
    if g < G: the method's rule between generations, for KE Eq. 1: W = M*W + (1-M)*W_r

What differs between methods (KE, the long baseline, LLF, DSD, DNR, ...) is asked of the run's
`ke_tf.methods` object; the loop never tests a method's name. Weights pass from one generation
to the next in memory; the shipped networks are the selected generations' N_g and H_g (the
last's by default), read back from their checkpoints when they are not the last. Files are
for watching, resuming and shipping a run, not for handing generations over: the run directory
(fresh start, resume) is `ke_tf.rundir`'s, the devices and machines `ke_tf.distribution`'s.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from ke_tf import checkpoint, cost, data as data_lib, distribution, divergence, export, faults
from ke_tf import masks as masks_lib, methods, model as model_lib, networks, precision, results
from ke_tf import rules, rundir, selection, slim, tasks
from ke_tf.config import RunConfig
from ke_tf.hooks import Evaluation, Hook, Hooks
from ke_tf.state import RunState

SKIPPED_SHOWN = 20  # files --skip_corrupt_images left out, listed on the console (the rest counted)

class _EpochEnd(keras.callbacks.Callback):
    """After every epoch of `fit`: stop on non-finite numbers (`check_finite`), else advance
    the state by the epoch (reading `logs`) and call the hooks' `epoch_end`."""

    def __init__(self, run: "GenerationRunner", state: RunState, hooks: Hooks):
        super().__init__()
        self.run, self.state, self.hooks = run, state, hooks

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        divergence.check_finite(self.run.config.run_dir, self.state.generation, epoch + 1, logs,
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

    After `run()`: `state` (`ke_tf.state.RunState`: the rows of results.csv, the generation
    each shipped network was selected from (`selected`), why the run stopped early
    (`stopped`), ...), `network` (the trained dense network, holding the selected N_g),
    `shipped()` (the selected N_g and H_g), `nets` (the networks evaluated, by row name),
    `masks`.
    """

    def __init__(self, config: RunConfig, data: Optional[data_lib.Data] = None,
                 verbose: bool = True, hooks: Sequence[Hook] = (),
                 network: Optional[keras.Model] = None):
        self.config = rules.check(config, network_given=network is not None)
        # First: MultiWorkerMirroredStrategy must precede every other TensorFlow op.
        self.strategy = distribution.strategy(config)
        self.chief = distribution.is_chief(config)  # writes the run directory
        self.method = methods.create(config)
        self.verbose, self.extra_hooks = verbose, list(hooks)
        self._network = network
        rundir.refuse_other_run(config)
        self.data = data if data is not None else data_lib.load(config.data)
        self.task = tasks.TASKS[config.data.task]
        info = self.data.info
        selection.check_validation(config, info.has_val, config.data.dataset)
        if info.skipped_files and verbose:
            shown = info.skipped_files[:SKIPPED_SHOWN]
            more = len(info.skipped_files) - len(shown)
            print(f"--skip_corrupt_images: left out {len(info.skipped_files)} corrupt or "
                  "non-image files:\n  " + "\n  ".join(shown)
                  + (f"\n  ... and {more} more" if more else ""))
        self.generations, self.epochs = self.method.schedule()
        if config.deterministic:  # bit-identical reruns and resumes (TensorFlow op determinism)
            tf.config.experimental.enable_op_determinism()
        with precision.policy(config), self.strategy.scope():  # layers keep their policy
            self._build(info)
        self.eval_splits = {split: (ds, np.concatenate([y.numpy() for _, y in ds]))
                            for split, ds in (("test", self.data.test), ("val", self.data.val))
                            if ds is not None and split in self.task.splits}
        self.columns = results.columns(self.task)
        self.info = {"num_classes": info.num_classes, "class_names": list(info.class_names),
                     "output_name": self.task.output_name}  # what an export needs
        self.state: Optional[RunState] = None

    def _build(self, info) -> None:
        """The networks, masks and compiled KEModel (under the strategy's scope)."""
        config = self.config
        keras.utils.set_random_seed(config.seed)  # the initial weights of N_1
        dense = self._network or networks.from_config(config, info.num_classes)
        distribution.synchronize_batchnorm(config, dense)
        self.network = self.method.network(dense)
        self.masks = self.method.initial_masks(self.network)
        # The networks evaluated every generation, built once (their predict functions too).
        self.nets: Dict[str, keras.Model] = self.method.networks_to_evaluate(self.network,
                                                                             self.masks)
        self.costs = {name: cost.total(net) for name, net in self.nets.items()}
        self.model = model_lib.compile_ke_model(
            self.network, config, info.num_classes,
            held_at_zero=self.method.held_at_zero(self.network),
            teacher=self.method.teacher(self.network))

    @property
    def loss(self) -> keras.losses.Loss:
        """The training loss; AdaCos's has a state (its scale), restarted with the optimizer
        and checkpointed."""
        return self.model.loss

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        """All generations; writes the run directory; returns the rows of results.csv.

        A run directory holding an unfinished run with the same flags is resumed: its
        `RunState` and arrays are loaded from `checkpoints/last` and the same loop goes on
        (same generation, last completed epoch, masks, optimizer and schedule position)."""
        state, resumed = rundir.start(self)
        self.state = state
        if resumed and self.chief:
            rundir.repair(self, state)
        if state.finished:
            if self.verbose:
                print(f"{self.config.run_dir} holds a finished run; --overwrite starts it again")
            self.ship_selected()
            return self.rows()
        hooks = Hooks(rundir.hooks(self, resumed) + [faults.FaultPoints()] + self.extra_hooks)
        try:
            for g in range(state.generation, self.generations + 1):
                if not state.evaluated:
                    train = self.train(state, hooks)  # optimizer and lr schedule restarted
                    self.extract_slim()  # H_g: the fit hypothesis, BatchNorm re-estimated
                    evaluation = self.evaluate(g, train)
                    state.record(evaluation.rows, evaluation.hypotheses)
                    state.selected = selection.select(state.rows, self.shipped_rows(),
                                                      self.config)
                    state.stopped = selection.stop_reason(state.selected, g, self.generations,
                                                          self.config)
                    hooks.generation_end(self, state, evaluation)
                if state.stopped or g == self.generations:
                    break
                self.between_generations(g)  # the method's rule; KE: Eq. 1
                state.next_generation()
            self.ship_selected()
            if self.config.export and self.chief:
                self.export(os.path.join(self.config.run_dir, "export"))
            state.finished = True
            hooks.run_end(self, state)
        finally:
            hooks.close()
        return self.rows()

    # --- the steps of the loop -------------------------------------------------------------------

    def train(self, state: RunState, hooks: Hooks) -> Dict[str, float]:
        """Train generation `state.generation` for its e epochs, from `state.epoch` (0: the
        optimizer state zeroed and the schedule restarted, sec. 3.1; more: a resumed
        generation goes on); returns the last epoch's training metrics as results.csv has
        them (`train_loss`, `train_top1` in percent, ...). A loss with a state restarts with
        the optimizer (AdaCos's scale: sqrt(2) ln(C - 1) again)."""
        t = self.config.train
        if state.epoch == 0:
            model_lib.restart(self.model)
        hooks.generation_start(self, state)
        callbacks = [model_lib.LearningRateSchedule(t.lr, self.epochs, t.warmup_epochs),
                     _EpochEnd(self, state, hooks)]
        if faults.active("batch"):
            callbacks.append(faults.BatchFaults())
        batches = self.data.train_from((state.generation - 1) * self.epochs + state.epoch)
        if distribution.is_multi_worker(self.strategy):  # Keras's fit fails there (keras#20585)
            distribution.fit(self.model, batches, steps_per_epoch=self.data.steps_per_epoch,
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
        predict = (distribution.predict if distribution.is_multi_worker(self.strategy)
                   else lambda net, dataset: net.predict(dataset, verbose=0))
        rows = [results.row(self.columns, generation=generation, net=name, method=self.method,
                            train=train, cost=self.costs[name],
                            scores=[self.task.evaluate(np.asarray(predict(net, ds), np.float32),
                                                       labels, split, self.config.seed,
                                                       self.config.train.loss)
                                    for split, (ds, labels) in self.eval_splits.items()])
                for name, net in self.nets.items()]
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
        return {name: self.nets[row] for name, row in self.shipped_rows().items()}

    def shipped_rows(self) -> Dict[str, str]:
        """{shipped network: its row name in results.csv}: "dense", and "slim" as "slim_recal"
        when the run re-estimates BatchNorm statistics, else as "slim"."""
        rows = {"dense": "dense", "slim": "slim_recal" if "slim_recal" in self.nets else "slim"}
        return {name: row for name, row in rows.items() if row in self.nets}

    def rows(self) -> List[Dict]:
        """The rows of results.csv as written: the selected rows and an early stop marked."""
        return results.marked(self.state.rows, {self.shipped_rows()[name]: g for name, g
                                                in self.state.selected.items()},
                              self.state.stopped)

    def ship_selected(self) -> None:
        """Put the selected generation's weights into every shipped network that does not hold
        them (`state.selected`; the last generation's are in memory), from its checkpoint in
        `checkpoints/generation_NNN` (kept whatever --keep_generations says). The chief's
        only: the other workers of --strategy=multi_worker, which neither write nor export,
        keep the last generation's weights (their `state.selected` is the chief's, checked)."""
        if not self.chief:
            return
        for name, net in self.shipped().items():
            generation = self.state.selected.get(name, self.state.generation)
            if generation != self.state.generation:
                _, kept = checkpoint.load(checkpoint.generation_dir(self.config.run_dir,
                                                                    generation))
                checkpoint.assign(net.variables, kept[name],
                                  f"{name} network of generation {generation}")

    def export(self, directory: str) -> None:
        """The shipped networks as SavedModels (and the class names)."""
        for name, net in self.shipped().items():
            export.save_saved_model(net, os.path.join(directory, name), self.task.output_name)
            faults.point("export")
        if self.task.output_name == "logits":
            export.write_class_names(directory, self.data.info.class_names)

    def arrays(self) -> Dict[str, Dict[str, np.ndarray]]:
        """What `checkpoints/last` holds besides the state (`rundir.arrays`)."""
        return rundir.arrays(self)
