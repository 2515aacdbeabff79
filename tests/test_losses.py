"""Tests of ke_tf.losses: the semi-hard triplet loss (paper Eq. 3-4) against tfa 0.23's outputs."""
from __future__ import annotations

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ke_tf.losses import TripletSemiHardLoss, triplet_semihard_loss

# tfa 0.23's outputs, in the project's shared data beside the repository
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "golden", "tfa_triplet_semihard.json")
METRICS = ("L2", "squared-L2", "angular")


def _golden_cases():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)["cases"]


def _reference_loss(labels, embeddings, margin):
    """Eq. 3-4 with the L2 distance, loop by loop, in float64 (none of tfa's tensor tricks)."""
    labels = np.asarray(labels).reshape(-1)
    x = np.asarray(embeddings, np.float64)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    total, pairs = 0.0, 0
    for a in range(len(labels)):
        negatives = dist[a][labels != labels[a]]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            farther = negatives[negatives > dist[a, p]]
            if farther.size:  # semi-hard (Eq. 4), or easy: the closest negative beyond D_ap
                d_an = farther.min()
            elif negatives.size:  # all negatives closer than the positive: the farthest one
                d_an = negatives.max()
            else:  # no negative at all: tfa's masked maximum yields the row minimum, 0
                d_an = 0.0
            total += max(dist[a, p] - d_an + margin, 0.0)
            pairs += 1
    return total / pairs if pairs else 0.0


@pytest.mark.parametrize("case", _golden_cases(),
                         ids=lambda c: f"{c['distance_metric']}-B{len(c['labels'])}-m{c['margin']}")
def test_matches_tfa_golden(case):
    # No golden case has all labels distinct (tfa's NaN); if one is added, ours must give 0.
    expected = 0.0 if math.isnan(case["loss"]) else case["loss"]
    loss = triplet_semihard_loss(np.array(case["labels"]), np.array(case["embeddings"], np.float32),
                                 margin=case["margin"], distance_metric=case["distance_metric"])
    assert loss.dtype == tf.float32
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, abs(expected))


def test_golden_file_is_present_and_covers_all_metrics():
    cases = _golden_cases()
    assert len(cases) >= 20
    assert {c["distance_metric"] for c in cases} == set(METRICS)
    assert any(len(set(c["labels"])) == 1 for c in cases)  # the single-class fallback


def test_hand_computed_case():
    # 1-D points a=0, p=0.5 (class 0), n=1 (class 1), margin 1, L2.
    # (a, p): D_ap = 0.5, n is farther (1.0 > 0.5): semi-hard, loss 0.5 - 1.0 + 1 = 0.5.
    # (p, a): D_pa = 0.5, n is at 0.5, not strictly farther: fallback to the farthest negative
    #         (0.5), loss 0.5 - 0.5 + 1 = 1.0. Mean over the 2 positive pairs: 0.75.
    loss = triplet_semihard_loss([0, 0, 1], [[0.0], [0.5], [1.0]], margin=1.0)
    assert float(loss) == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(12, 1))  # [B, 1] labels
    embeddings = rng.normal(size=(12, 3)).astype(np.float32)
    loss = triplet_semihard_loss(labels, embeddings, margin=0.7)
    assert float(loss) == pytest.approx(_reference_loss(labels, embeddings, 0.7), abs=1e-5)


def test_all_distinct_labels_give_zero_not_nan():
    # Deliberate difference from tfa, which returns 0 / 0 = NaN when no positive pair exists.
    embeddings = tf.constant(np.random.default_rng(0).normal(size=(5, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss = triplet_semihard_loss(tf.range(5), embeddings)
    grad = tape.gradient(loss, embeddings)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad.numpy(), 0.0)


@pytest.mark.parametrize("distance_metric", METRICS)
@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 0], [3, 3, 3, 3, 3, 3]],
                         ids=["mixed", "one-class"])
