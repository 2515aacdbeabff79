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

import csv
import io
import json
import os
import time
from typing import Dict, List, Optional

import keras
import numpy as np

from ke_tf import atomic, cost, data as data_lib, export, losses, masks as masks_lib, metrics
from ke_tf import model as model_lib, networks, reinit, slim
from ke_tf.config import ConfigError, RunConfig
from ke_tf.monitor import Monitor

RESULT_COLUMNS = ["generation", "net", "method", "split_mode", "split_rate", "test_top1",
                  "test_top5", "val_top1", "val_top5", "train_top1", "params", "macs", "seconds"]


def _cell(column: str, value):
    """results.csv formatting: accuracies with 4 decimals, seconds with 1, |w| with 6 digits."""
    if not isinstance(value, float) or column == "split_rate":
        return value
    if column == "seconds":
        return f"{value:.1f}"
    return f"{value:.6g}" if column.endswith("_abs") else f"{value:.4f}"


def _labels(dataset) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataset])


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
        self.data = data if data is not None else data_lib.load(config.data)
        info = self.data.info
        keras.utils.set_random_seed(config.seed)  # the initial weights of N_1
        m = config.model
        try:
            self.network = networks.build(m.arch, info.num_classes, config.data.image_size,
                                          stem=m.stem, head=m.head, embedding_dim=m.embedding_dim,
                                          width_multiplier=m.width_multiplier)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        s = config.split
        self.masks = masks_lib.compute(self.network, s.split_mode, s.split_rate, seed=config.seed)
        # The networks evaluated every generation, built once (their predict functions too).
        self.nets: Dict[str, keras.Model] = {"dense": self.network}
        if s.split_mode == "kels":
            self.nets["slim"] = slim.architecture(self.network, self.masks)
            if config.train.slim_bn_recalibration:
                self.nets["slim_recal"] = slim.architecture(self.network, self.masks)
        self.costs = {name: cost.total(net) for name, net in self.nets.items()}
        t = config.train
        self.model = model_lib.KEModel(self.network, weight_decay=t.weight_decay)
        smoothing = t.label_smoothing if t.regularizer == "smooth" else 0.0
        self.model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=t.lr, momentum=t.momentum),
            loss=losses.SparseCrossEntropy(label_smoothing=smoothing),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                     keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, info.num_classes),
                                                                 name="top5")])
        self.test_labels = _labels(self.data.test)
        self.val_labels = _labels(self.data.val) if self.data.val is not None else None
        self.rows: List[Dict] = []
        self.hypotheses: List[Dict] = []

    # --- one generation ---------------------------------------------------------------------

    def train_generation(self, generation: int, monitor: Monitor) -> float:
        """Train the current weights for e epochs with a restarted optimizer and schedule."""
        t = self.config.train
        model_lib.restart_optimizer(self.model.optimizer)
        history = self.model.fit(
            self.data.train, epochs=t.epochs, verbose=0, shuffle=False,
            callbacks=[model_lib.LearningRateSchedule(t.lr, t.epochs, t.warmup_epochs),
                       monitor.epoch_callback(generation, t.generations, t.epochs)])
        return 100.0 * float(history.history["top1"][-1])

    def _accuracy(self, net: keras.Model, dataset, labels) -> tuple:
        logits = net.predict(dataset, verbose=0)
        return metrics.topk_accuracy(logits, labels, 1), metrics.topk_accuracy(logits, labels, 5)

    def evaluate(self, generation: int, train_top1: float, seconds: float) -> List[Dict]:
        """Rows of results.csv for N_g and (KELS) H_g as extracted and BN-recalibrated."""
        for name, net in self.nets.items():
            if name != "dense":
                slim.copy_fit_weights(self.network, self.masks, net)
            if name == "slim_recal":
                slim.recalibrate_batchnorm(net, self.data.train_plain, self.config.data.recal_images)
        rows = []
        for name, net in self.nets.items():
            params, macs = self.costs[name]
            top1, top5 = self._accuracy(net, self.data.test, self.test_labels)
            val1 = val5 = ""
            if self.data.val is not None:
                val1, val5 = self._accuracy(net, self.data.val, self.val_labels)
            rows.append({
                "generation": generation, "net": name, "method": "ke",
                "split_mode": self.config.split.split_mode,
                "split_rate": self.config.split.split_rate, "test_top1": top1, "test_top5": top5,
                "val_top1": val1, "val_top5": val5, "train_top1": train_top1, "params": params,
                "macs": macs, "seconds": round(seconds, 2)})
        return rows

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        """All generations; writes the run directory; returns the rows of results.csv."""
        cfg = self.config
        run_dir = cfg.run_dir
        os.makedirs(run_dir, exist_ok=True)
        flags = cfg.to_flags()
        with atomic.open_atomic(os.path.join(run_dir, "config.json")) as f:
            json.dump(flags, f, indent=2, sort_keys=True)
        masks_lib.save(os.path.join(run_dir, "masks.npz"), self.masks)
        monitor = Monitor(os.path.join(run_dir, "tensorboard"), flags, verbose=self.verbose)
        try:
            for g in range(1, cfg.train.generations + 1):
                start = time.time()
                train_top1 = self.train_generation(g, monitor)
                rows = self.evaluate(g, train_top1, time.time() - start)
                hyp = masks_lib.hypothesis_magnitudes(self.network, self.masks)
                self.rows += rows
                self.hypotheses += [{"generation": g, "variable": k, "fit_mean_abs": float(f.mean()),
                                     "reset_mean_abs": float(r.mean()) if r.size else ""}
                                    for k, (f, r) in hyp.items()]
                self._write_csv(os.path.join(run_dir, "results.csv"), self.rows, RESULT_COLUMNS)
                self._write_csv(os.path.join(run_dir, "hypotheses.csv"), self.hypotheses,
                                ["generation", "variable", "fit_mean_abs", "reset_mean_abs"])
                monitor.log_generation(g, rows, train_top1, hyp)
                monitor.print_table(self.rows, ["generation", "net", "test_top1", "test_top5",
                                                "val_top1", "train_top1", "seconds"])
                if g < cfg.train.generations:
                    reinit.reset(self.network, self.masks, seed=(cfg.seed, g),
                                 reset_init=cfg.split.reset_init)
            if cfg.export:
                self.export(os.path.join(run_dir, "export"))
        finally:
            monitor.close()
        return self.rows

    def export(self, directory: str) -> None:
        """The last generation's dense N_G and slim H_G as SavedModels (slim: recalibrated
        unless --slim_bn_recalibration=false)."""
        export.save_saved_model(self.network, os.path.join(directory, "dense"))
        slim_net = self.nets.get("slim_recal", self.nets.get("slim"))
        if slim_net is not None:
            export.save_saved_model(slim_net, os.path.join(directory, "slim"))

    @staticmethod
    def _write_csv(path: str, rows: List[Dict], columns: List[str]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(k, v) for k, v in row.items()})
        with atomic.open_atomic(path) as f:
            f.write(buf.getvalue())
