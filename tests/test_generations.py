"""The KE loop end to end on small real data: digits and mocked tfds datasets."""
import csv
import json
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import conftest
from ke_tf import config as C
from ke_tf import masks, reinit
from ke_tf.generations import GenerationRunner


def tiny_config(run_dir, **overrides):
    return conftest.tiny_config(run_dir, **{"train": dict(generations=3, epochs=4, warmup_epochs=2),
                                            "seed": 3, **overrides})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny 3-generation run, observed from the inside."""
    run_dir = tmp_path_factory.mktemp("run")
    runner = GenerationRunner(tiny_config(run_dir), verbose=False)
    seen = {"start": [], "reset_calls": [], "train_fn": []}
    train = runner.train

    def spy_train(state, hooks):
        seen["start"].append({v.path: v.numpy().copy() for v in runner.network.weights})
        out = train(state, hooks)
        seen["train_fn"].append(runner.model.train_function)
        seen["end_" + str(state.generation)] = {v.path: v.numpy().copy()
                                                for v in runner.network.weights}
        return out

    real_reset = reinit.reset

    def spy_reset(model, m, seed, reset_init="layer"):
        seen["reset_calls"].append(seed)
        real_reset(model, m, seed, reset_init)

    runner.train = spy_train
    reinit.reset = spy_reset
    try:
        rows = runner.run()
    finally:
        reinit.reset = real_reset
    return runner, rows, seen, run_dir


def test_results_csv(digits_run):
    _, rows, _, run_dir = digits_run
    table = read_csv(run_dir / "results.csv")
    assert list(table[0]) == [
        "generation", "net", "method", "split_mode", "split_rate", "test_top1", "test_top5",
        "val_top1", "val_top5", "val_loss", "train_loss", "train_top1", "train_top5", "params",
        "macs", "seconds", "selected", "stopped"]
    assert [(r["generation"], r["net"]) for r in table] == [
        (str(g), n) for g in (1, 2, 3) for n in ("dense", "slim", "slim_recal")]
    # --select_by=last: the last generation's dense and recalibrated slim rows are shipped
    assert [(r["generation"], r["net"]) for r in table if r["selected"] == "1"] == [
        ("3", "dense"), ("3", "slim_recal")]
    assert all(r["stopped"] == "" for r in table)
    for r in table:
        assert 0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 100
        assert 0 <= float(r["train_top1"]) <= 100 and float(r["train_loss"]) > 0
        assert r["val_top1"] == "" and r["method"] == "ke" and r["split_rate"] == "0.5"
    dense, small = table[0], table[1]
    assert int(small["params"]) < int(dense["params"]) and int(small["macs"]) < int(dense["macs"])
    assert len(rows) == 9


def test_generations_hand_weights_over_in_memory(digits_run):
    runner, _, seen, _ = digits_run
    assert seen["reset_calls"] == [(3, 1), (3, 2)]  # after every generation but the last
    m = runner.masks
    for g in (1, 2):
        end, start_next = seen[f"end_{g}"], seen["start"][g]
        for path, value in end.items():
            if path in m:  # fit kept, reset re-drawn (Eq. 1)
                np.testing.assert_array_equal(start_next[path][m[path]], value[m[path]])
                if not path.endswith("bias") and (~m[path]).any():
                    assert (start_next[path][~m[path]] != value[~m[path]]).all()
            else:  # BatchNorm transfers unchanged
                np.testing.assert_array_equal(start_next[path], value)
    # One compiled train function for the whole run: no re-tracing per generation.
    assert seen["train_fn"][0] is seen["train_fn"][1] is seen["train_fn"][2]


def test_run_directory(digits_run):
    runner, _, _, run_dir = digits_run
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["split_rate"] == 0.5 and cfg["seed"] == 3 and cfg["dataset"] == "digits"
    saved = masks.load(str(run_dir / "masks.npz"))
    again = masks.compute(runner.network, "kels", 0.5)
    assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)
    hyp = read_csv(run_dir / "hypotheses.csv")
    assert {r["generation"] for r in hyp} == {"1", "2", "3"}
    assert all(float(r["fit_mean_abs"]) > 0 for r in hyp)
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp")]


def test_export_matches_keras(digits_run):
    runner, _, _, run_dir = digits_run
    x = next(iter(runner.data.test))[0].numpy()
    for net, keras_model in (("dense", runner.network), ("slim", runner.nets["slim_recal"])):
        loaded = tf.saved_model.load(str(run_dir / "export" / net))
        out = loaded.signatures["serving_default"](images=tf.constant(x))["logits"].numpy()
        np.testing.assert_allclose(out, keras_model(x, training=False).numpy(), atol=1e-5)
        assert out.shape == (len(x), 10)


def test_tensorboard_series(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, run_dir = digits_run
    acc = EventAccumulator(str(run_dir / "tensorboard" / "generations"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    for tag in ("dense/test_top1", "slim/test_top1", "slim_recal/test_top1", "train/top1",
                "fit/conv1/kernel", "reset/conv1/kernel"):
        assert tag in tags, tag
    assert [e.step for e in acc.Tensors("dense/test_top1")] == [1, 2, 3]
    epochs = EventAccumulator(str(run_dir / "tensorboard" / "generation_002"), size_guidance={"tensors": 0})
    epochs.Reload()
    lrs = [float(tf.make_ndarray(e.tensor_proto)) for e in epochs.Tensors("lr")]
    np.testing.assert_allclose(lrs, [0.025, 0.05, 0.05, 0.025])  # warm-up 2, then cosine, restarted


def test_wels_run_has_no_slim_network(tmp_path):
    cfg = conftest.tiny_config(tmp_path, split=dict(split_mode="wels"), train=dict(generations=1),
                               export=False)
    rows = GenerationRunner(cfg, verbose=False).run()
    assert [r["net"] for r in rows] == ["dense"]
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,num_classes,has_val", [
    ("oxford_flowers102", 102, True), ("caltech_birds2011", 200, False),
    ("stanford_dogs", 120, False), ("cars196", 196, False)])
def test_mocked_tfds_datasets(tmp_path, name, num_classes, has_val):
    cfg = conftest.tiny_config(tmp_path, data=dict(dataset=name, batch_size=8, recal_images=16),
                               train=dict(regularizer="none"), export=False)
    # mock_data fakes the records; the datasets count as prepared (no download attempted).
    with tfds.testing.mock_data(num_examples=12), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        runner = GenerationRunner(cfg, verbose=False)
        rows = runner.run()
    assert runner.network.output.shape[-1] == num_classes
    assert len(rows) == 6
    assert all((r["val_top1"] != "") == has_val for r in rows)


def metric_config(run_dir, dataset="digits", image_size=16, p=5, k=2, **overrides):
    # Even batches: TF 2.21's oneDNN CPU kernels corrupt the heap training 4-8-channel nets on
    # odd batch sizes (see docs/performance.md, the oneDNN crash).
    return conftest.tiny_config(
        run_dir, data=dict(dataset=dataset, task="metric", image_size=image_size, batch_size=p * k,
                           p_classes=p, k_images=k, recal_images=30, digits_per_class=10),
        model=dict(head="embedding", embedding_dim=16), train=dict(lr=0.005), **overrides)


@pytest.mark.slow
def test_metric_learning_run_on_digits(tmp_path):
    runner = GenerationRunner(metric_config(tmp_path), verbose=False)
    rows = runner.run()
    table = read_csv(tmp_path / "results.csv")
    assert list(table[0]) == [
        "generation", "net", "method", "split_mode", "split_rate", "recall_at_1", "recall_at_2",
        "recall_at_4", "recall_at_8", "nmi", "val_recall_at_1", "val_recall_at_2",
        "val_recall_at_4", "val_recall_at_8", "val_nmi", "train_loss", "params", "macs", "seconds",
        "selected", "stopped"]
    assert [(r["generation"], r["net"]) for r in table] == [
        (str(g), n) for g in (1, 2) for n in ("dense", "slim", "slim_recal")]
    assert all(r["val_recall_at_1"] == "" for r in table)  # no --val_fraction: no val split
    for r in rows:
        recalls = [r[f"recall_at_{k}"] for k in (1, 2, 4, 8)]
        assert all(0 <= a <= b <= 100 for a, b in zip(recalls, recalls[1:]))
        assert 0 <= r["nmi"] <= 100 and r["train_loss"] >= 0
    # The rows measure the last generation's networks on the test split, with its labels.
    from ke_tf import metrics
    dense_last = [r for r in rows if r["net"] == "dense"][-1]
    emb = runner.network.predict(runner.data.test, verbose=0)
    labels = np.concatenate([y.numpy() for _, y in runner.data.test])
    assert set(labels) == set(range(5)) and len(labels) == runner.data.info.num_test
    assert dense_last["recall_at_1"] == pytest.approx(metrics.recall_at_k(emb, labels, (1,))[1])
    assert dense_last["nmi"] == pytest.approx(100 * metrics.nmi(emb, labels, seed=0))
    # The embedding layer keeps all 128 (here 16) outputs under KELS (Table 10).
    assert runner.nets["slim"].output.shape[-1] == 16
    x = next(iter(runner.data.test))[0].numpy()
    loaded = tf.saved_model.load(str(tmp_path / "export" / "slim"))
    emb = loaded.signatures["serving_default"](images=tf.constant(x))["embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, runner.nets["slim_recal"](x, training=False).numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["caltech_birds2011", "cars196"])
def test_metric_learning_on_mocked_tfds(tmp_path, name):
    cfg = metric_config(tmp_path, dataset=name, p=4, k=2, export=False)
    with tfds.testing.mock_data(num_examples=80), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        rows = GenerationRunner(cfg, verbose=False).run()
    assert len(rows) == 6 and all(0 <= r["recall_at_1"] <= 100 for r in rows)


@pytest.mark.slow
def test_used_run_dir_is_refused_without_overwrite(tmp_path):
    (tmp_path / "results.csv").write_text("from another run\n")
    with pytest.raises(C.ConfigError, match="--overwrite"):
        GenerationRunner(tiny_config(tmp_path), verbose=False)
    assert (tmp_path / "results.csv").read_text() == "from another run\n"
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "stale").write_text("x")
    cfg = conftest.tiny_config(tmp_path, train=dict(generations=1), overwrite=True, export=False)
    GenerationRunner(cfg, verbose=False).run()
    assert len(read_csv(tmp_path / "results.csv")) == 3 and not (tmp_path / "export").exists()
    assert oct(os.stat(tmp_path / "results.csv").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_wels_rand_draws_a_new_mask_every_generation(tmp_path):
    cfg = conftest.tiny_config(tmp_path, split=dict(split_mode="wels", wels_rand=True),
                               train=dict(generations=3), export=False, seed=5)
    runner = GenerationRunner(cfg, verbose=False)
    first = runner.masks
    runner.run()
    expected = masks.compute(runner.network, "wels", 0.5, seed=(5, 3))
    assert all(np.array_equal(runner.masks[k], expected[k]) for k in expected)
    assert not np.array_equal(first["conv1/kernel"], runner.masks["conv1/kernel"])
    saved = masks.load(str(tmp_path / "masks.npz"))
    assert np.array_equal(saved["conv1/kernel"], expected["conv1/kernel"])


@pytest.mark.slow
def test_folder_dataset_with_three_classes(tmp_path):
    conftest.image_folder(tmp_path / "imgs")
    cfg = conftest.tiny_config(
        tmp_path / "run", data=dict(dataset=f"folder:{tmp_path / 'imgs'}", batch_size=6,
                                    recal_images=12),
        train=dict(generations=1, regularizer="none"), export=False)
    rows = GenerationRunner(cfg, verbose=False).run()
    assert [r["test_top5"] for r in rows] == [100.0] * 3  # top-3 of 3 classes


@pytest.mark.slow
@pytest.mark.parametrize("option", ["mixed_precision", "jit_compile"])
def test_mixed_precision_and_xla_runs(tmp_path, option):
    """--mixed_precision=force (bfloat16 on any CPU, float32 variables) and --jit_compile train,
    evaluate and export; the global dtype policy is left as it was."""
    import keras

    cfg = conftest.tiny_config(tmp_path, **{option: "force" if option == "mixed_precision"
                                            else True})
    runner = GenerationRunner(cfg, verbose=False)
    rows = runner.run()
    conv = runner.network.get_layer("conv1")
    expected = "bfloat16" if option == "mixed_precision" else "float32"
    assert (conv.compute_dtype, conv.variable_dtype) == (expected, "float32")
    assert keras.mixed_precision.global_policy().name == "float32"
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_top1"] <= 100 for r in rows)
    assert len(rows) == 6
    served = tf.saved_model.load(str(tmp_path / "export" / "slim"))
    x = next(iter(runner.data.test))[0]
    out = served.signatures["serving_default"](images=x)["logits"]
    assert out.dtype == tf.float32 and out.shape == (x.shape[0], 10)
