"""Where the images come from: each dataset as a `Source` of encoded (or raw) images and int32
labels in a fixed order, and the errors that name a missing or unreadable dataset.

task="classification" (`read_source`'s splits: train, test and, where there is one, val):
  digits             scikit-learn's 8x8 digits, embedded: a fixed stratified training subset of
                     `digits_per_class` images per class; every other image is the test split.
  oxford_flowers102  tfds, train / validation / test (1020 / 1020 / 6149).
  caltech_birds2011, stanford_dogs, cars196: tfds, train / test.
  folder:PATH        PATH/{train,test}/<class>/<image>, optional PATH/val/<class>/<image>.

task="metric" (sec. 4.2): the standard class-disjoint protocols, without a validation split of
their own, each split a `Pool` held in memory:
  digits             all 1797 images: classes 0-4 train, 5-9 test (`digits_per_class` unused).
  caltech_birds2011  all 11,788 images of tfds' train and test: classes 0-99 train, 100-199 test.
  cars196            all 16,185 images of tfds' train and test: classes 0-97 train, 98-195 test.
  folder:PATH        PATH/train/<class>, PATH/test/<class> and optionally PATH/val/<class>,
                     each with its own classes.
Train labels index the training classes, test labels the test classes, both from 0.

Validation (`--val_fraction=F`, `hold_out`): a dataset without a validation split of its own
gets one, drawn with the fixed seed VAL_SEED (the same for every --seed, on every worker and on
resume): classification holds out the share F of every training class (rounded to the nearest
image); digits, whose training split is only `digits_per_class` images a class, takes the share
F of every class's non-training images instead, and its test split keeps the rest; metric
learning holds out the share F of the training classes, whole (val classes are disjoint from
both train and test). A dataset with its own validation split refuses F > 0.

A tfds dataset that is not prepared is downloaded (raw files taken from --manual_dir when there);
without network that fails at once with a DataError saying where the data goes. For
task="metric" the encoded images of a tfds dataset are read into memory once and cut by class;
otherwise they stay in tfds' records until decoded. A folder's files are checked from their
first and last bytes (`image_problem`): a cut-short or non-image file stops the run naming it;
with skip_corrupt_images every file is also decoded once up front (`undecodable`) and each that
fails, whatever part of it is damaged, is left out and listed. Without it, a file whose damage
only decoding finds stops the run when the pipeline reaches it, named (`naming_undecodable`).
A folder's class names must be printable (they become the lines of class_names.txt), its
training split needs two classes or more, and no class folder may be empty. `Source.decode` decodes one image to uint8 RGB and resizes it
(`transforms.resize_shorter_side`) to the evaluation side; digits are upsampled (bilinear) to
`image_size`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import unicodedata
from typing import Callable, Optional
from urllib.parse import urlsplit

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds

from ke_tf.config import ConfigError, DataConfig
from ke_tf.data.transforms import DIGITS, NATURAL, Augment, eval_side, resize_shorter_side

AUTOTUNE = tf.data.AUTOTUNE

# Splits of the paper's tfds datasets (Table 1): only Flower-102 has a validation split.
TFDS_SPLITS = {
    "oxford_flowers102": ("train", "validation", "test"),
    "caltech_birds2011": ("train", "test"),
    "stanford_dogs": ("train", "test"),
    "cars196": ("train", "test"),
}
# Metric learning: the first n classes of the source train, the others test.
METRIC_TRAIN_CLASSES = {"digits": 5, "caltech_birds2011": 100, "cars196": 98}
VAL_SEED = 1  # the draw of a --val_fraction split: fixed, so every --seed validates alike


class DataError(ConfigError):
    """The data is missing or unreadable: the message names the flag or file (CLI exit 2)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """splits: {"train"/"val"/"test": (dataset of (raw, int32 label), count)}, or for
    task="metric" {"train"/"test": Pool}, each in a fixed, class-mixed order (so any prefix of
    train_plain is representative); decode(raw): a uint8 [h, w, 3] image whose shorter side is
    `side`."""

    class_names: tuple[str, ...]
    splits: dict
    decode: Callable[[tf.Tensor], tf.Tensor]
    side: int
    augment: Augment
    skipped: tuple = ()  # files left out as corrupt (folder datasets, skip_corrupt_images)


@dataclasses.dataclass(frozen=True)
class Pool:
    """The images of a metric-learning split, in memory: raw [N, ...] (what `Source.decode`
    reads), labels int32 [N] indexing class_names."""

    raw: object  # np.ndarray or tf.Tensor
    labels: np.ndarray
    class_names: tuple[str, ...]


