"""Tests of ke_tf.repr_filters: RePr's (Prakash et al., CVPR 2019) filter ranking, global drop
masks and orthogonal re-initialisation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ke_tf.repr_filters import drop_masks, filter_ranks, orthogonal_filters


def _kernel_1x1(*filters):
    """A [1, 1, in, out] kernel whose filter f (kernel[..., f]) is filters[f]."""
    return np.stack([np.asarray(f, np.float64) for f in filters], axis=1)[None, None]


HAND = _kernel_1x1([1, 0, 0], [-1, 1, 0], [0, 3, 4])
# Unit filters (1, 0, 0), (-1, 1, 0)/sqrt 2, (0, 0.6, 0.8): cosines -1/sqrt 2 (0-1), 0 (0-2),
# 0.6/sqrt 2 (1-2); row sums of the absolute values:
HAND_RANKS = [1 / math.sqrt(2), 1.6 / math.sqrt(2), 0.6 / math.sqrt(2)]


def _unit(x):
    return x / np.linalg.norm(x)


def _columns(kernel):
    return np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]).T


def test_ranks_hand_computed():
    np.testing.assert_allclose(filter_ranks(HAND), HAND_RANKS, rtol=1e-12, atol=1e-15)
    assert filter_ranks(HAND).dtype == np.float64
    # Scaling a filter does not change anything; permuting the filters permutes the ranks.
    np.testing.assert_allclose(filter_ranks(HAND * [[[[5.0, 0.1, 2.0]]]]), HAND_RANKS,
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(filter_ranks(HAND[..., [2, 0, 1]]),
                               np.array(HAND_RANKS)[[2, 0, 1]], rtol=1e-12, atol=1e-15)


def test_ranks_flatten_each_filter_of_a_spatial_kernel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    filters = [_unit(kernel[..., f].astype(np.float64).ravel()) for f in range(5)]
    expected = [sum(abs(float(filters[f] @ filters[g])) for g in range(5) if g != f)
                for f in range(5)]
    np.testing.assert_allclose(filter_ranks(kernel), expected, rtol=1e-6)
    # A Dense kernel [in, out] works the same way.
    np.testing.assert_allclose(filter_ranks(kernel.reshape(-1, 5)), expected, rtol=1e-6)


def test_zero_filter_stays_zero():
    kernel = _kernel_1x1([1, 0], [0, 0], [1, 1])
    # The zero filter is orthogonal to all; its row of O is only the diagonal |0 - 1| = 1.
    np.testing.assert_allclose(filter_ranks(kernel), [1 / math.sqrt(2), 1.0, 1 / math.sqrt(2)],
                               rtol=1e-12)


def test_global_ranking_across_two_layers():
    orthogonal = _kernel_1x1(*(np.eye(4) * [1.0, 2.0, 3.0, 4.0]))  # ranks all exactly 0
    kernels = {"a": HAND, "b": orthogonal}
    assert np.all(filter_ranks(orthogonal) == 0.0)
    # 7 filters; one ranking: a's three filters (ranks 1.13 > 0.71 > 0.42) go before any of b.
    masks = drop_masks(kernels, 2 / 7)
    assert set(masks) == {"a", "b"}
    assert masks["a"].dtype == bool and masks["a"].shape == (3,) and masks["b"].shape == (4,)
    np.testing.assert_array_equal(masks["a"], [False, False, True])
    np.testing.assert_array_equal(masks["b"], [True] * 4)
    # A per-layer ranking would drop from b as well; the global one empties a first.
    masks = drop_masks(kernels, 3 / 7)
    np.testing.assert_array_equal(masks["a"], [False] * 3)
    np.testing.assert_array_equal(masks["b"], [True] * 4)
    # Then the ties of b (all 0) in filter order.
    masks = drop_masks(kernels, 5 / 7)
    np.testing.assert_array_equal(masks["b"], [False, False, True, True])
    # Dict order does not matter without ties across layers.
    masks = drop_masks({"b": orthogonal, "a": HAND}, 4 / 7)
    np.testing.assert_array_equal(masks["a"], [False] * 3)
    np.testing.assert_array_equal(masks["b"], [False, True, True, True])


def test_ties_across_layers_broken_by_order():
    layer = _kernel_1x1([1, 0], [0, 1])  # ranks exactly 0, 0
    masks = drop_masks({"x": layer, "y": layer.copy()}, 0.25)
    np.testing.assert_array_equal(masks["x"], [False, True])
    np.testing.assert_array_equal(masks["y"], [True, True])
    masks = drop_masks({"y": layer, "x": layer.copy()}, 0.75)
    np.testing.assert_array_equal(masks["y"], [False, False])
    np.testing.assert_array_equal(masks["x"], [False, True])


def test_drop_count_is_rounded_share():
    kernels = {"a": HAND, "b": _kernel_1x1([1, 0], [1, 1])}  # 5 filters

    def dropped(share):
        return sum(int((~m).sum()) for m in drop_masks(kernels, share).values())
    assert dropped(0.0) == 0
    assert dropped(1.0) == 5
    assert dropped(0.3) == 2  # 1.5 -> 2
    assert dropped(0.5) == 2  # 2.5 -> 2, Python's round (half to even)
    assert dropped(0.55) == 3  # 2.75 -> 3
    with pytest.raises(ValueError):
        drop_masks(kernels, 1.5)
    assert drop_masks({}, 0.3) == {}


def _check_orthogonal(new, old, dropped, mutually=True):
    new_f, old_f = _columns(new), _columns(old)
    kept = np.flatnonzero(~dropped)
    fresh = np.flatnonzero(dropped)
    assert new.dtype == old.dtype and new.shape == old.shape
    # Kept filters bit for bit.
    for f in kept:
        assert new[..., f].tobytes() == old[..., f].tobytes()
    mean_norm = np.linalg.norm(old_f[kept], axis=1).mean()
    for f in fresh:
        assert not np.array_equal(new_f[f], old_f[f])
        np.testing.assert_allclose(np.linalg.norm(new_f[f]), mean_norm, rtol=1e-6)
        for g in kept:
            if not old_f[g].any():
                continue  # a zero kept filter: orthogonal to anything
            assert abs(_unit(new_f[f]) @ _unit(old_f[g])) < 1e-6
        if mutually:
            for g in fresh:
                if g != f:
                    assert abs(_unit(new_f[f]) @ _unit(new_f[g])) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reinitialised_filters_orthogonal_to_kept(dtype):
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 4, 8)).astype(dtype)
    original = kernel.copy()
    dropped = np.zeros(8, bool)
    dropped[[1, 4, 6]] = True
    new = orthogonal_filters(kernel, dropped, np.random.default_rng(7))
    _check_orthogonal(new, kernel, dropped)
    assert kernel.tobytes() == original.tobytes()  # the input is not modified


def test_from_drop_masks_to_reinitialisation():
    rng = np.random.default_rng(4)
    kernels = {"conv1": rng.normal(size=(3, 3, 3, 6)), "conv2": rng.normal(size=(3, 3, 6, 10))}
    kernels["conv2"][..., 3] = kernels["conv2"][..., 7] * 2.0  # a redundant pair
    masks = drop_masks(kernels, 0.25)  # 4 of 16
    assert sum(int((~m).sum()) for m in masks.values()) == 4
    assert not masks["conv2"][3] and not masks["conv2"][7]
    for path, kernel in kernels.items():
        new = orthogonal_filters(kernel, ~masks[path], np.random.default_rng(0))
        _check_orthogonal(new, kernel, ~masks[path])


def test_deterministic_for_the_same_seed():
    kernel = np.random.default_rng(5).normal(size=(3, 3, 2, 6)).astype(np.float32)
    dropped = np.array([True, False, False, True, False, True])
    a = orthogonal_filters(kernel, dropped, np.random.default_rng(11))
    b = orthogonal_filters(kernel, dropped, np.random.default_rng(11))
    c = orthogonal_filters(kernel, dropped, np.random.default_rng(12))
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a[..., dropped], c[..., dropped])
    np.testing.assert_array_equal(a[..., ~dropped], c[..., ~dropped])


def test_rank_deficient_kept_filters():
    base = np.random.default_rng(6).normal(size=(2, 2, 2, 3))
    kernel = np.concatenate([base, base[..., :1] * 3.0, np.zeros((2, 2, 2, 1)),
                             base[..., :2]], axis=-1)  # 7 filters, kept span has rank 3
    dropped = np.array([False, False, False, False, False, True, True])
    new = orthogonal_filters(kernel, dropped, np.random.default_rng(0))
    _check_orthogonal(new, kernel, dropped)


def test_more_new_filters_than_room():
    # d = 3, two kept filters leave one direction: every new filter is orthogonal to the kept
    # ones (each run of new filters is one long), so the new ones are (anti)parallel.
    kernel = _kernel_1x1([1, 0, 0], [2, 2, 2], [1, 1, 0], [0, 5, 1], [1, 3, 0])
    dropped = np.array([False, True, False, True, True])  # kept: (1, 0, 0) and (1, 1, 0)
    new = orthogonal_filters(kernel, dropped, np.random.default_rng(1))
    _check_orthogonal(new, kernel, dropped, mutually=False)
    for f in (1, 3, 4):
        assert abs(abs(_unit(_columns(new)[f]) @ [0, 0, 1]) - 1) < 1e-12


def test_mutual_orthogonality_restarts_after_the_room_is_used():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(1, 1, 4, 7))  # d = 4
    dropped = np.array([True, False, True, True, False, True, True])  # 2 kept: room 2
    new = orthogonal_filters(kernel, dropped, np.random.default_rng(3))
    _check_orthogonal(new, kernel, dropped, mutually=False)
    f = _columns(new)
    runs = [(0, 2), (3, 5)]  # the dropped filters in order: 0, 2 | 3, 5 | 6
    for a, b in runs:
        assert abs(_unit(f[a]) @ _unit(f[b])) < 1e-6


def test_kept_filters_spanning_the_whole_space_fall_back_to_random():
    # d = 2 and 3 kept filters: nothing is orthogonal to them all. Documented fallback: the
    # normalised standard normal draw itself, at the kept filters' mean norm.
    kernel = _kernel_1x1([1, 0], [0, 2], [1, 1], [3, 1], [0, 1])
    dropped = np.array([False, True, False, True, False])
    new = orthogonal_filters(kernel, dropped, np.random.default_rng(9))
    draws = np.random.default_rng(9)
    mean_norm = np.mean([1.0, math.sqrt(2), 1.0])
    for f in (1, 3):
        expected = _unit(draws.standard_normal(2)) * mean_norm
        np.testing.assert_allclose(new[0, 0, :, f], expected, rtol=1e-12)
    for f in (0, 2, 4):
        assert new[..., f].tobytes() == kernel[..., f].tobytes()
    again = orthogonal_filters(kernel, dropped, np.random.default_rng(9))
    assert again.tobytes() == new.tobytes()


def test_no_filter_kept_and_nothing_dropped():
    kernel = _kernel_1x1([3, 0, 0], [0, 1, 0])
    new = orthogonal_filters(kernel, np.array([True, True]), np.random.default_rng(0))
    f = _columns(new)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), [2.0, 2.0], rtol=1e-12)
    assert abs(_unit(f[0]) @ _unit(f[1])) < 1e-12
    same = orthogonal_filters(kernel, np.array([False, False]), np.random.default_rng(0))
    assert same.tobytes() == kernel.tobytes() and same is not kernel


def test_bad_dropped_mask():
    with pytest.raises(ValueError):
        orthogonal_filters(HAND, np.array([1, 0, 0]), np.random.default_rng(0))
    with pytest.raises(ValueError):
        orthogonal_filters(HAND, np.array([True, False]), np.random.default_rng(0))
    with pytest.raises(ValueError):
        filter_ranks(np.zeros(3))
