"""The batched `tf.data` pipelines of a `sources.Source`, preprocessed by `transforms`.

`load(DataConfig)` returns a `Data`: `train_from(e)` (the shuffled, augmented training batches of
epochs e, e+1, ... without end; `steps_per_epoch` batches each), `train` (epoch 0 alone),
`train_plain` (the training images with evaluation preprocessing, in a fixed class-mixed order,
for re-estimating BatchNorm statistics from its first batches), `val` (or None) and `test`.
Batches are (float32 [B, H, W, 3] images, int32 [B] labels); the last batch may be smaller.

Every image is decoded and resized to the evaluation size once (uint8) and kept in memory when
the split fits in CACHE_BYTES (train first); training images are then read by index from a
random-access store, so an epoch's order can be a stateless permutation. All randomness is
derived from `cfg.seed` and the epoch's index alone, never from how many epochs this process
has already read: epoch e has the same batches in a run that resumes at epoch e as in one that
never stopped. (A classification training split too big for memory falls back to a shuffle
buffer, whose epochs do depend on how many this process has read.)

task="metric": an epoch of `train` is floor(num_train / (P * K)) batches of P = `p_classes`
distinct classes (uniformly drawn) x K = `k_images` images each; every class yields its images
in a new shuffled order each pass (cycling if drawn often), restarted every epoch. `test` holds
the test classes (`DatasetInfo.test_class_names`), disjoint from the training ones.
With `class_pairs` (CS-KD) a training batch is b/2 anchors of distinct classes followed by a
partner of the same class for each (`anchors_then_partners`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from ke_tf.config import IN_MEMORY, DataConfig
from ke_tf.data.sources import DataError, Pool, Source, read_source
from ke_tf.data.transforms import eval_transform, train_transform

AUTOTUNE = tf.data.AUTOTUNE
CACHE_BYTES = 2 * 1024**3  # decoded uint8 images kept in memory, at most (train first)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    num_train: int
    num_test: int
    num_val: int  # 0 without a validation split
    has_val: bool
    # The classes of `test`: task="metric" has its own (disjoint) ones; else the same as train's.
    num_test_classes: int
    test_class_names: tuple[str, ...]
    # folder datasets with skip_corrupt_images: the files left out (else always empty)
    skipped_files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Data:
    info: DatasetInfo
    train_from: Callable[[int], tf.data.Dataset]  # endless batches of epochs e, e+1, ...
    steps_per_epoch: int
    train_plain: tf.data.Dataset  # training images, eval preprocessing, fixed order
    val: Optional[tf.data.Dataset]
    test: tf.data.Dataset


def load(cfg: DataConfig) -> Data:
    """The four pipelines of `cfg.dataset`; raises DataError (or ConfigError) on bad input."""
    cfg.validate()
    if cfg.dataset == IN_MEMORY:
        raise DataError(f"--dataset={IN_MEMORY}: the data are given from Python "
                        "(ke_tf.data.from_datasets), not loaded")
    tf.random.set_seed(cfg.seed)  # tf.data's shuffle seeds mix in the global seed
    src = read_source(cfg)
    if cfg.task == "metric":
        return _metric(cfg, src)

    image_bytes = src.side * src.side * 3  # a square image; wider ones take more
    budget = CACHE_BYTES
    decoded, store = {}, None
    for split, (ds, n) in src.splits.items():  # train first: it is read every epoch
        ds = ds.map(lambda raw, y: (src.decode(raw), y), num_parallel_calls=AUTOTUNE)
        if n * image_bytes <= budget:
            budget -= n * image_bytes
            if split == "train":  # random access: epoch e's order is a function of e
                store = _Store(ds, n)
                ds = tf.data.Dataset.range(n).map(store.example, num_parallel_calls=AUTOTUNE)
            else:
                ds = ds.cache()
        decoded[split] = ds

    size, batch = cfg.image_size, cfg.batch_size
    counts = {split: n for split, (_, n) in src.splits.items()}
    names = src.class_names
    if cfg.class_pairs:  # CS-KD: b/2 anchors of distinct classes, then a partner of each's class
        ds, n = src.splits["train"]
        raw, labels = ds.batch(n).get_single_element()
        pool = Pool(raw, labels.numpy(), names)
        pairs, steps, _ = _pk_stream(cfg, src, pool, cfg.batch_size // 2, 2,
                                     (f"--batch_size={cfg.batch_size} (half of it, classes "
                                      "per batch, with --regularizer=cskd)",
                                      "--regularizer=cskd"))

        def train_from(first: int) -> tf.data.Dataset:
            return pairs(first).map(anchors_then_partners).prefetch(AUTOTUNE)
    else:
        steps = math.ceil(counts["train"] / batch)

        def augmented(index, example, seed):
            image = train_transform(
                example[0], tf.random.experimental.stateless_fold_in(seed, index), size,
                src.augment)
            return image, example[1]

        def one_epoch(e):  # a permutation and per-image augmentation seeds, from (seed, e)
            seed = _epoch_seed(cfg.seed, e)
            order = tf.random.experimental.stateless_shuffle(
                tf.range(counts["train"], dtype=tf.int64),
                tf.random.experimental.stateless_fold_in(seed, 0))
            augment = tf.random.experimental.stateless_fold_in(seed, 1)
            return tf.data.Dataset.from_tensor_slices(order).enumerate().map(
                lambda i, j: augmented(i, store.example(j), augment),
                num_parallel_calls=AUTOTUNE).batch(batch)

        def train_from(first: int) -> tf.data.Dataset:
            if store is not None:
                return _endless(first).flat_map(one_epoch).prefetch(AUTOTUNE)
            # Too big for memory: a shuffle buffer, reshuffled every pass. Epoch e then depends
            # on how many epochs this process has read (a resumed run gets other batches).
            ds = decoded["train"].shuffle(CACHE_BYTES // image_bytes, seed=cfg.seed,
                                          reshuffle_each_iteration=True).repeat()
            seeds = tf.data.Dataset.random(seed=cfg.seed + first).batch(2)
            return tf.data.Dataset.zip(ds.enumerate(), seeds).map(
                lambda ixy, seed: augmented(ixy[0], ixy[1], seed),
                num_parallel_calls=AUTOTUNE).batch(batch).prefetch(AUTOTUNE)

    info = DatasetInfo(
        name=cfg.dataset, num_classes=len(names), class_names=names,
        image_size=size, num_train=counts["train"], num_test=counts["test"],
        num_val=counts.get("val", 0), has_val="val" in counts,
        num_test_classes=len(names), test_class_names=names, skipped_files=src.skipped)
    return Data(info=info, train_from=train_from, steps_per_epoch=steps,
                train_plain=_evaluation(decoded["train"], cfg),
                val=_evaluation(decoded["val"], cfg) if "val" in decoded else None,
                test=_evaluation(decoded["test"], cfg))


class _Store:
    """The decoded images of a (uint8 image, int32 label) dataset of `n` examples, in memory
    and addressable by index: a cache with random access, so that an epoch's order can be a
    stateless permutation."""

    def __init__(self, ds: tf.data.Dataset, n: int):
        flat = ds.map(lambda x, y: (tf.reshape(x, [-1]), tf.shape(x), y),
                      num_parallel_calls=AUTOTUNE)
        values, self.shapes, self.labels = flat.ragged_batch(n).get_single_element()
        if isinstance(values, tf.RaggedTensor):
            self.pixels, self.starts = values.flat_values, values.row_starts()
        else:  # all images of one size: ragged_batch gave a dense [n, pixels] tensor
            self.pixels = tf.reshape(values, [-1])
            self.starts = tf.range(n, dtype=tf.int64) * tf.cast(tf.shape(values)[1], tf.int64)
        self.sizes = tf.reduce_prod(tf.cast(self.shapes, tf.int64), axis=1)

    def image(self, j: tf.Tensor) -> tf.Tensor:
        return tf.reshape(self.pixels[self.starts[j]:self.starts[j] + self.sizes[j]],
                          self.shapes[j])

    def example(self, j: tf.Tensor):
        return self.image(j), self.labels[j]


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The int64 [2] stateless seed of one epoch: every random choice of the epoch derives
    from it."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _endless(first: int) -> tf.data.Dataset:
    """Epoch indices first, first+1, ... (as good as endless)."""
    return tf.data.Dataset.range(int(first), 2**62)


def _evaluation(ds: tf.data.Dataset, cfg: DataConfig) -> tf.data.Dataset:
    """Decoded (uint8 image, label) -> eval preprocessing, batches of cfg.batch_size."""
    ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size), y), num_parallel_calls=AUTOTUNE)
    return ds.batch(cfg.batch_size).prefetch(AUTOTUNE)


def _pk_stream(cfg: DataConfig, src: Source, pool: Pool, p: int, k: int, flags: tuple):
    """Batches of P distinct classes (uniform, without replacement) x K images, grouped by class
    (c1 x K, c2 x K, ...), each class's images in a new shuffled order every pass; the same for
    the same seed and epoch. Returns (`train_from(first epoch)` -> endless batches, steps per
    epoch, a function giving the pool's (image, label) dataset in its own order).
    `flags` name the flags (with values) that set P and K, for errors. Classes without images are
    never drawn."""
    counts = np.bincount(pool.labels, minlength=len(pool.class_names))
    drawn = np.flatnonzero(counts)
    if len(drawn) < p:
        raise DataError(f"{flags[0]} exceeds the {len(drawn)} training classes (with images) of "
                        f"--dataset={cfg.dataset}: a batch needs {p} distinct classes")
    for c in drawn:
        if counts[c] < k:
            raise DataError(f"{flags[1]}: training class {pool.class_names[c]!r} of "
                            f"--dataset={cfg.dataset} has only {counts[c]} images, fewer than "
                            f"the {k} a batch takes of each class")
    n_train = len(pool.labels)
    image_bytes = src.side * src.side * 3  # a square image; wider ones take more
    if n_train * image_bytes <= CACHE_BYTES:  # decoded once, kept in memory
        store = _Store(tf.data.Dataset.from_tensor_slices((pool.raw, pool.labels)).map(
            lambda raw, y: (src.decode(raw), y), num_parallel_calls=AUTOTUNE), n_train)
        image = store.image
    else:  # encoded in memory, decoded at every use
        raw = tf.constant(pool.raw) if isinstance(pool.raw, np.ndarray) else pool.raw

        def image(j):
            return src.decode(tf.gather(raw, j))

    members = [np.flatnonzero(pool.labels == c) for c in range(len(pool.class_names))]
    labels = tf.constant(pool.labels)

    def pick(seed):
        order = tf.argsort(tf.random.stateless_uniform([len(drawn)], seed))
        return tf.repeat(tf.cast(order[:p], tf.int64), k)

    def stream(c, seed):  # class c's images, a new order every pass, endless
        idx = tf.constant(members[c], tf.int64)
        return tf.data.Dataset.range(2**62).flat_map(
            lambda r: tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(
                idx, tf.random.experimental.stateless_fold_in(seed, r))))

    steps = n_train // (p * k)
    size, augment = cfg.image_size, src.augment

    def one_epoch(e):  # the classes of every batch and each class's order, from (seed, e)
        seed = _epoch_seed(cfg.seed, e)
        streams = [stream(int(c), tf.random.experimental.stateless_fold_in(seed, 2 + int(c)))
                   for c in drawn]
        picks = tf.random.experimental.stateless_fold_in(seed, 1)
        choice = tf.data.Dataset.range(steps).map(
            lambda j: pick(tf.random.experimental.stateless_fold_in(picks, j))).unbatch()
        aug = tf.random.experimental.stateless_fold_in(seed, 0)
        ds = tf.data.Dataset.choose_from_datasets(streams, choice).enumerate()
        return ds.map(lambda i, j: (train_transform(
            image(j), tf.random.experimental.stateless_fold_in(aug, i), size, augment),
            labels[j]), num_parallel_calls=AUTOTUNE).batch(p * k)

    def train_from(first: int) -> tf.data.Dataset:
        return _endless(first).flat_map(one_epoch)

    def plain():  # the pool's own order
        return tf.data.Dataset.range(n_train).map(lambda j: (image(j), labels[j]),
                                                  num_parallel_calls=AUTOTUNE)

    return train_from, steps, plain


def from_datasets(train: tf.data.Dataset, test: Optional[tf.data.Dataset] = None,
                  val: Optional[tf.data.Dataset] = None, *, num_classes: int,
                  class_names: Optional[Sequence[str]] = None) -> Data:
    """`Data` of a user's own batched tf.data.Datasets of (images, integer labels), as
    `ke_tf.evolve` takes them. The images are used as they come (preprocessed and augmented by
    the user's pipeline); one pass over `train` is an epoch, and it is repeated as it is, so a
    resumed run gets the same batches only if `train`'s order is a function of nothing else.
    `test` and `val` must keep one order (no reshuffling): their labels are read once. No
    `test`: the rows have empty test columns."""
    def count(ds):  # (batches, images): one pass over the dataset
        sizes = [] if ds is None else [int(tf.shape(x)[0]) for x, _ in ds]
        return len(sizes), sum(sizes)

    steps, num_train = count(train)
    if steps == 0:
        raise DataError("ke_tf.evolve: `train` yields no batch")
    x, y = next(iter(train))
    if len(x.shape) != 4 or len(y.shape) != 1:
        raise DataError(f"ke_tf.evolve: `train` must yield batches (images [b, h, w, c], labels "
                        f"[b]). Received: images {tuple(x.shape)}, labels {tuple(y.shape)}")
    names = tuple(str(c) for c in (class_names or range(num_classes)))
    _, num_test = count(test)
    _, num_val = count(val)
    info = DatasetInfo(name=IN_MEMORY, num_classes=num_classes, class_names=names,
                       image_size=int(x.shape[1]), num_train=num_train, num_test=num_test,
                       num_val=num_val, has_val=val is not None, num_test_classes=num_classes,
                       test_class_names=names)
    return Data(info=info, train_from=lambda first_epoch: train.repeat(), steps_per_epoch=steps,
                train_plain=train, val=val, test=test)


def anchors_then_partners(images: tf.Tensor, labels: tf.Tensor):
    """(c1a, c1b, c2a, c2b, ...) -> (c1a, c2a, ..., c1b, c2b, ...): the first half of the batch are
    the anchors, the second half their partners of the same class (CS-KD)."""
    n = tf.shape(labels)[0]
    order = tf.concat([tf.range(0, n, 2), tf.range(1, n, 2)], axis=0)
    return tf.gather(images, order), tf.gather(labels, order)


def _metric(cfg: DataConfig, src: Source) -> Data:
    """P x K training batches from per-class streams; train_plain, val and test as for
    classification (val: class-disjoint validation classes, where the run has them)."""
    train = src.splits["train"]
    pk, steps, plain = _pk_stream(cfg, src, train, cfg.p_classes, cfg.k_images,
                                  (f"--p_classes={cfg.p_classes}", f"--k_images={cfg.k_images}"))
    held = {split: src.splits[split] for split in ("test", "val") if split in src.splits}
    n_train = len(train.labels)
    image_bytes = src.side * src.side * 3
    budget = CACHE_BYTES - n_train * image_bytes
    plain = plain().apply(tf.data.experimental.assert_cardinality(n_train))

    evaluated = {}
    for split, pool in held.items():  # test first: cached while memory lasts
        ds = tf.data.Dataset.from_tensor_slices((pool.raw, pool.labels)).map(
            lambda raw, y: (src.decode(raw), y), num_parallel_calls=AUTOTUNE)
        budget -= len(pool.labels) * image_bytes
        evaluated[split] = _evaluation(ds.cache() if budget >= 0 else ds, cfg)
    test, val = held["test"], held.get("val")
    info = DatasetInfo(
        name=cfg.dataset, num_classes=len(train.class_names), class_names=train.class_names,
        image_size=cfg.image_size, num_train=n_train, num_test=len(test.labels),
        num_val=0 if val is None else len(val.labels), has_val=val is not None,
        num_test_classes=len(test.class_names), test_class_names=test.class_names,
        skipped_files=src.skipped)
    return Data(info=info, train_from=lambda first: pk(first).prefetch(AUTOTUNE),
                steps_per_epoch=steps, train_plain=_evaluation(plain, cfg),
                val=evaluated.get("val"), test=evaluated["test"])