def read_source(cfg: DataConfig) -> Source:
    """The `Source` of `cfg.dataset` (digits, folder:PATH or a tfds dataset); raises DataError
    for a task="metric" the dataset has no protocol for, before reading anything."""
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
    if cfg.val_fraction and not (cfg.dataset == "digits" and cfg.task == "classification"):
        src = _with_validation(src, cfg)  # digits draws its own, from the non-training pool
    return src


def hold_out(labels: np.ndarray, fraction: float, class_names, images: str,
             left: str = "training") -> np.ndarray:
    """Which of `labels` go to validation: in every class the share `fraction` of its images
    (rounded to the nearest), drawn with VAL_SEED. DataError (naming --val_fraction) if a class
    would keep no validation image or no `left` image; `images` says what the labels are."""
    rng = np.random.RandomState(VAL_SEED)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(math.floor(fraction * len(members) + 0.5))
        if n in (0, len(members)):
            raise DataError(
                f"--val_fraction={fraction:g} leaves class {class_names[c]!r} ({len(members)} "
                f"{images}) without a {'validation' if n == 0 else left} image; choose a "
                f"fraction that keeps both. Received: val_fraction={fraction!r}")
        held[rng.permutation(members)[:n]] = True
    return held


def _with_validation(src: Source, cfg: DataConfig) -> Source:
    """`src` with a validation split held out of its training split (`hold_out`)."""
    if "val" in src.splits:
        raise DataError(f"--val_fraction: --dataset={cfg.dataset} has a validation split of its "
                        f"own, which the run uses; leave --val_fraction at 0. Received: "
                        f"val_fraction={cfg.val_fraction!r}")
    splits = dict(src.splits)
    if cfg.task == "metric":  # whole classes, disjoint from the training and test classes
        splits["train"], splits["val"] = _validation_classes(splits["train"], cfg)
    else:
        ds, n = splits["train"]
        labels = np.fromiter(ds.map(lambda raw, y: y).as_numpy_iterator(), np.int32, n)
        held = tf.constant(hold_out(labels, cfg.val_fraction, src.class_names,
                                    "training images"))

        def part(keep):
            return ds.enumerate().filter(lambda i, xy: tf.equal(held[i], keep)).map(
                lambda i, xy: xy)

        splits["train"] = (part(False), n - int(np.sum(held)))
        splits["val"] = (part(True), int(np.sum(held)))
    return dataclasses.replace(src, splits=splits)


def _validation_classes(pool: "Pool", cfg: DataConfig) -> tuple:
    """(train, val) Pools of a metric-learning training pool: the share --val_fraction of its
    classes (rounded to the nearest, drawn with VAL_SEED) validates, the others train."""
    names = pool.class_names
    n = int(math.floor(cfg.val_fraction * len(names) + 0.5))
    if n < 2 or len(names) - n < cfg.p_classes:
        most = len(names) - cfg.p_classes  # validation classes that leave P to train on
        low = math.ceil(1500 / len(names)) / 1000  # rounds to 2 classes
        high = math.floor(1000 * (most + 0.49) / len(names)) / 1000  # rounds to `most`
        fix = (f"hold out 2 to {most} classes (--val_fraction from {low:g} to {high:g})"
               if most >= 2 else
               "this dataset's protocol leaves no classes to spare, so leave --val_fraction at 0")
        raise DataError(
            f"--val_fraction={cfg.val_fraction:g} with --task=metric holds out {n} of the "
            f"{len(names)} training classes of --dataset={cfg.dataset} for a class-disjoint "
            f"validation split, which needs at least 2 of them and leaves at least "
            f"--p_classes={cfg.p_classes} to train on: {fix}. "
            f"Received: val_fraction={cfg.val_fraction!r}")
    val_classes = np.sort(np.random.RandomState(VAL_SEED).permutation(len(names))[:n])
    return _split_classes(pool, val_classes)


def _split_classes(pool: "Pool", chosen: np.ndarray) -> tuple:
    """(the pool without the classes `chosen`, the pool of only those), labels re-indexed
    from 0 in class order, image order kept."""
    def sub(classes):
        index = np.full(len(pool.class_names), -1)
        index[classes] = np.arange(len(classes))
        take = np.flatnonzero(np.isin(pool.labels, classes))
        raw = pool.raw[take] if isinstance(pool.raw, np.ndarray) else tf.gather(pool.raw, take)
        return Pool(raw, index[pool.labels[take]].astype(np.int32),
                    tuple(pool.class_names[c] for c in classes))

    rest = np.setdiff1d(np.arange(len(pool.class_names)), chosen)
    return sub(rest), sub(chosen)


