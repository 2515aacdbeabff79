"""Watching a run: console progress and TensorBoard logs, one place for both.

Layout under `<run_dir>/tensorboard/`:
- `generation_001/`, `generation_002/`, ...: per-epoch curves of each generation (loss, train
  top-1, learning rate), step = epoch within the generation;
- `generations/`: one series indexed by generation (step = g): `<net>/<metric>` for every
  network row of results.csv (dense, slim, slim_recal), `train/top1`, and the mean |w| of the
  fit and reset hypotheses per layer (`fit/<layer>`, `reset/<layer>`, paper Fig. 7 and 15)
  with histograms of both; the run's flags as text at step 0.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import keras
import numpy as np
import tensorflow as tf


class EpochProgress(keras.callbacks.Callback):
    """A progress bar over the epochs of one generation, and per-epoch TensorBoard scalars."""

    def __init__(self, writer, generation: int, generations: int, epochs: int, verbose: bool):
        super().__init__()
        self.writer, self.epochs, self.verbose = writer, epochs, verbose
        self.title = f"generation {generation}/{generations}"
        self.bar = None

    def on_train_begin(self, logs=None):
        if self.verbose:
            print(self.title, flush=True)
            self.bar = None  # created at the first epoch end, when the metric names are known

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        logs["lr"] = float(self.model.optimizer.learning_rate.numpy())
        with self.writer.as_default(step=epoch + 1):
            for name, value in logs.items():
                tf.summary.scalar(name, float(value))
        if self.verbose:
            if self.bar is None:  # values are end-of-epoch numbers: never average them
                self.bar = keras.utils.Progbar(self.epochs, unit_name="epoch",
                                               stateful_metrics=list(logs))
            self.bar.update(epoch + 1, values=[(k, float(v)) for k, v in logs.items()],
                            finalize=epoch + 1 == self.epochs)


class Monitor:
    """TensorBoard writers of one run plus the console progress of its generations."""

    def __init__(self, log_dir: str, flags: Dict, verbose: bool = True):
        self.log_dir, self.verbose = log_dir, verbose
        os.makedirs(log_dir, exist_ok=True)
        self.generations = tf.summary.create_file_writer(os.path.join(log_dir, "generations"))
        with self.generations.as_default(step=0):
            tf.summary.text("flags", "```\n" + json.dumps(flags, indent=1, sort_keys=True) + "\n```")
        self._writers: List = [self.generations]

    def epoch_callback(self, generation: int, generations: int, epochs: int) -> EpochProgress:
        writer = tf.summary.create_file_writer(
            os.path.join(self.log_dir, f"generation_{generation:03d}"))
        self._writers.append(writer)
        return EpochProgress(writer, generation, generations, epochs, self.verbose)

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
                tf.summary.scalar(f"fit/{layer}", float(fit.mean()) if fit.size else 0.0)
                if reset.size:
                    tf.summary.scalar(f"reset/{layer}", float(reset.mean()))
            all_fit = np.concatenate([f for f, _ in hypotheses.values()] or [np.zeros(0)])
            all_reset = np.concatenate([r for _, r in hypotheses.values()] or [np.zeros(0)])
            if all_fit.size:
                tf.summary.histogram("hypotheses/fit", all_fit)
            if all_reset.size:
                tf.summary.histogram("hypotheses/reset", all_reset)
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
