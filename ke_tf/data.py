"""The datasets of the paper (Table 1) and a small embedded one, as batched `tf.data` pipelines.

`load(DataConfig)` returns a `Data`: `train_from(e)` (the shuffled, augmented training batches of
epochs e, e+1, ... without end; `steps_per_epoch` batches each), `train` (epoch 0 alone),
`train_plain` (the training images with evaluation preprocessing, in a fixed class-mixed order,
for re-estimating BatchNorm statistics from its first batches), `val` (or None) and `test`.
Batches are (float32 [B, H, W, 3] images, int32 [B] labels); the last batch may be smaller.

Sources (task="classification"):
  digits             scikit-learn's 8x8 digits, embedded: a fixed stratified training subset of
                     `digits_per_class` images per class; every other image is the test split.
  oxford_flowers102  tfds, train / validation / test (1020 / 1020 / 6149).
  caltech_birds2011, stanford_dogs, cars196: tfds, train / test.
  folder:PATH        PATH/{train,test}/<class>/<image>, optional PATH/val/<class>/<image>.

task="metric" (sec. 4.2): the standard class-disjoint protocols, no validation split:
  digits             all 1797 images: classes 0-4 train, 5-9 test (`digits_per_class` unused).
  caltech_birds2011  all 11,788 images of tfds' train and test: classes 0-99 train, 100-199 test.
  cars196            all 16,185 images of tfds' train and test: classes 0-97 train, 98-195 test.
  folder:PATH        PATH/train/<class> and PATH/test/<class>, each with its own classes.
Train labels index the training classes (`DatasetInfo.class_names`), test labels the test classes
(`DatasetInfo.test_class_names`), both from 0. An epoch of `train` is floor(num_train / (P * K))
batches of P = `p_classes` distinct classes (uniformly drawn) x K = `k_images` images each; every
class yields its images in a new shuffled order each pass (cycling if drawn often), restarted every
epoch. The encoded images of a tfds dataset are read into memory once, by `load`.

Preprocessing follows the official code's torchvision transforms:
  train: RandomResizedCrop(size) (scale (0.08, 1), ratio (3/4, 4/3)), RandomHorizontalFlip(),
         ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD);
  eval:  Resize(int(size * 256 / 224)) (shorter side), CenterCrop(size), ToTensor(), Normalize.
Every image is decoded and resized to the evaluation size once (uint8) and cached in memory when
the split fits; the random crop of a training image is taken from that resized copy.
Digits are upsampled (bilinear) to `image_size` and augmented with a milder crop and no flip
(digits are not mirror-symmetric). All randomness is derived from `cfg.seed` and the epoch's
index alone, never from how many epochs this process has already read: epoch e has the same
batches in a run that resumes at epoch e as in one that never stopped.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional
from urllib.parse import urlsplit

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds

from ke_tf.config import ConfigError, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTOTUNE = tf.data.AUTOTUNE
CACHE_BYTES = 2 * 1024**3  # decoded uint8 images kept in memory, at most (train first)

# Splits of the paper's tfds datasets (Table 1): only Flower-102 has a validation split.
TFDS_SPLITS = {
    "oxford_flowers102": ("train", "validation", "test"),
    "caltech_birds2011": ("train", "test"),
    "stanford_dogs": ("train", "test"),
    "cars196": ("train", "test"),
}
# Leading bytes of the formats tf.io.decode_image reads: JPEG, PNG, GIF, BMP.


class DataError(ConfigError):
    """The data is missing or unreadable: the message names the flag or file (CLI exit 2)."""


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

    def epoch(self, e: int) -> tf.data.Dataset:
        """The training batches of epoch `e` (0-based, counted over the whole run)."""
        return self.train_from(e).take(self.steps_per_epoch)

    @property
    def train(self) -> tf.data.Dataset:
        """The training batches of the first epoch."""
        return self.epoch(0)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation: RandomResizedCrop's area scale range and the horizontal flip."""

    crop_scale: tuple[float, float]
    flip: bool