def _class_disjoint(raw, labels: np.ndarray, class_names, n_train: int) -> dict:
    """{"train": classes [0, n_train), "test": the others, re-indexed from 0}, order kept."""
    train = labels < n_train
    return {"train": Pool(tf.gather(raw, np.flatnonzero(train)), labels[train],
                          tuple(class_names[:n_train])),
            "test": Pool(tf.gather(raw, np.flatnonzero(~train)), labels[~train] - n_train,
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
        return Source(names, _class_disjoint(images, labels, names, 5), decode, size, DIGITS)
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
    parts = {"train": train, "test": test}
    if cfg.val_fraction:  # from the non-training pool: the 10-a-class training split stays
        held = hold_out(labels[test], cfg.val_fraction, names, "non-training images", "test")
        parts.update(val=test[held], test=test[~held])
    splits = {name: (tf.data.Dataset.from_tensor_slices((images[idx], labels[idx])), len(idx))
              for name, idx in parts.items()}
    return Source(names, splits, decode, size, DIGITS)


def _natural(class_names, splits, cfg: DataConfig, paths: bool = False,
             skipped: tuple = ()) -> Source:
    """Encoded JPEG/PNG/GIF/BMP images (read from files if `paths`), decoded to RGB and resized
    to the eval side."""
    side = eval_side(cfg.image_size)

    def decode(raw):
        raw = tf.io.read_file(raw) if paths else raw
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        return resize_shorter_side(image, side)

    return Source(tuple(class_names), splits, decode, side, NATURAL, tuple(skipped))


def _folder(cfg: DataConfig):
    """Image folders PATH/{train,val,test}/<class>/<image>; class names sorted; labels index the
    training classes (task="metric": train, val and test each index their own classes, which
    must be disjoint). Hidden files are skipped; every other file must be JPEG/PNG/GIF/BMP."""
    root = os.path.expanduser(cfg.dataset[len("folder:"):])
    flag = f"--dataset={cfg.dataset}"
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{flag}: {os.path.join(root, split)} is not a directory; expected "
                            f"{root}/train/<class>/<image>, {root}/test/<class>/<image> and "
                            f"optionally {root}/val/<class>/<image>")
    classes = _class_dirs(os.path.join(root, "train"), flag)
    if len(classes) < 2:
        raise DataError(f"{flag}: {os.path.join(root, 'train')} has {len(classes)} class "
                        f"folder{'s' if len(classes) != 1 else ''} ({', '.join(classes) or 'none'}); "
                        "a classifier needs two classes or more")
    if cfg.task == "metric":
        shared = sorted(set(classes) & set(_class_dirs(os.path.join(root, "test"), flag)))
        if shared:  # the protocol evaluates on classes never seen in training
            raise DataError(f"{flag} with --task=metric: {root}/train and {root}/test share "
                            f"classes ({', '.join(shared[:5])}); metric learning needs "
                            f"class-disjoint train and test classes")
        splits = ["train", "test"]
        if os.path.isdir(os.path.join(root, "val")):  # its own classes, disjoint from both
            shared = sorted(set(_class_dirs(os.path.join(root, "val"), flag)) & (
                set(classes) | set(_class_dirs(os.path.join(root, "test"), flag))))
            if shared:
                raise DataError(f"{flag} with --task=metric: {root}/val shares classes with "
                                f"train or test ({', '.join(shared[:5])}); a metric-learning "
                                "validation split needs classes of its own")
            splits.append("val")
        pools, skipped = {}, []
        for split in splits:
            names = _class_dirs(os.path.join(root, split), flag)
            files, labels = _images(os.path.join(root, split), names, flag,
                                    cfg.skip_corrupt_images, skipped, every_class=True)
            pools[split] = Pool(files, labels, tuple(names))
        return _natural(classes, pools, cfg, paths=True, skipped=skipped)
    splits, skipped = {}, []
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        unknown = sorted(set(_class_dirs(split_dir, flag)) - set(classes))
        if unknown:
            raise DataError(f"{flag}: {split_dir} has classes that {root}/train lacks: "
                            f"{', '.join(unknown)}")
        files, labels = _images(split_dir, classes, flag, cfg.skip_corrupt_images, skipped,
                                every_class=split == "train")
        ds = tf.data.Dataset.from_tensor_slices((files, labels))
        ds = ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=AUTOTUNE)
        splits[split] = (ds, len(files))
    return _natural(classes, splits, cfg, skipped=skipped)


