"""ke_tf.data: digits split, preprocessing, determinism, image folders, tfds (mocked, offline)."""
import io
import os
import socket
import tarfile
import time
from unittest import mock

import numpy as np
import pytest
import requests
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from ke_tf import data
from ke_tf.config import ConfigError, DataConfig

MEAN, STD = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)



def digits_config(**fields):
    """The embedded digits at 32 px (the digits preset's size), other fields as given."""
    return DataConfig(**{"dataset": "digits", "image_size": 32, **fields})

def epoch(d, e):
    """The training batches of epoch `e` (0-based, counted over the whole run) of loaded data."""
    return d.train_from(e).take(d.steps_per_epoch)


def arrays(ds):
    """All batches of `ds` as (images, labels) numpy arrays."""
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def unnormalize(x):
    return x * STD + MEAN


def ramp(h=48, w=64):
    """uint8 image whose value grows from left to right: a flip makes it decrease."""
    return tf.constant(np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3))
                       .round().astype(np.uint8))


def write_png(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(image))


def offline(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (simulated offline)")


# -----------------------------------------------------------------------------
# digits

@pytest.fixture(scope="module")
def digits():
    return data.load(digits_config(batch_size=32))


def test_digits_split_is_stratified_and_complete(digits):
    info = digits.info
    assert (info.num_train, info.num_test, info.num_val, info.has_val) == (100, 1697, 0, False)
    assert info.num_classes == 10 and info.class_names == tuple("0123456789")
    assert digits.val is None
    _, y_train = arrays(digits.train_plain)
    _, y_test = arrays(digits.test)
    np.testing.assert_array_equal(np.bincount(y_train), [10] * 10)
    all_counts = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # load_digits()
    np.testing.assert_array_equal(np.bincount(y_test), all_counts - 10)
    # a prefix of the fixed training order already mixes the classes
    assert len(set(y_train[:32])) >= 8


def test_digits_split_does_not_depend_on_seed(digits):
    x0, y0 = arrays(digits.train_plain)
    other = data.load(digits_config(seed=7, digits_per_class=10))
    x7, y7 = arrays(other.train_plain)
    np.testing.assert_array_equal(y0, y7)
    np.testing.assert_array_equal(x0, x7)
    more = data.load(digits_config(digits_per_class=20))
    assert (more.info.num_train, more.info.num_test) == (200, 1597)


def test_digits_images_shape_dtype_and_normalization(digits):
    x, y = next(iter(epoch(digits, 0)))
    assert x.shape == (32, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    x_test, _ = arrays(digits.test)
    assert x_test.shape == (1697, 32, 32, 3)
    pixels = unnormalize(x_test)  # back in [0, 1]
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    assert pixels.max() > 0.99  # ink reaches 16/16
    np.testing.assert_allclose(x_test.min(axis=(0, 1, 2)), -MEAN / STD, atol=1e-5)  # background
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)  # gray in RGB


def test_train_order_is_reproducible_and_reshuffled_every_epoch():
    a, b = data.load(digits_config(seed=3)), data.load(digits_config(seed=3))
    a1, a2 = arrays(epoch(a, 0)), arrays(epoch(a, 1))  # two epochs
    b2, b1 = arrays(epoch(b, 1)), arrays(epoch(b, 0))  # a resumed run reads epoch 1 first
    for u, v in ((a1, b1), (a2, b2)):
        np.testing.assert_array_equal(u[0], v[0])
        np.testing.assert_array_equal(u[1], v[1])
    assert len(a1[1]) == len(a2[1]) == 100  # one full epoch, no drop_remainder
    assert not np.array_equal(a1[1], a2[1])
    assert not np.array_equal(a1[1], arrays(epoch(data.load(digits_config(seed=4)), 0))[1])


def test_augmentation_is_reproducible_and_differs_across_seeds_and_epochs(tmp_path):
    for split in ("train", "test"):  # class a's one image: only its augmentation varies
        write_png(str(tmp_path / split / "a" / "0.png"), coordinate_image(40, 50))
    write_png(str(tmp_path / "train" / "b" / "0.png"), coordinate_image(30, 30))

    def epochs(seed):
        d = data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, seed=seed))
        return [x[y == 0] for x, y in (arrays(epoch(d, 0)), arrays(epoch(d, 1)))]

    (a1, a2), (b1, b2), (c1, _) = epochs(0), epochs(0), epochs(1)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.allclose(a1, a2) and not np.allclose(a1, c1)