def test_gradients_finite_with_duplicate_embeddings(distance_metric, labels):
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    # Rows 0/1 and 3/4 are equal (zero distances between and within classes); row 5 is zero.
    x = np.stack([x[0], x[0], x[1], x[2], x[2], np.zeros(8, np.float32)])
    embeddings = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss = triplet_semihard_loss(labels, embeddings, margin=0.5,
                                     distance_metric=distance_metric)
    grad = tape.gradient(loss, embeddings)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(grad.numpy()))
    assert np.any(grad.numpy() != 0.0)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_embeddings_are_computed_in_float32(dtype):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=10)
    embeddings = tf.cast(rng.normal(size=(10, 6)), dtype)
    loss = triplet_semihard_loss(labels, embeddings)
    assert loss.dtype == tf.float32
    expected = triplet_semihard_loss(labels, tf.cast(embeddings, tf.float32))
    assert float(loss) == float(expected)


def test_callable_distance_metric():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=10)
    embeddings = rng.normal(size=(10, 6)).astype(np.float32)

    def squared_l2(x):
        return tf.reduce_sum(tf.square(x[:, None, :] - x[None, :, :]), axis=-1)

    ours = triplet_semihard_loss(labels, embeddings, distance_metric=squared_l2)
    builtin = triplet_semihard_loss(labels, embeddings, distance_metric="squared-L2")
    assert float(ours) == pytest.approx(float(builtin), abs=1e-5)


def test_works_in_xla_with_unknown_batch_size():
    compiled = tf.function(triplet_semihard_loss, jit_compile=True, input_signature=[
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 4], tf.float32)])
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=9).astype(np.int32)
    embeddings = rng.normal(size=(9, 4)).astype(np.float32)
    assert float(compiled(labels, embeddings)) == pytest.approx(
        float(triplet_semihard_loss(labels, embeddings)), abs=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Received: distance_metric='cosine'"):
        triplet_semihard_loss([0, 0], [[0.0], [1.0]], distance_metric="cosine")
    with pytest.raises(ValueError, match="Received: distance_metric='L1'"):
        TripletSemiHardLoss(distance_metric="L1")
    with pytest.raises(ValueError, match="y_true.shape"):
        triplet_semihard_loss(np.zeros((2, 2)), [[0.0], [1.0]])
    with pytest.raises(ValueError, match="y_pred.shape"):
        triplet_semihard_loss([0, 0], [0.0, 1.0])


def test_keras_loss_matches_function_and_returns_float32():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=(10, 1))
    embeddings = rng.normal(size=(10, 6)).astype(np.float16)
    loss_fn = TripletSemiHardLoss(margin=0.3, distance_metric="angular")
    value = loss_fn(labels, embeddings)
    assert value.dtype == tf.float32
    assert float(value) == pytest.approx(float(triplet_semihard_loss(
        labels, embeddings, margin=0.3, distance_metric="angular")), abs=1e-6)


def test_keras_loss_config_round_trip():
    loss_fn = TripletSemiHardLoss(margin=0.2, distance_metric="squared-L2", name="tl")
    config = loss_fn.get_config()
    assert config["margin"] == 0.2 and config["distance_metric"] == "squared-L2"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss_fn))
    assert isinstance(restored, TripletSemiHardLoss)
    assert restored.get_config() == config


@keras.saving.register_keras_serializable(package="ke_tf_tests")
def _squared_l2(x):
    return tf.reduce_sum(tf.square(x[:, None, :] - x[None, :, :]), axis=-1)


def test_keras_loss_config_round_trip_with_callable_metric():
    loss_fn = TripletSemiHardLoss(distance_metric=_squared_l2)
    restored = TripletSemiHardLoss.from_config(loss_fn.get_config())
    assert restored.distance_metric is _squared_l2


def test_fit_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
        model.compile(optimizer="sgd", loss=TripletSemiHardLoss(margin=0.5))
        rng = np.random.default_rng(6)
        x = rng.normal(size=(16, 5)).astype(np.float32)
        history = model.fit(x, rng.integers(0, 4, size=16), batch_size=16, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))
