"""The two evaluation tasks of the paper (sec. 3.4): what is trained and what is measured.

- classification: cross entropy (Eq. 2, optionally label smoothing) on logits; top-1 / top-5
  accuracy on the test split and, where the run has one, the validation split (Table 2), whose
  mean cross entropy (no smoothing) is val_loss.
  With `--loss=adacos` the logits are AdaCos's (Zhang et al., CVPR 2019): the network outputs
  cosines, which `losses.AdaCosLoss` scales adaptively for training and evaluation ranks.
- metric: semi-hard triplet loss (Eq. 3-4) on L2-normalized embeddings; Recall@1, 2, 4, 8 and
  NMI on the class-disjoint test classes (sec. 4.2, Table 4, appendix C.2), and with the
  "val_" prefix on class-disjoint validation classes where the run has them.

A `Task` gives the GenerationRunner its loss, its training metrics, the results.csv columns and
the evaluation of one network's outputs, so the KE loop is the same for both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import keras
import numpy as np

from ke_tf import losses, metrics, rules
from ke_tf.config import RunConfig

RECALL_KS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    output_name: str  # the SavedModel signature's output
    columns: Tuple[str, ...]  # results.csv evaluation columns, percent
    make_loss: Callable[[RunConfig, int], keras.losses.Loss]  # (config, num_classes)
    make_metrics: Callable[[int], List[keras.metrics.Metric]]
    # (outputs, labels, split, seed, loss) -> {column: value}; `loss`: --loss (val_loss: "ce")
    evaluate: Callable[..., Dict[str, float]]
    splits: Tuple[str, ...]  # splits evaluated, when the dataset has them
    train_columns: Tuple[str, ...]  # results.csv columns of the last training epoch


def _classification_loss(cfg: RunConfig, num_classes: int) -> keras.losses.Loss:
    t = cfg.train
    smoothing = t.label_smoothing if t.regularizer == "smooth" else 0.0
    if t.loss == "adacos":
        rules.check_classes(cfg, num_classes)
        return losses.AdaCosLoss(num_classes, smoothing)
    return losses.SparseCrossEntropy(smoothing)


def _classification_metrics(num_classes: int):
    return [keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]


def _classification_eval(logits, labels, split: str, seed: int,
                         loss: str = "ce") -> Dict[str, float]:
    top5 = min(5, logits.shape[-1])  # a folder dataset may have fewer than 5 classes
    out = {f"{split}_top1": metrics.topk_accuracy(logits, labels, 1),
           f"{split}_top5": metrics.topk_accuracy(logits, labels, top5)}
    if split == "val" and loss == "ce":  # AdaCos's outputs are cosines, not logits
        out["val_loss"] = metrics.cross_entropy(logits, labels)
    return out


def _metric_loss(cfg: RunConfig, num_classes: int) -> keras.losses.Loss:
    return losses.TripletSemiHardLoss(margin=cfg.train.triplet_margin)


def _metric_eval(embeddings, labels, split: str, seed: int, loss: str = "ce") -> Dict[str, float]:
    prefix = "val_" if split == "val" else ""  # the test columns keep the paper's names
    if not np.isfinite(embeddings).all():  # a diverged network: record it, don't crash k-means
        return {f"{prefix}{c}": float("nan") for c in METRIC_COLUMNS}
    recalls = metrics.recall_at_k(embeddings, labels, RECALL_KS)
    out = {f"{prefix}recall_at_{k}": recalls[k] for k in RECALL_KS}
    out[f"{prefix}nmi"] = 100.0 * metrics.nmi(embeddings, labels, seed=seed)
    return out


METRIC_COLUMNS = tuple(f"recall_at_{k}" for k in RECALL_KS) + ("nmi",)

CLASSIFICATION = Task(
    name="classification", output_name="logits",
    columns=("test_top1", "test_top5", "val_top1", "val_top5", "val_loss"),
    make_loss=_classification_loss, make_metrics=_classification_metrics,
    evaluate=_classification_eval, splits=("test", "val"),
    train_columns=("train_loss", "train_top1", "train_top5"))

METRIC = Task(
    name="metric", output_name="embeddings",
    columns=METRIC_COLUMNS + tuple(f"val_{c}" for c in METRIC_COLUMNS),
    make_loss=_metric_loss, make_metrics=lambda num_classes: [],
    evaluate=_metric_eval, splits=("test", "val"), train_columns=("train_loss",))

TASKS = {t.name: t for t in (CLASSIFICATION, METRIC)}