def test_train_plain_and_test_are_fixed(digits):
    np.testing.assert_array_equal(arrays(digits.train_plain)[0], arrays(digits.train_plain)[0])
    np.testing.assert_array_equal(arrays(digits.test)[1], arrays(digits.test)[1])


def test_digits_per_class_too_large():
    with pytest.raises(data.DataError, match="--digits_per_class"):
        data.load(digits_config(digits_per_class=174))


def test_invalid_config_is_a_config_error():
    with pytest.raises(ConfigError, match="--dataset"):
        data.load(DataConfig(dataset="mnist"))


# -----------------------------------------------------------------------------
# preprocessing

@pytest.mark.parametrize("augment, flips", [(data.DIGITS, False), (data.NATURAL, True)])
def test_horizontal_flip_only_for_natural_images(augment, flips):
    directions = []
    for i in range(40):
        out = data.train_transform(ramp(), tf.constant([i, 1], tf.int64), 32, augment).numpy()
        columns = out[..., 0].mean(axis=0)
        directions.append(columns[-1] > columns[0])
    if flips:
        assert 8 <= sum(directions) <= 32  # about half mirrored
    else:
        assert all(directions)


def test_digits_crop_keeps_most_of_the_image():
    image = ramp(96, 96)
    for i in range(30):
        out = data.train_transform(image, tf.constant([i, 2], tf.int64), 32, data.DIGITS).numpy()
        span = np.ptp(unnormalize(out)[..., 0].mean(axis=0))  # fraction of the ramp kept
        assert span > 0.6  # crop width >= sqrt(0.64 * 3/4) of a square image


def test_random_resized_crop_output_and_determinism():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3)), tf.uint8)
    seed = tf.constant([5, 6], tf.int64)
    a = data.random_resized_crop(image, seed, 24, (0.08, 1.0))
    b = data.random_resized_crop(image, seed, 24, (0.08, 1.0))
    c = data.random_resized_crop(image, tf.constant([5, 7], tf.int64), 24, (0.08, 1.0))
    assert a.shape == (24, 24, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resize_shorter_side_as_torchvision():
    image = tf.zeros([100, 150, 3], tf.uint8)
    assert data.resize_shorter_side(image, 36).shape == (36, 54, 3)
    assert data.resize_shorter_side(tf.zeros([75, 40, 3], tf.uint8), 36).shape == (67, 36, 3)
    assert data.eval_side(224) == 256 and data.eval_side(32) == 36


# -----------------------------------------------------------------------------
# image folders

def coordinate_image(h, w):
    """uint8 image encoding its own coordinates: R = 10 * row, G = 5 * column."""
    rows, cols = np.mgrid[:h, :w]
    return np.stack([10 * rows, 5 * cols, np.full_like(rows, 7)], -1).astype(np.uint8)


def test_eval_preprocessing_is_a_center_crop(tmp_path):
    # image_size 16 -> shorter side int(16 * 256 / 224) = 18: an 18 x 30 image is not resized,
    # only center-cropped to rows 1..16 and columns 7..22.
    image = coordinate_image(18, 30)
    for split in ("train", "test"):
        write_png(str(tmp_path / split / "a" / "0.png"), image)
    write_png(str(tmp_path / "train" / "b" / "0.png"), image)  # a second class
    d = data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, batch_size=4))
    x, _ = arrays(d.test)
    expected = image[1:17, 7:23] / 255.0
    np.testing.assert_allclose(unnormalize(x[0]), expected, atol=1e-5)
    np.testing.assert_allclose(unnormalize(arrays(d.train_plain)[0][0]), expected, atol=1e-5)


