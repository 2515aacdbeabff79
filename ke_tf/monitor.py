"""Watching a run: console progress and TensorBoard logs, one place for both.

Layout under `<run_dir>/tensorboard/`:
- `generation_001/`, `generation_002/`, ...: per-epoch curves of each generation (loss, train
  top-1, learning rate), step = epoch within the generation;
- `generations/`: one series indexed by generation (step = g): `<net>/<metric>` for every
  network row of results.csv (dense, slim, slim_recal; `test_top1`... or `recall_at_1`...),
  `train/top1`, `train/loss`, and the mean |w| of the fit and reset hypotheses per layer
  (`fit/<layer>`, `reset/<layer>`, paper Fig. 7 and 15) with histograms of both
  (`hypotheses/fit`, `hypotheses/reset`, of at most HISTOGRAM_VALUES evenly strided weights:
  TensorBoard's histogram op one-hot encodes every value, 8 s a generation for a network of
  54M weights), the generation each shipped network is selected
  from so far (`selected/dense`, `selected/slim`: `ke_tf.selection`) and, when --patience
  stopped the run, why (`stopped`, text); the run's flags as text (`flags`) at step 0;
- the directory itself: the HParams plugin's data, one session per run: the flags that tell
  runs apart (`HPARAMS`: method, split mode and rate, architecture, dataset...) and the metrics
  to compare them by (`METRICS`, read from `generations/`), so that
  `tensorboard --logdir runs/` lines up runs of different methods and split rates in one table.

A resumed run (`Monitor(..., resumed=True)`) appends to the same directories without writing
the flags and hparams again; a generation resumed after epoch k has its curve cut back to its
first k epochs (what the checkpoint holds) when it starts again.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Tuple

import keras
import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from ke_tf import config as C, selection
from ke_tf.hooks import Hook

# The flags that tell runs apart in the HParams dashboard, with their domains.
HPARAMS = (
    hp.HParam("dataset"),
    hp.HParam("task", hp.Discrete(list(C.TASKS))),
    hp.HParam("arch"),  # ARCHS, keras:NAME or custom
    hp.HParam("width_multiplier", hp.RealInterval(0.0, 4.0)),
    hp.HParam("image_size", hp.IntInterval(8, 1024)),
    hp.HParam("method", hp.Discrete(list(C.METHODS))),
    hp.HParam("split_mode", hp.Discrete(list(C.SPLIT_MODES))),
    hp.HParam("split_rate", hp.RealInterval(0.0, 1.0)),
    hp.HParam("evolve_mode", hp.Discrete(list(C.EVOLVE_MODES))),
    hp.HParam("reset_init", hp.Discrete(list(C.RESET_INITS))),
    hp.HParam("regularizer", hp.Discrete(list(C.REGULARIZERS))),
    hp.HParam("generations", hp.IntInterval(1, 10000)),
    hp.HParam("epochs"),
    hp.HParam("lr"),
    hp.HParam("weight_decay"),
    hp.HParam("batch_size"),
    hp.HParam("seed"),
)
_HPARAM_TYPES = {"dataset": str, "task": str, "arch": str, "width_multiplier": float,
                 "image_size": int, "method": str, "split_mode": str, "split_rate": float,
                 "evolve_mode": str, "reset_init": str, "regularizer": str, "generations": int,
                 "epochs": int, "lr": float, "weight_decay": float, "batch_size": int, "seed": int}
GENERATIONS_RUN = "generations"
HISTOGRAM_VALUES = 100_000  # weights a hypotheses/ histogram is drawn from, at most
# The metrics of the HParams table: the last generation's value of these `generations/` series.
# One list for both tasks (a dashboard mixes classification and metric-learning runs); a run
# shows the ones it has.
METRICS = tuple(
    hp.Metric(f"{net}/{column}", group=GENERATIONS_RUN, display_name=f"{label} {name}")
    for column, name in (("test_top1", "test top-1"), ("recall_at_1", "Recall@1"))
    for net, label in (("dense", "N_g"), ("slim", "H_g"), ("slim_recal", "H_g recal."))
) + (hp.Metric("train/top1", group=GENERATIONS_RUN, display_name="train top-1"),
     hp.Metric("train/loss", group=GENERATIONS_RUN, display_name="train loss"))


def experiment_summary():
    """The HParams experiment (`HPARAMS`, `METRICS`) as a Summary proto. Unlike
    `hp.hparams_config`, every hparam gets its type, those without a domain too (the UI filters
    and sorts columns by type)."""
    pb = hp.hparams_config_pb(hparams=list(HPARAMS), metrics=list(METRICS))
    content = pb.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
    for info in data.experiment.hparam_infos:
        if info.type == api_pb2.DATA_TYPE_UNSET:
            info.type = (api_pb2.DATA_TYPE_STRING if _HPARAM_TYPES[info.name] is str
                         else api_pb2.DATA_TYPE_FLOAT64)
    content.content = data.SerializeToString()
    return pb


def hparams_of(flags: Dict) -> Dict[str, object]:
    """The `HPARAMS` values of a run's flags (config.json), typed; absent or None ones left out."""
    return {name: kind(flags[name]) for name, kind in _HPARAM_TYPES.items()
            if flags.get(name) is not None}