NATURAL = Augment(crop_scale=(0.08, 1.0), flip=True)  # torchvision's defaults, as the official code
# Digits: keep most of the digit, never mirror it. Test top-1 of a ResNet18 x0.25 on 32 px digits
# (10 per class, 40 epochs, mean of 4 seeds): no augmentation 85.0%, scale (0.64, 1) 88.6%,
# pad 4 + random crop 89.2% (a tie), scale (0.35, 1) 86.6%, scale (0.08, 1) 80.7%.
DIGITS = Augment(crop_scale=(0.64, 1.0), flip=False)


# -----------------------------------------------------------------------------
# preprocessing: uint8 [h, w, 3] images -> normalized float32 [size, size, 3]

def eval_side(image_size: int) -> int:
    """Shorter side before the center crop: torchvision Resize(256) ahead of CenterCrop(224)."""
    return int(image_size * 256 / 224)


def resize_shorter_side(image: tf.Tensor, side: int) -> tf.Tensor:
    """torchvision Resize(side): shorter side to `side`, the longer int(side * long / short);
    bilinear with antialiasing (as PIL), rounded back to uint8."""
    hw = tf.shape(image)[:2]
    new_hw = hw * side // tf.reduce_min(hw)
    resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """ToTensor() + Normalize(IMAGENET_MEAN, IMAGENET_STD): uint8 or [0, 255] float -> float32."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: tuple[float, float], ratio=(3 / 4, 4 / 3), tries: int = 10):
    """torchvision RandomResizedCrop(size, scale, ratio), stateless: up to 10 boxes of area
    U(scale) * h * w and log-uniform aspect ratio; the first that fits is taken at a uniform
    position; if none fits, the whole image clamped to the ratio range, centred. The box is
    resized (bilinear, antialiased) to size x size. Returns float32 in [0, 255]."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    h, w = hw[0], hw[1]
    u = tf.random.stateless_uniform([4, tries], seed)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = tf.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w >= 1) & (crop_w <= w) & (crop_h >= 1) & (crop_h <= h)
    k = tf.argmax(tf.cast(fits, tf.int32))  # the first try that fits
    found = tf.reduce_any(fits)
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    crop_h = tf.where(found, crop_h[k], fallback_h)
    crop_w = tf.where(found, crop_w[k], fallback_w)
    top = tf.where(found, tf.floor(u[2, k] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
    left = tf.where(found, tf.floor(u[3, k] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
    box = tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)
    crop = tf.image.crop_to_bounding_box(image, box[0], box[1], box[2], box[3])
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def train_transform(image: tf.Tensor, seed: tf.Tensor, size: int, augment: Augment) -> tf.Tensor:
    """Training preprocessing of one uint8 image; `seed`: int64 [2], stateless."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = random_resized_crop(image, crop_seed, size, augment.crop_scale)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return normalize(image)


def eval_transform(image: tf.Tensor, size: int) -> tf.Tensor:
    """CenterCrop(size) + normalization of a uint8 image already resized to `eval_side`."""
    hw = tf.shape(image)[:2]
    crop = tf.image.crop_to_bounding_box(image, (hw[0] - size) // 2, (hw[1] - size) // 2,
                                         size, size)
    return normalize(tf.ensure_shape(crop, [size, size, 3]))


# -----------------------------------------------------------------------------
# sources

@dataclasses.dataclass(frozen=True)
class _Source:
    """splits: {"train"/"val"/"test": (dataset of (raw, int32 label), count)}, or for
    task="metric" {"train"/"test": _Pool}, each in a fixed, class-mixed order (so any prefix of
    train_plain is representative); decode(raw): a uint8 [h, w, 3] image whose shorter side is
    `side`."""

    class_names: tuple[str, ...]
    splits: dict
    decode: Callable[[tf.Tensor], tf.Tensor]
    side: int
    augment: Augment
    skipped: tuple = ()  # files left out as corrupt (folder datasets, skip_corrupt_images)


# Metric learning: the first n classes of the source train, the others test.
METRIC_TRAIN_CLASSES = {"digits": 5, "caltech_birds2011": 100, "cars196": 98}


@dataclasses.dataclass(frozen=True)
class _Pool:
    """The images of a metric-learning split, in memory: raw [N, ...] (what `_Source.decode`
    reads), labels int32 [N] indexing class_names."""

    raw: object  # np.ndarray or tf.Tensor
    labels: np.ndarray
    class_names: tuple[str, ...]


def _class_disjoint(raw, labels: np.ndarray, class_names, n_train: int) -> dict:
    """{"train": classes [0, n_train), "test": the others, re-indexed from 0}, order kept."""
    train = labels < n_train
    return {"train": _Pool(tf.gather(raw, np.flatnonzero(train)), labels[train],
                           tuple(class_names[:n_train])),
            "test": _Pool(tf.gather(raw, np.flatnonzero(~train)), labels[~train] - n_train,
                          tuple(class_names[n_train:]))}


def _digits(cfg: DataConfig):
    """scikit-learn's digits (1797 8x8 images, values 0..16): `digits_per_class` training images
    per class drawn with a fixed seed 0 (never `cfg.seed`), so the split is always the same."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)
    names = tuple(str(c) for c in range(10))
    size = cfg.image_size

    def decode(image):
        up = tf.image.resize(image[:, :, None] * 255.0, [size, size], method="bilinear")
        return tf.image.grayscale_to_rgb(tf.cast(tf.clip_by_value(tf.round(up), 0, 255), tf.uint8))

    if cfg.task == "metric":
        return _Source(names, _class_disjoint(images, labels, names, 5), decode, size, DIGITS)
    smallest = int(np.bincount(labels).min())
    if cfg.digits_per_class >= smallest:
        raise DataError(f"--digits_per_class must be < {smallest} (the smallest digits class), "
                        f"so that every class keeps test images. Received: "
                        f"digits_per_class={cfg.digits_per_class}")
    rng = np.random.RandomState(0)
    train = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cfg.digits_per_class]
                            for c in range(10)])
    train = rng.permutation(train)  # classes mixed, so any prefix of train_plain is balanced
    test = np.setdiff1d(np.arange(len(labels)), train)
    splits = {name: (tf.data.Dataset.from_tensor_slices((images[idx], labels[idx])), len(idx))
              for name, idx in (("train", train), ("test", test))}
    return _Source(names, splits, decode, size, DIGITS)


