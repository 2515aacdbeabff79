"""The datasets of the paper (Table 1) and a small embedded one, as batched `tf.data` pipelines.

`load(DataConfig)` returns a `Data`: endless shuffled, augmented training batches from any epoch
on (`train_from(e)`, `steps_per_epoch` batches an epoch), the training images with evaluation
preprocessing in a fixed order (`train_plain`, for BatchNorm re-estimation), `val` (or None) and
`test`; P x K class-balanced training batches for task="metric", anchor/partner pairs for CS-KD.

  sources     where the images come from: scikit-learn's digits (embedded), the tfds datasets
              (prepared offline from --manual_dir, or a DataError saying how), image folders
              (corrupt files found by `image_problem`), the class-disjoint metric protocols.
  transforms  the official code's torchvision preprocessing: RandomResizedCrop + flip for
              training (`Augment`: `NATURAL`, milder `DIGITS`), Resize + CenterCrop for
              evaluation, ImageNet normalization; all stateless.
  pipelines   `load`, `Data`, `DatasetInfo`: decoded images cached in memory, epoch-indexed
              permutations, P x K and CS-KD streams, evaluation batches.

All randomness is derived from `cfg.seed` and the epoch's index alone, never from how many epochs
this process has already read: the training stream of epoch e is a function of (seed, e), so
epoch e has the same batches in a run that resumes at epoch e as in one that never stopped.
"""
from ke_tf.data import pipelines, sources, transforms
from ke_tf.data.pipelines import Data, DatasetInfo, anchors_then_partners, from_datasets, load
from ke_tf.data.sources import DataError, image_problem, naming_undecodable, undecodable
from ke_tf.data.transforms import (
    DIGITS, IMAGENET_MEAN, IMAGENET_STD, NATURAL, Augment, eval_side, eval_transform, normalize,
    random_resized_crop, resize_shorter_side, train_transform)

__all__ = [
    "pipelines", "sources", "transforms",
    "Data", "DatasetInfo", "anchors_then_partners", "from_datasets", "load",
    "DataError", "image_problem", "naming_undecodable", "undecodable",
    "DIGITS", "IMAGENET_MEAN", "IMAGENET_STD", "NATURAL", "Augment", "eval_side", "eval_transform",
    "normalize", "random_resized_crop", "resize_shorter_side", "train_transform",
]