def make_folder(root, layout, size=(20, 24)):
    """layout: {split: {class: count}}; grayscale PNGs in class 'b' (decoded to 3 channels)."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                channels = 1 if name == "b" else 3
                image = rng.integers(0, 256, size + (channels,)).astype(np.uint8)
                write_png(str(root / split / name / f"{i}.png"), image)


def test_folder_dataset(tmp_path):
    make_folder(tmp_path, {"train": {"c": 3, "a": 2, "b": 4}, "val": {"b": 2},
                           "test": {"c": 1, "a": 1}})
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped
    d = data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, batch_size=4))
    info = d.info
    assert info.class_names == ("a", "b", "c") and info.num_classes == 3
    assert (info.num_train, info.num_val, info.num_test, info.has_val) == (9, 2, 2, True)
    x, y = arrays(epoch(d, 0))
    assert x.shape == (9, 16, 16, 3)
    np.testing.assert_array_equal(np.bincount(y), [2, 4, 3])
    np.testing.assert_array_equal(arrays(d.val)[1], [1, 1])  # 'b' keeps the train label
    np.testing.assert_array_equal(np.sort(arrays(d.test)[1]), [0, 2])
    batch_sizes = [len(yb) for _, yb in epoch(d, 0)]
    assert batch_sizes == [4, 4, 1]


def test_folder_corrupt_file_is_named(tmp_path):
    make_folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1}})
    bad = tmp_path / "test" / "a" / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(data.DataError, match="notes.jpg"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}"))


def test_folder_missing_directories(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path / "nowhere")):
        data.load(DataConfig(dataset=f"folder:{tmp_path / 'nowhere'}"))
    make_folder(tmp_path, {"train": {"a": 1}})
    with pytest.raises(data.DataError, match=str(tmp_path / "test")):
        data.load(DataConfig(dataset=f"folder:{tmp_path}"))


def test_folder_unknown_test_class(tmp_path):
    make_folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "z": 1}})
    with pytest.raises(data.DataError, match=r"test has classes that .* lacks: z"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}"))


# -----------------------------------------------------------------------------
# tfds

@pytest.mark.parametrize("name, num_classes, has_val", [
    ("oxford_flowers102", 102, True), ("caltech_birds2011", 200, False),
    ("stanford_dogs", 120, False), ("cars196", 196, False)])
def test_tfds_datasets_mocked(name, num_classes, has_val):
    # mock_data generates random encoded images of random sizes; the datasets count as prepared.
    with tfds.testing.mock_data(num_examples=6), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        d = data.load(DataConfig(dataset=name, image_size=32, batch_size=4))
        info = d.info
        assert (info.num_classes, len(info.class_names), info.has_val) == (
            num_classes, num_classes, has_val)
        assert (info.num_train, info.num_test, info.num_val) == (6, 6, 6 if has_val else 0)
        assert (d.val is not None) == has_val
        for ds in filter(None, (epoch(d, 0), d.train_plain, d.val, d.test)):
            x, y = arrays(ds)
            assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
            assert 0 <= y.min() and y.max() < num_classes
            assert np.isfinite(x).all()
            assert [len(yb) for _, yb in ds] == [4, 2]


def test_tfds_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", offline)  # no network, even where there is one
    data_dir, manual_dir = tmp_path / "tfds", tmp_path / "manual"
    data_dir.mkdir()
    start = time.time()
    with pytest.raises(data.DataError) as err:
        data.load(DataConfig(dataset="oxford_flowers102", data_dir=str(data_dir),
                             manual_dir=str(manual_dir)))
    assert time.time() - start < 10
    message = str(err.value)
    assert str(data_dir / "oxford_flowers102" / "2.1.1") in message
    assert "--data_dir" in message and "--manual_dir" in message and str(manual_dir) in message
    for raw in ("102flowers.tgz", "imagelabels.mat", "setid.mat"):
        assert raw in message
    assert isinstance(err.value.__cause__, requests.ConnectionError)


def test_tfds_missing_data_dir(tmp_path):
    with pytest.raises(data.DataError, match=f"--data_dir {tmp_path / 'absent'} does not exist"):
        data.load(DataConfig(dataset="cars196", data_dir=str(tmp_path / "absent")))


def test_tfds_prepared_offline_from_manual_dir(tmp_path, monkeypatch):
    """Route (b) of the offline message, unmocked: raw Flowers-102 files (tiny fakes) in
    --manual_dir are prepared by tfds without network and read back from the tfrecords."""
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "102flowers.tgz", "w:gz") as tar:
        for i in range(1, 10):
            jpeg = tf.io.encode_jpeg(coordinate_image(30 + i, 40)).numpy()
            entry = tarfile.TarInfo(f"jpg/image_{i:05d}.jpg")
            entry.size = len(jpeg)
            tar.addfile(entry, io.BytesIO(jpeg))
    scipy.io.savemat(manual / "imagelabels.mat", {"labels": np.arange(1, 10)[None] * 10})
    scipy.io.savemat(manual / "setid.mat", {"trnid": [[1, 2, 3, 4]], "valid": [[5, 6]],
                                            "tstid": [[7, 8, 9]]})
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    # The fakes do not match tfds' registered checksums of the real archives.
    monkeypatch.setattr(tfds.download.DownloadManager, "_register_or_validate_checksums",
                        lambda self, **kwargs: None)
    cfg = DataConfig(dataset="oxford_flowers102", data_dir=str(data_dir),
                     manual_dir=str(manual), image_size=16, batch_size=8)
    data.load(cfg)
    d = data.load(DataConfig(dataset="oxford_flowers102", data_dir=str(data_dir),
                             image_size=16, batch_size=8))  # prepared: --manual_dir not needed
    assert (d.info.num_train, d.info.num_val, d.info.num_test) == (4, 2, 3)
    np.testing.assert_array_equal(np.sort(arrays(epoch(d, 0))[1]), [9, 19, 29, 39])
    np.testing.assert_array_equal(np.sort(arrays(d.val)[1]), [49, 59])
    assert arrays(d.test)[0].shape == (3, 16, 16, 3)


# -----------------------------------------------------------------------------
# metric learning: class-disjoint splits, P x K batches

def metric_config(**kwargs):
    p, k = kwargs.pop("p", 5), kwargs.pop("k", 5)
    return digits_config(task="metric", p_classes=p, k_images=k, batch_size=p * k, **kwargs)


def assert_p_by_k(labels, p, k):
    """labels of one batch: exactly k images of each of p distinct classes."""
    classes, counts = np.unique(labels, return_counts=True)
    assert len(classes) == p and (counts == k).all(), labels


@pytest.fixture(scope="module")
def digits_metric():
    return data.load(metric_config(digits_per_class=500))  # digits_per_class: unused


def test_metric_digits_splits_are_class_disjoint(digits_metric):
    from sklearn.datasets import load_digits
    target = load_digits().target
    info = digits_metric.info
    assert (info.num_classes, info.class_names) == (5, tuple("01234"))
    assert (info.num_test_classes, info.test_class_names) == (5, tuple("56789"))
    assert (info.num_train, info.num_test, info.num_val, info.has_val) == (901, 896, 0, False)
    assert digits_metric.val is None
    # all images of the classes, in the source's (class-mixed) order, re-indexed from 0
    np.testing.assert_array_equal(arrays(digits_metric.train_plain)[1], target[target < 5])
    x_test, y_test = arrays(digits_metric.test)
    np.testing.assert_array_equal(y_test, target[target >= 5] - 5)
    assert x_test.shape == (896, 32, 32, 3)
    assert [len(y) for _, y in digits_metric.test][:2] == [25, 25]


def test_metric_batches_are_p_classes_by_k_images(digits_metric):
    assert digits_metric.steps_per_epoch == 901 // 25
    for e in range(2):
        batches = [(x.numpy(), y.numpy()) for x, y in epoch(digits_metric, e)]
        assert len(batches) == 36
        for x, y in batches:
            assert x.shape == (25, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
            assert_p_by_k(y, 5, 5)
    d = data.load(metric_config(p=3, k=4))
    batches = [y.numpy() for _, y in epoch(d, 0)]
    assert len(batches) == 901 // 12
    for y in batches:
        assert_p_by_k(y, 3, 4)
    assert len({tuple(np.unique(y)) for y in batches}) == 10  # all C(5, 3) class triples drawn


def test_metric_train_is_reproducible_and_differs_per_epoch():
    a, b = data.load(metric_config(seed=3)), data.load(metric_config(seed=3))
    a1, a2 = arrays(epoch(a, 0)), arrays(epoch(a, 1))
    b1, b2 = arrays(epoch(b, 1)), arrays(epoch(b, 0))  # any order of reading: epoch e is epoch e
    for u, v in ((a1, b2), (a2, b1)):
        np.testing.assert_array_equal(u[0], v[0])
        np.testing.assert_array_equal(u[1], v[1])
    assert not np.array_equal(a1[1], a2[1]) and not np.allclose(a1[0], a2[0])
    c1 = arrays(epoch(data.load(metric_config(seed=4)), 0))
    assert not np.array_equal(a1[1], c1[1])


def solid(color, h=20, w=24):
    return np.broadcast_to(np.array(color, np.uint8), (h, w, 3)).copy()


def test_metric_folder(tmp_path):
    """Train and test have their own classes; every image is of one solid colour, which
    augmentation keeps, so a batch shows whether images and labels stay together."""
    colors = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250), "x": (250, 250, 0),
              "y": (0, 250, 250)}
    for split, counts in (("train", {"a": 3, "b": 2, "c": 5}), ("test", {"y": 2, "x": 1})):
        for name, n in counts.items():
            for i in range(n):
                write_png(str(tmp_path / split / name / f"{i}.png"), solid(colors[name]))
    d = data.load(metric_config(dataset=f"folder:{tmp_path}", image_size=16, p=2, k=2))
    info = d.info
    assert (info.class_names, info.test_class_names) == (("a", "b", "c"), ("x", "y"))
    assert (info.num_train, info.num_test, info.num_classes, info.num_test_classes) == (10, 3, 3, 2)
    train_colors = np.array([colors[c] for c in "abc"]) / 255.0
    for _ in range(2):
        batches = [(x.numpy(), y.numpy()) for x, y in epoch(d, 0)]
        assert len(batches) == 10 // 4
        for x, y in batches:
            assert_p_by_k(y, 2, 2)
            np.testing.assert_allclose(unnormalize(x).mean(axis=(1, 2)), train_colors[y],
                                       atol=2e-3)
    x, y = arrays(d.test)
    np.testing.assert_array_equal(np.sort(y), [0, 1, 1])
    np.testing.assert_allclose(unnormalize(x).mean(axis=(1, 2)),
                               np.array([colors[c] for c in "xy"])[y] / 255.0, atol=2e-3)
    np.testing.assert_array_equal(np.bincount(arrays(d.train_plain)[1]), [3, 2, 5])


@pytest.mark.parametrize("name, n_train_classes, n_classes", [
    ("caltech_birds2011", 100, 200), ("cars196", 98, 196)])
def test_metric_tfds_mocked(name, n_train_classes, n_classes):
    # mock_data gives both tfds splits the same random examples, so every class that occurs has
    # at least 2 images in the pool; most classes have none (never drawn).
    with tfds.testing.mock_data(num_examples=30), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        builder = tfds.builder(name)
        names = builder.info.features["label"].names
        # The mocked labels depend on which features are generated: skip images as ke_tf does.
        decoders = tfds.decode.PartialDecoding({"image": True, "label": True},
                                               decoders={"image": tfds.decode.SkipDecoding()})
        pool = np.concatenate([[y for _, y in tfds.as_numpy(builder.as_dataset(
            split=split, as_supervised=True, decoders=decoders))] for split in ("train", "test")])
        d = data.load(metric_config(dataset=name, image_size=16, p=2, k=2))
        info = d.info
        assert (info.num_classes, info.num_test_classes) == (n_train_classes,
                                                              n_classes - n_train_classes)
        assert info.class_names == tuple(names[:n_train_classes])
        assert info.test_class_names == tuple(names[n_train_classes:])
        train, test = pool[pool < n_train_classes], pool[pool >= n_train_classes]
        assert 0 < len(train) and 0 < len(test) and len(train) + len(test) == 60
        assert (info.num_train, info.num_test, info.has_val) == (len(train), len(test), False)
        np.testing.assert_array_equal(arrays(d.train_plain)[1], train)
        x, y = arrays(d.test)
        np.testing.assert_array_equal(y, test - n_train_classes)
        assert x.shape == (len(test), 16, 16, 3) and np.isfinite(x).all()
        batches = [y.numpy() for _, y in epoch(d, 0)]
        assert len(batches) == len(train) // 4
        for y in batches:
            assert_p_by_k(y, 2, 2)
            assert set(y) <= set(train)


def test_metric_errors():
    with pytest.raises(data.DataError, match=r"--k_images=180: training class '0' .* 178 images"):
        data.load(metric_config(p=2, k=180))
    with pytest.raises(data.DataError, match=r"--p_classes=6 exceeds the 5 training classes"):
        data.load(metric_config(p=6, k=2))
    for name in ("oxford_flowers102", "stanford_dogs"):  # refused before any download
        with pytest.raises(data.DataError, match=f"--task=metric .* --dataset={name}"):
            data.load(metric_config(dataset=name, data_dir="/nonexistent"))


def test_metric_batches_do_not_depend_on_caching(digits_metric, monkeypatch):
    cached = arrays(epoch(data.load(metric_config(seed=0)), 0))
    monkeypatch.setattr(data.pipelines, "CACHE_BYTES", 0)  # decode at every use
    uncached = data.load(metric_config(seed=0))
    for u, v in zip(cached, arrays(epoch(uncached, 0))):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(arrays(digits_metric.train_plain), arrays(uncached.train_plain)):
        np.testing.assert_array_equal(u, v)


def test_folder_metric_needs_class_disjoint_train_and_test(tmp_path):
    for split, classes in (("train", ("ant", "bee")), ("test", ("bee", "cat"))):
        for c in classes:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            (d / "0.png").write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    cfg = DataConfig(dataset=f"folder:{tmp_path}", task="metric", image_size=16, batch_size=4,
                     p_classes=2, k_images=2)
    with pytest.raises(data.DataError, match="bee"):
        data.load(cfg)


# -----------------------------------------------------------------------------
# --val_fraction: a validation split for datasets without one

def fingerprints(ds):
    """A hashable fingerprint per image of `ds` (its bytes after evaluation preprocessing)."""
    return {x.tobytes() for x in arrays(ds)[0]}


def test_digits_validation_comes_from_the_non_training_pool():
    d = data.load(digits_config(image_size=16, val_fraction=0.2))
    info = d.info
    assert (info.num_train, info.num_val, info.num_test, info.has_val) == (100, 339, 1358, True)
    _, y_val = arrays(d.val)
    all_counts = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # load_digits()
    np.testing.assert_array_equal(np.bincount(y_val), np.floor((all_counts - 10) * 0.2 + 0.5))
    np.testing.assert_array_equal(np.bincount(arrays(d.train_plain)[1]), [10] * 10)
    train, val, test = (fingerprints(ds) for ds in (d.train_plain, d.val, d.test))
    assert not (val & test) and not (val & train)
    # the split is the same for every --seed; without --val_fraction nothing changes
    other = data.load(digits_config(image_size=16, val_fraction=0.2, seed=5))
    assert fingerprints(other.val) == val
    assert data.load(digits_config(image_size=16)).info.num_test == 1697


def test_folder_validation_is_a_stratified_share_of_training(tmp_path):
    make_folder(tmp_path, {"train": {"a": 6, "b": 3, "c": 4}, "test": {"a": 1, "c": 1}})
    whole = data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, batch_size=4))
    d = data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, batch_size=4,
                             val_fraction=0.34))
    info = d.info
    assert (info.num_train, info.num_val, info.num_test) == (9, 4, 2)
    np.testing.assert_array_equal(np.bincount(arrays(d.val)[1]), [2, 1, 1])
    np.testing.assert_array_equal(np.bincount(arrays(epoch(d, 0))[1]), [4, 2, 3])
    train, val = fingerprints(d.train_plain), fingerprints(d.val)
    assert not (train & val) and train | val == fingerprints(whole.train_plain)
    with pytest.raises(data.DataError, match=r"--val_fraction=0.1 leaves class 'b' \(3 training "
                                             r"images\) without a validation image"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, val_fraction=0.1))
    with pytest.raises(data.DataError, match="without a training image"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, val_fraction=0.9))
    make_folder(tmp_path, {"val": {"a": 1}})  # a validation split of its own wins
    with pytest.raises(data.DataError, match=f"--val_fraction: --dataset=folder:{tmp_path} has a "
                                             "validation split of its own"):
        data.load(DataConfig(dataset=f"folder:{tmp_path}", image_size=16, val_fraction=0.34))


def test_tfds_validation_fraction_mocked():
    with tfds.testing.mock_data(num_examples=6), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        with pytest.raises(data.DataError, match="--dataset=oxford_flowers102 has a validation "
                                                 "split of its own"):
            data.load(DataConfig(dataset="oxford_flowers102", image_size=32, val_fraction=0.2))
        # mock_data's 6 images fall in 6 of the 120 classes, one each: 0.5 keeps no training
        # image of theirs (the holdout read the labels of tfds' records)
        with pytest.raises(data.DataError, match=r"\(1 training images\) without a training"):
            data.load(DataConfig(dataset="stanford_dogs", image_size=32, val_fraction=0.5))


def test_metric_validation_classes_are_disjoint(tmp_path):
    d = data.load(metric_config(image_size=16, p=2, k=2, val_fraction=0.4))
    info = d.info
    assert (info.num_classes, info.has_val) == (3, True)
    assert info.num_train + info.num_val + info.num_test == 1797
    y_val = arrays(d.val)[1]
    assert sorted(set(y_val)) == [0, 1] and info.num_val == len(y_val)  # 2 classes, from 0
    assert not (fingerprints(d.val) & fingerprints(d.train_plain))
    with pytest.raises(data.DataError, match="leaves at least --p_classes=5 to train on: this "
                                             "dataset's protocol leaves no classes to spare"):
        data.load(metric_config(image_size=16, p=5, k=2, val_fraction=0.4))
    with pytest.raises(data.DataError, match=r"hold out 2 to 3 classes \(--val_fraction from "
                                             r"0.3 to 0.698\)"):
        data.load(metric_config(image_size=16, p=2, k=2, val_fraction=0.1))
    for fraction in (0.3, 0.698):  # the ends of that range work
        assert data.load(metric_config(image_size=16, p=2, k=2, val_fraction=fraction)).val
    # a folder's own val/ classes, disjoint from train and test
    make_folder(tmp_path, {"train": {"a": 2, "c": 2}, "val": {"v": 2, "w": 1},
                           "test": {"x": 2}})
    d = data.load(metric_config(dataset=f"folder:{tmp_path}", image_size=16, p=2, k=2))
    assert (d.info.num_val, sorted(set(arrays(d.val)[1]))) == (3, [0, 1])
    make_folder(tmp_path, {"val": {"x": 1}})
    with pytest.raises(data.DataError, match="val shares classes with train or test"):
        data.load(metric_config(dataset=f"folder:{tmp_path}", image_size=16, p=2, k=2))