def _natural(class_names, splits, cfg: DataConfig, paths: bool = False,
             skipped: tuple = ()) -> _Source:
    """Encoded JPEG/PNG/GIF/BMP images (read from files if `paths`), decoded to RGB and resized
    to the eval side."""
    side = eval_side(cfg.image_size)

    def decode(raw):
        raw = tf.io.read_file(raw) if paths else raw
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        return resize_shorter_side(image, side)

    return _Source(tuple(class_names), splits, decode, side, NATURAL, tuple(skipped))


def _folder(cfg: DataConfig):
    """Image folders PATH/{train,val,test}/<class>/<image>; class names sorted; labels index the
    training classes (task="metric": train and test each index their own classes, val is
    unused). Hidden files are skipped; every other file must be JPEG/PNG/GIF/BMP."""
    root = os.path.expanduser(cfg.dataset[len("folder:"):])
    flag = f"--dataset={cfg.dataset}"
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{flag}: {os.path.join(root, split)} is not a directory; expected "
                            f"{root}/train/<class>/<image>, {root}/test/<class>/<image> and "
                            f"optionally {root}/val/<class>/<image>")
    classes = _class_dirs(os.path.join(root, "train"))
    if cfg.task == "metric":
        shared = sorted(set(classes) & set(_class_dirs(os.path.join(root, "test"))))
        if shared:  # the protocol evaluates on classes never seen in training
            raise DataError(f"{flag} with --task=metric: {root}/train and {root}/test share "
                            f"classes ({', '.join(shared[:5])}); metric learning needs "
                            f"class-disjoint train and test classes")
        pools, skipped = {}, []
        for split in ("train", "test"):
            names = _class_dirs(os.path.join(root, split))
            files, labels = _images(os.path.join(root, split), names, flag,
                                    cfg.skip_corrupt_images, skipped)
            pools[split] = _Pool(files, labels, tuple(names))
        return _natural(classes, pools, cfg, paths=True, skipped=skipped)
    splits, skipped = {}, []
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
        if unknown:
            raise DataError(f"{flag}: {split_dir} has classes that {root}/train lacks: "
                            f"{', '.join(unknown)}")
        files, labels = _images(split_dir, classes, flag, cfg.skip_corrupt_images, skipped)
        ds = tf.data.Dataset.from_tensor_slices((files, labels))
        ds = ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=AUTOTUNE)
        splits[split] = (ds, len(files))
    return _natural(classes, splits, cfg, skipped=skipped)


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(split_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))