def _class_dirs(split_dir: str, flag: str = "") -> list[str]:
    """The class folders of `split_dir`, sorted; a name with a control character (a newline
    would shift every line of class_names.txt after it) raises DataError naming it."""
    names = sorted(d for d in os.listdir(split_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
    for name in names:
        bad = [c for c in name if unicodedata.category(c).startswith("C")]
        if bad:
            raise DataError(f"{flag or 'folder dataset'}: the class folder "
                            f"{os.path.join(split_dir, name)!r} has a control character in its "
                            f"name ({bad[0]!r}); class names become the lines of "
                            "class_names.txt: rename the folder")
    return names


def _images(split_dir: str, classes, flag: str, skip_corrupt: bool = False,
            skipped: Optional[list] = None, every_class: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """The image files of split_dir/<class> and their int32 labels (indices into `classes`),
    in a fixed order that mixes the classes. A cut-short or non-image file stops the run with a
    DataError naming it; with `skip_corrupt` it is left out, and so is every file that does not
    decode (`undecodable`), each appended to `skipped`. `every_class`: a class with no image
    (an empty folder: an output nothing could be trained to predict) raises DataError."""
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
    if skip_corrupt and files:
        bad = undecodable(files)
        skipped.extend(bad)
        kept = [i for i, path in enumerate(files) if path not in bad]
        files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    if not files:
        raise DataError(f"{flag}: {split_dir} holds no images (expected "
                        f"{split_dir}/<class>/<image>)")
    empty = [classes[c] for c in sorted(set(range(len(classes))) - set(labels))]
    if every_class and empty:
        raise DataError(f"{flag}: the class folder {os.path.join(split_dir, empty[0])} holds no "
                        f"images{' (after --skip_corrupt_images)' if skip_corrupt else ''}; "
                        "every class needs training images: add some or remove the folder")
    order = np.random.RandomState(0).permutation(len(files))  # classes mixed, fixed
    return np.array(files)[order], np.array(labels, np.int32)[order]


def _decoded_shape(path: tf.Tensor) -> tf.Tensor:
    return tf.shape(tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False))


def undecodable(paths) -> dict:
    """{path: TensorFlow's reason} of the files among `paths` that tf.io.decode_image cannot
    decode (a damaged body behind an intact header and trailer): all decoded once, in
    parallel; the failures decoded again one by one for their reason."""
    paths = [os.fspath(p) for p in paths]
    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
        lambda i, path: (i, _decoded_shape(path)), num_parallel_calls=AUTOTUNE).ignore_errors()
    good = {int(i) for i, _ in ds.as_numpy_iterator()}
    bad = {}
    for i in sorted(set(range(len(paths))) - good):
        try:
            _decoded_shape(tf.constant(paths[i]))
            continue  # decodes alone: not the file's fault
        except tf.errors.OpError as err:  # "{{function_node ...}} Invalid PNG data, size 4908
            reason = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:.*$", "", err.message.strip())
            bad[paths[i]] = reason.splitlines()[0]  # [Op:DecodeImage] name:": the middle
    return bad


def folder_files(cfg: DataConfig) -> list:
    """Every image file of a folder dataset that `_folder` reads (its splits' class folders)."""
    root = os.path.expanduser(cfg.dataset[len("folder:"):])
    out = []
    for split in ("train", "val", "test"):
        split_dir = os.path.join(root, split)
        for name in _class_dirs(split_dir) if os.path.isdir(split_dir) else ():
            class_dir = os.path.join(split_dir, name)
            out += [os.path.join(class_dir, f) for f in sorted(os.listdir(class_dir))
                    if not f.startswith(".") and os.path.isfile(os.path.join(class_dir, f))]
    return out


@contextlib.contextmanager
def naming_undecodable(cfg: DataConfig):
    """A folder dataset's image that fails to decode when the pipeline reaches it (TensorFlow
    says so without naming the file) becomes a DataError naming it: the folder's files are
    decoded to find which (`undecodable`)."""
    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        if not cfg.dataset.startswith("folder:"):
            raise
        bad = undecodable(p for p in folder_files(cfg) if not image_problem(p))
        if not bad:
            raise
        path, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"--dataset={cfg.dataset}: {path} does not decode ({reason}){more}; "
                        "remove it or pass --skip_corrupt_images") from None


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

