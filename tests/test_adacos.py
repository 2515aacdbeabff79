"""Tests of ke_tf.losses.adacos_logits (AdaCos, Zhang et al., CVPR 2019) against a float64 numpy
reference (golden file) and hand-made cases for the median, the gradients and the dtypes."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from ke_tf.losses import adacos_initial_scale, adacos_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "..", "shared", "golden", "adacos.json")
RTOL = 1e-4


def _golden_cases():
    """The golden cases; the file is part of the project's shared data (beside the repo)."""
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)["cases"]


CASES = _golden_cases()


@pytest.mark.parametrize("index", range(len(CASES)))
def test_golden(index):
    case = CASES[index]
    logits, new_scale = adacos_logits(np.float32(case["features"]),
                                      np.float32(case["class_weights"]),
                                      np.asarray(case["labels"]), case["scale"])
    assert logits.dtype == tf.float32 and new_scale.dtype == tf.float32
    np.testing.assert_allclose(float(new_scale), case["new_scale"], rtol=RTOL)
    expected = np.asarray(case["logits"])
    # Relative to the logits' magnitude: float32 cosines have ~1e-7 absolute error, so cosines
    # near 0 (the golden file has some ~1e-5) cannot be 1e-4 close element by element.
    np.testing.assert_allclose(logits.numpy(), expected, rtol=RTOL,
                               atol=RTOL * np.abs(expected).max())


def test_golden_file_has_ten_cases():
    assert len(CASES) == 10


def _angles_case(angles):
    """2-D features at `angles` (radians) from class 0's weight (1, 0); classes 1, 2 are (0, 1)
    and (-1, 0), so the target angles are exactly `angles` and the non-target cosines are
    sin(a) and -cos(a)."""
    angles = np.asarray(angles, np.float64)
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 3.0  # not unit length
    weights = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) * [[2.0, 0.5, 1.5]]
    labels = np.zeros(len(angles), np.int64)
    return features.astype(np.float32), weights.astype(np.float32), labels


def _expected_scale(angles, scale, median):
    angles = np.asarray(angles, np.float64)
    b_avg = np.mean(np.exp(scale * np.sin(angles)) + np.exp(-scale * np.cos(angles)))
    return math.log(b_avg) / math.cos(min(math.pi / 4, median))


def test_even_count_takes_lower_middle_value():
    angles = [0.7, 0.05, 0.6, 0.1]  # unsorted; middle values 0.1 and 0.6, both below pi/4
    scale = 2.5
    features, weights, labels = _angles_case(angles)
    logits, new_scale = adacos_logits(features, weights, labels, scale)
    lower = _expected_scale(angles, scale, 0.1)
    assert float(new_scale) == pytest.approx(lower, rel=1e-5)
    # The upper middle value and the mean of the two give clearly different scales.
    for other in (0.6, 0.35):
        assert abs(_expected_scale(angles, scale, other) - lower) > 0.05 * lower
    cos = np.stack([np.cos(angles), np.sin(angles), -np.cos(angles)], axis=1)
    np.testing.assert_allclose(logits.numpy(), lower * cos, rtol=1e-5, atol=1e-5)


def test_odd_count_takes_middle_value_of_target_angles_only():
    angles = [0.5, 0.1, 0.3]
    features, weights, labels = _angles_case(angles)
    _, new_scale = adacos_logits(features, weights, labels, 1.7)
    # The median of all 9 angles would be pi/2 - 0.3 (clamped at pi/4): a different scale.
    assert float(new_scale) == pytest.approx(_expected_scale(angles, 1.7, 0.3), rel=1e-5)
    clamped = _expected_scale(angles, 1.7, math.pi / 4)
    assert abs(clamped - float(new_scale)) > 0.05 * float(new_scale)


def test_median_is_clamped_at_quarter_pi():
    angles = [1.0, 1.2, 1.4, 0.9]
    features, weights, labels = _angles_case(angles)
    _, new_scale = adacos_logits(features, weights, labels, 3.0)
    assert float(new_scale) == pytest.approx(
        _expected_scale(angles, 3.0, math.pi / 4), rel=1e-5)


def test_initial_scale():
    for c in (2, 10, 100, 1000):
        assert adacos_initial_scale(c) == pytest.approx(math.sqrt(2.0) * math.log(c - 1))
    assert adacos_initial_scale(2) == 0.0
    assert adacos_initial_scale(200) == pytest.approx(7.4859, abs=1e-4)  # sqrt(2) ln 199
    with pytest.raises(ValueError):
        adacos_initial_scale(1)


def test_gradients_reach_features_and_weights_not_the_scale():
    rng = np.random.default_rng(0)
    features = tf.Variable(rng.normal(size=(6, 5)).astype(np.float32))
    weights = tf.Variable(rng.normal(size=(5, 4)).astype(np.float32))
    scale = tf.Variable(adacos_initial_scale(4), dtype=tf.float32)
    labels = np.array([0, 1, 2, 3, 0, 1])
    with tf.GradientTape(persistent=True) as tape:
        logits, new_scale = adacos_logits(features, weights, labels, scale)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    g_features, g_weights, g_scale = tape.gradient(loss, [features, weights, scale])
    assert g_features is not None and g_weights is not None
    assert np.all(np.isfinite(g_features.numpy())) and np.abs(g_features.numpy()).max() > 0
    assert np.all(np.isfinite(g_weights.numpy())) and np.abs(g_weights.numpy()).max() > 0
    assert g_scale is None
    assert tape.gradient(new_scale, [features, weights, scale]) == [None, None, None]
    # The gradient is that of new_scale * cos with new_scale a constant.
    with tf.GradientTape() as tape2:
        x = tf.math.l2_normalize(features, axis=1)
        w = tf.math.l2_normalize(weights, axis=0)
        reference = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, float(new_scale) * tf.matmul(x, w)))
    np.testing.assert_allclose(tape2.gradient(reference, features).numpy(),
                               g_features.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_float32_outputs_for_low_precision_inputs(dtype):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(8, 6)).astype(np.float32)
    weights = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    low_f, low_w = tf.cast(features, dtype), tf.cast(weights, dtype)
    logits, new_scale = adacos_logits(low_f, low_w, labels, tf.constant(2.0, dtype))
    assert logits.dtype == tf.float32 and new_scale.dtype == tf.float32
    ref_logits, ref_scale = adacos_logits(tf.cast(low_f, tf.float32),
                                          tf.cast(low_w, tf.float32), labels, 2.0)
    np.testing.assert_allclose(logits.numpy(), ref_logits.numpy(), rtol=1e-6, atol=1e-6)
    assert float(new_scale) == pytest.approx(float(ref_scale), rel=1e-6)


def test_inside_tf_function_with_unknown_batch_size():
    fn = tf.function(adacos_logits, input_signature=[
        tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([2, 3], tf.float32),
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32)])
    angles = [0.7, 0.05, 0.6, 0.1]
    features, weights, labels = _angles_case(angles)
    _, new_scale = fn(features, weights, labels, tf.constant(2.5))
    assert float(new_scale) == pytest.approx(_expected_scale(angles, 2.5, 0.1), rel=1e-5)