def _images(split_dir: str, classes, flag: str, skip_corrupt: bool = False,
            skipped: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
    """The image files of split_dir/<class> and their int32 labels (indices into `classes`),
    in a fixed order that mixes the classes. A corrupt or non-image file stops the run with a
    DataError naming it, or with `skip_corrupt` is left out and appended to `skipped`."""
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        names = sorted(os.listdir(class_dir)) if os.path.isdir(class_dir) else []
        paths = [os.path.join(class_dir, f) for f in names if not f.startswith(".")]
        for path in (p for p in paths if os.path.isfile(p)):
            problem = image_problem(path)
            if problem and not skip_corrupt:
                raise DataError(f"{flag}: {path} is {problem}; remove it or pass "
                                "--skip_corrupt_images")
            if problem:
                skipped.append(path)
            else:
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"{flag}: {split_dir} holds no images (expected "
                        f"{split_dir}/<class>/<image>)")
    order = np.random.RandomState(0).permutation(len(files))  # classes mixed, fixed
    return np.array(files)[order], np.array(labels, np.int32)[order]


def image_problem(path: str) -> Optional[str]:
    """Why `path` is not a readable image (None if it looks whole): an unknown format, or a
    JPEG/PNG/GIF/BMP cut short (a partial download or copy), checked from its first and last
    bytes without decoding."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail[-1024:] else "a truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if tail.endswith(b"IEND\xaeB`\x82") else "a truncated PNG (no IEND chunk)"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return None if tail.rstrip(b"\0").endswith(b";") else "a truncated GIF (no trailer)"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if size >= declared else f"a truncated BMP ({size} of {declared} bytes)"
    return "not a JPEG, PNG, GIF or BMP image"


def _tfds(cfg: DataConfig):
    """A tfds dataset of the paper, prepared (downloaded) first if needed; tfds wrote its records
    in a shuffled order, and its images stay encoded until `decode`. task="metric": the images
    of all its splits are read into memory (tf.string tensors) and cut by class."""
    name = cfg.dataset
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist (it holds the tfds datasets, "
                        f"<data_dir>/{name}/<version>/)")
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        _prepare(builder, cfg)
    decoders = tfds.decode.PartialDecoding({"image": True, "label": True},
                                           decoders={"image": tfds.decode.SkipDecoding()})
    splits = {}
    for split in TFDS_SPLITS[name]:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                decoders=decoders)
        splits["val" if split == "validation" else split] = (
            ds.map(lambda x, y: (x, tf.cast(y, tf.int32))), int(ds.cardinality()))
    names = builder.info.features["label"].names
    if cfg.task == "metric":
        everything = splits["train"][0].concatenate(splits["test"][0])
        raw, labels = everything.batch(splits["train"][1] + splits["test"][1]).get_single_element()
        splits = _class_disjoint(raw, labels.numpy(), names, METRIC_TRAIN_CLASSES[name])
    return _natural(names, splits, cfg)


def _prepare(builder, cfg: DataConfig) -> None:
    """tfds' download_and_prepare, with raw files taken from --manual_dir when there.

    tfds retries an unreachable server 10 times with exponential backoff (3.5 minutes per
    dataset without network), so the servers of the files missing from --manual_dir are asked
    once first: without network that fails at once, and the message says where the data goes.
    """
    manual_dir = os.path.expanduser(cfg.manual_dir) if cfg.manual_dir else None
    files = {}  # raw file name -> one URL it comes from
    for url, url_info in sorted(builder.url_infos.items()):
        files.setdefault(url_info.filename, url)
    missing = {url for url, url_info in builder.url_infos.items()
               if not (manual_dir and os.path.isfile(os.path.join(manual_dir, url_info.filename)))}
    try:
        for server in sorted({"{0.scheme}://{0.netloc}/".format(urlsplit(u)) for u in missing}):
            requests.head(server, timeout=10)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (requests.RequestException, tfds.download.DownloadError) as err:
        name, version = builder.name, builder.version
        listing = "\n".join(f"      {f}  ({u})" for f, u in sorted(files.items()))
        raise DataError(
            f"--dataset={name} is not prepared under --data_dir ({builder.data_dir}) and "
            f"cannot be downloaded: {type(err).__name__}: {err}\n"
            f"Without network, either\n"
            f"  (a) prepare it on a machine with network (`tfds build {name}`, or ke_tf) "
            f"and copy its directory <data_dir>/{name}/{version}/ to {builder.data_dir} "
            f"(pass --data_dir={os.path.dirname(os.path.dirname(builder.data_dir))}), or\n"
            f"  (b) put the raw files\n{listing}\n"
            f"    into one directory and pass it as --manual_dir (now: "
            f"{manual_dir or 'not set'}); they are then prepared here.") from err


# -----------------------------------------------------------------------------
# pipelines

def load(cfg: DataConfig) -> Data:
    """The four pipelines of `cfg.dataset`; raises DataError (or ConfigError) on bad input."""
    cfg.validate()
    tf.random.set_seed(cfg.seed)  # tf.data's shuffle seeds mix in the global seed
    if cfg.task == "metric" and cfg.dataset in TFDS_SPLITS and (
            cfg.dataset not in METRIC_TRAIN_CLASSES):
        raise DataError(f"--task=metric is not supported for --dataset={cfg.dataset}: it has no "
                        f"class-disjoint metric-learning protocol here (use one of "
                        f"{', '.join(METRIC_TRAIN_CLASSES)} or folder:PATH)")
    if cfg.dataset == "digits":
        source = _digits
    elif cfg.dataset.startswith("folder:"):
        source = _folder
    else:
        source = _tfds
    src = source(cfg)
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
        pool = _Pool(raw, labels.numpy(), names)
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


def _pk_stream(cfg: DataConfig, src: _Source, pool: _Pool, p: int, k: int, flags: tuple):
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


def anchors_then_partners(images: tf.Tensor, labels: tf.Tensor):
    """(c1a, c1b, c2a, c2b, ...) -> (c1a, c2a, ..., c1b, c2b, ...): the first half of the batch are
    the anchors, the second half their partners of the same class (CS-KD)."""
    n = tf.shape(labels)[0]
    order = tf.concat([tf.range(0, n, 2), tf.range(1, n, 2)], axis=0)
    return tf.gather(images, order), tf.gather(labels, order)


def _metric(cfg: DataConfig, src: _Source) -> Data:
    """P x K training batches from per-class streams; train_plain and test as for classification."""
    train, test = src.splits["train"], src.splits["test"]
    pk, steps, plain = _pk_stream(cfg, src, train, cfg.p_classes, cfg.k_images,
                                                    (f"--p_classes={cfg.p_classes}",
                                                     f"--k_images={cfg.k_images}"))
    n_train, n_test = len(train.labels), len(test.labels)
    image_bytes = src.side * src.side * 3
    cache_test = (n_train + n_test) * image_bytes <= CACHE_BYTES

    plain = plain().apply(tf.data.experimental.assert_cardinality(n_train))

    test_ds = tf.data.Dataset.from_tensor_slices((test.raw, test.labels)).map(
        lambda raw, y: (src.decode(raw), y), num_parallel_calls=AUTOTUNE)
    info = DatasetInfo(
        name=cfg.dataset, num_classes=len(train.class_names), class_names=train.class_names,
        image_size=cfg.image_size, num_train=n_train, num_test=n_test, num_val=0, has_val=False,
        num_test_classes=len(test.class_names), test_class_names=test.class_names,
        skipped_files=src.skipped)
    return Data(info=info, train_from=lambda first: pk(first).prefetch(AUTOTUNE),
                steps_per_epoch=steps, train_plain=_evaluation(plain, cfg),
                val=None, test=_evaluation(test_ds.cache() if cache_test else test_ds, cfg))


def _class_seed(seed: int, c: int) -> int:
    """A shuffling seed for class c, derived from `seed`."""
    return int(np.random.SeedSequence([seed % 2**64, int(c)]).generate_state(1)[0])