def truncate_events(log_dir: str, last_step: int) -> None:
    """Keep only the summaries of steps <= `last_step` in the event files of `log_dir` (one
    file, under the name of the first); a record cut short by a crash ends its file."""
    files = sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    if not files:
        return
    kept = []
    for path in files:
        try:
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                if not event.HasField("summary") or event.step <= last_step:
                    kept.append(record.numpy())
        except tf.errors.DataLossError:  # the last record, cut short by the crash: dropped
            pass
    staged = os.path.join(log_dir, ".tmp-events")
    with tf.io.TFRecordWriter(staged) as writer:
        for record in kept:
            writer.write(record)
    os.replace(staged, files[0])
    for path in files[1:]:
        os.unlink(path)


class Monitor(Hook):
    """TensorBoard writers of one run plus the console progress of its generations (a hook:
    `ke_tf.hooks`): a progress bar over each generation's epochs, the per-epoch curves, the
    generation's points and the results table so far."""

    def __init__(self, log_dir: str, flags: Dict, verbose: bool = True, resumed: bool = False):
        """`flags`: the run's flat flags (config.json). `resumed`: the run goes on in a log
        directory that already holds its flags and hparams: they are not written again."""
        self.log_dir, self.verbose = log_dir, verbose
        os.makedirs(log_dir, exist_ok=True)
        self.generations = tf.summary.create_file_writer(os.path.join(log_dir, GENERATIONS_RUN))
        self._writers: List = [self.generations]
        self._epochs = None  # the writer and progress bar of the generation being trained
        if not resumed:
            self._write_flags(flags)

    def _write_flags(self, flags: Dict) -> None:
        with self.generations.as_default(step=0):
            text = json.dumps(flags, indent=1, sort_keys=True)
            tf.summary.text("flags", f"```\n{text}\n```")
        self.generations.flush()
        session = tf.summary.create_file_writer(self.log_dir)
        try:
            with session.as_default(step=0):
                tf.summary.experimental.write_raw_pb(experiment_summary().SerializeToString(), 0)
                hp.hparams(hparams_of(flags))
        finally:
            session.close()

    def generation_start(self, run, state) -> None:
        """The generation's curve (`generation_NNN/`), cut back to the epochs its checkpoint
        holds (`state.epoch`: a resumed generation), so epochs logged after the checkpoint and
        trained again are not drawn twice."""
        log_dir = os.path.join(self.log_dir, f"generation_{state.generation:03d}")
        truncate_events(log_dir, state.epoch)
        writer = tf.summary.create_file_writer(log_dir)
        self._writers.append(writer)
        self._epochs = [writer, None]
        if self.verbose:
            print(f"generation {state.generation}/{run.generations}", flush=True)

    def epoch_end(self, run, state) -> None:
        """The epoch's training metrics and learning rate: scalars (step = epoch) and the bar."""
        writer, bar = self._epochs
        logs = {k[len("train_"):]: v for k, v in state.train.items()}
        logs["lr"] = float(run.model.optimizer.learning_rate.numpy())
        with writer.as_default(step=state.epoch):
            for name, value in logs.items():
                tf.summary.scalar(name, float(value))
        if self.verbose:
            if bar is None:  # values are end-of-epoch numbers: never average them
                bar = self._epochs[1] = keras.utils.Progbar(
                    run.epochs, unit_name="epoch", stateful_metrics=list(logs))
            bar.update(state.epoch, values=[(k, float(v)) for k, v in logs.items()],
                       finalize=state.epoch == run.epochs)

    def generation_end(self, run, state, evaluation) -> None:
        self.log_generation(evaluation.generation, evaluation.rows, run.task.columns,
                            evaluation.train, evaluation.hypotheses)
        self.log_selection(evaluation.generation, state.selected, state.stopped)
        rows = run.rows()
        self.print_table(rows, [c for c in run.columns if c not in
                                ("method", "split_mode", "split_rate", "macs", "stopped")
                                and any(r[c] != "" for r in rows)])
        if self.verbose and run.config.select_by != selection.LAST:
            print(f"selected by {run.config.select_by}: {selection.describe(state.selected)}")
        if self.verbose and state.stopped:
            print(state.stopped, flush=True)

    def log_selection(self, generation: int, selected: Dict[str, int], stopped: str) -> None:
        """`selected/<net>`: the generation each shipped network would ship after this one;
        `stopped`: the early stop's reason, as text, at the generation it stopped after."""
        with self.generations.as_default(step=generation):
            for name, g in selected.items():
                tf.summary.scalar(f"selected/{name}", g)
            if stopped:
                tf.summary.text("stopped", stopped)
        self.generations.flush()

    def log_generation(self, generation: int, rows: List[Dict], columns, train: Dict[str, float],
                       hypotheses: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> None:
        """Scalars of one finished generation: every evaluation `column` of every network row,
        the training metrics, and `hypotheses`: variable -> (fit |w|, reset |w|)."""
        with self.generations.as_default(step=generation):
            for row in rows:
                for key in columns:
                    if row.get(key, "") != "":
                        tf.summary.scalar(f"{row['net']}/{key}", float(row[key]))
            for key, value in train.items():
                tf.summary.scalar(key.replace("train_", "train/"), value)
            for layer, (fit, reset) in hypotheses.items():
                if fit.size:  # LLF resets some kernels whole: no fit hypothesis there
                    tf.summary.scalar(f"fit/{layer}", float(fit.mean()))
                if reset.size:
                    tf.summary.scalar(f"reset/{layer}", float(reset.mean()))
            all_fit = np.concatenate([f for f, _ in hypotheses.values()] or [np.zeros(0)])
            all_reset = np.concatenate([r for _, r in hypotheses.values()] or [np.zeros(0)])
            for name, values in (("fit", all_fit), ("reset", all_reset)):
                if values.size:
                    stride = -(-values.size // HISTOGRAM_VALUES)
                    tf.summary.histogram(f"hypotheses/{name}", values[::stride])
        self.generations.flush()

    def print_table(self, rows: List[Dict], columns: List[str]) -> None:
        """The per-generation results so far, as a console table."""
        if not self.verbose:
            return
        widths = [max(len(c), 8) for c in columns]
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in rows:
            cells = []
            for c, w in zip(columns, widths):
                v = row.get(c, "")
                cells.append((f"{v:.2f}" if isinstance(v, float) else str(v)).rjust(w))
            print("  ".join(cells))
        print(flush=True)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []
