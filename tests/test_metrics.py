"""Tests of ke_tf.metrics on cases worked out by hand (paper sec. 3.4, appendix C.2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from ke_tf import metrics


# --- top-k accuracy -------------------------------------------------------------------------

def test_topk_accuracy_hand_case():
    logits = np.array([[0.1, 0.5, 0.4],   # label 2: one larger logit (0.5) -> rank 1
                       [0.3, 0.3, 0.4],   # label 1: 0.4 larger, 0.3 tied at lower index 0 -> rank 2
                       [0.9, 0.05, 0.05]])  # label 0: the largest -> rank 0
    labels = np.array([2, 1, 0])
    assert metrics.topk_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
    assert metrics.topk_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
    assert metrics.topk_accuracy(logits, labels, 3) == 100.0


def test_topk_accuracy_ties_follow_stable_argsort():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(200, 6)).astype(np.float32)  # many ties
    labels = rng.integers(0, 6, size=200)
    order = np.argsort(-logits, axis=1, kind="stable")
    for k in (1, 2, 5):
        expected = 100.0 * np.mean([labels[i] in order[i, :k] for i in range(200)])
        assert metrics.topk_accuracy(logits, labels, k) == pytest.approx(expected)


def test_topk_accuracy_invalid_arguments():
    with pytest.raises(ValueError, match="Received: k=4"):
        metrics.topk_accuracy(np.zeros((2, 3)), [0, 1], 4)
    with pytest.raises(ValueError, match="labels.shape"):
        metrics.topk_accuracy(np.zeros((2, 3)), [0, 1, 2], 1)
    with pytest.raises(ValueError, match="logits.shape"):
        metrics.topk_accuracy(np.zeros(3), [0], 1)
    with pytest.raises(ValueError, match="Received: labels in"):
        metrics.topk_accuracy(np.zeros((2, 3)), [0, 3], 1)


# --- Recall@K -------------------------------------------------------------------------------

def test_recall_at_k_five_points_on_a_line():
    # Points x = 0, 1, 3, 7, 12 with labels 0, 1, 0, 1, 1. Neighbours of each query, nearest first:
    #   x=0  (0): 1(1), 3(0), ...          first same label at position 2 -> hit from K=2
    #   x=1  (1): 0(0), 3(0), 7(1), ...    position 3                    -> hit from K=3
    #   x=3  (0): 1(1), 0(0), ...          position 2                    -> hit from K=2
    #   x=7  (1): 3(0), 12(1), ...         position 2                    -> hit from K=2
    #   x=12 (1): 7(1), ...                position 1                    -> hit from K=1
    # R@1 = 1/5, R@2 = 4/5, R@4 = R@8 = 5/5.
    x = np.array([[0.0], [1.0], [3.0], [7.0], [12.0]])
    labels = np.array([0, 1, 0, 1, 1])
    assert metrics.recall_at_k(x, labels) == pytest.approx({1: 20.0, 2: 80.0, 4: 100.0, 8: 100.0})
    # Only distances matter: no normalization is assumed, and shifting/scaling changes nothing.
    shifted = metrics.recall_at_k(3.0 * x + 5.0, labels, ks=(1, 2))
    assert shifted == pytest.approx({1: 20.0, 2: 80.0})


def test_recall_at_k_ties_and_lonely_queries():
    # x = 0 (label 0), -1 (label 1), 1 (label 0).
    #   x=0:  -1 and 1 are both at distance 1; the lower index (-1, label 1) ranks first:
    #         hit from K=2.
    #   x=-1: no other item has label 1 -> never a hit.
    #   x=1:  0 (label 0) is nearest -> hit at K=1.
    x = np.array([[0.0], [-1.0], [1.0]])
    labels = np.array([0, 1, 0])
    assert metrics.recall_at_k(x, labels, ks=(1, 2)) == pytest.approx({1: 100 / 3, 2: 200 / 3})


def test_recall_at_k_excludes_the_query_itself():
    # Each point's nearest item is itself (distance 0); it must not count.
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert metrics.recall_at_k(x, [0, 1, 0, 1], ks=(1,)) == {1: 0.0}


def _brute_force_recall(x, labels, ks):
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :-1]  # drop the query (last, at inf)
    hits = labels[order] == labels[:, None]
    return {k: 100.0 * np.mean(hits[:, :k].any(axis=1)) for k in ks}


def test_recall_at_k_matches_brute_force_across_chunks():
    rng = np.random.default_rng(1)
    n = 2 * metrics._QUERY_CHUNK + 300  # three blocks of queries
    x = rng.normal(size=(n, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 150, size=n)
    ks = (1, 2, 4, 8, 16)
    assert metrics.recall_at_k(x, labels, ks) == pytest.approx(_brute_force_recall(x, labels, ks))


def test_recall_at_k_invalid_arguments():
    with pytest.raises(ValueError, match="Received: ks="):
        metrics.recall_at_k(np.zeros((3, 2)), [0, 0, 1], ks=(0, 1))
    with pytest.raises(ValueError, match="embeddings.shape"):
        metrics.recall_at_k(np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match="labels.shape"):
        metrics.recall_at_k(np.zeros((3, 2)), [0, 1])


# --- NMI ------------------------------------------------------------------------------------

def test_nmi_perfect_clustering_is_one_whatever_the_cluster_names():
    labels = [0, 0, 1, 1, 2, 2]
    assert metrics.nmi_from_assignments(labels, [5, 5, 3, 3, 9, 9]) == pytest.approx(1.0)


def test_nmi_independent_clustering_is_zero():
    assert metrics.nmi_from_assignments([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_nmi_two_by_two_table_by_hand():
    # labels   0 0 0 0 1 1        contingency  cluster0 cluster1
    # clusters 0 0 0 1 1 1        label 0          3        1
    #                             label 1          0        2        (N = 6)
    labels = [0, 0, 0, 0, 1, 1]
    clusters = [0, 0, 0, 1, 1, 1]
    h_labels = -(4 / 6 * math.log(4 / 6) + 2 / 6 * math.log(2 / 6))
    h_clusters = -(3 / 6 * math.log(3 / 6) + 3 / 6 * math.log(3 / 6))
    # I = sum_ij p_ij log(p_ij / (p_i p_j)) over the non-empty cells.
    mutual_info = (3 / 6 * math.log((3 / 6) / (4 / 6 * 3 / 6))
                   + 1 / 6 * math.log((1 / 6) / (4 / 6 * 3 / 6))
                   + 2 / 6 * math.log((2 / 6) / (2 / 6 * 3 / 6)))
    geometric = mutual_info / math.sqrt(h_labels * h_clusters)
    arithmetic = mutual_info / ((h_labels + h_clusters) / 2)
    assert geometric == pytest.approx(0.4791, abs=1e-4)  # 0.3183 / sqrt(0.6365 * 0.6931)
    assert metrics.nmi_from_assignments(labels, clusters) == pytest.approx(geometric, rel=1e-12)
    # The entropies differ, so do the normalizations (0.4791 vs 0.4787): the paper's is the
    # geometric mean, scikit-learn's default the arithmetic one.
    assert arithmetic == pytest.approx(normalized_mutual_info_score(labels, clusters), rel=1e-12)
    assert abs(geometric - arithmetic) > 1e-4


def test_nmi_is_geometric_not_arithmetic():
    # Clusters merge labels 1 and 2, so C is a function of Omega and I = H(C).
    # H(Omega) = log 3 = 1.0986, H(C) = -(1/3 log 1/3 + 2/3 log 2/3) = 0.6365.
    # geometric: H(C) / sqrt(H(Omega) H(C)) = sqrt(0.6365 / 1.0986) = 0.7612
    # arithmetic: H(C) / ((H(Omega) + H(C)) / 2) = 0.6365 / 0.8676 = 0.7337
    labels = [0, 0, 1, 1, 2, 2]
    clusters = [0, 0, 1, 1, 1, 1]
    h_clusters = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    ours = metrics.nmi_from_assignments(labels, clusters)
    assert ours == pytest.approx(math.sqrt(h_clusters / math.log(3)), rel=1e-12)
    assert ours == pytest.approx(0.7612, abs=1e-4)
    assert normalized_mutual_info_score(labels, clusters) == pytest.approx(0.7337, abs=1e-4)


def test_nmi_kmeans_recovers_separated_classes():
    rng = np.random.default_rng(2)
    centers = 10.0 * np.eye(4)
    labels = np.repeat(np.arange(4), 25)
    x = centers[labels] + 0.1 * rng.normal(size=(100, 4))
    assert metrics.nmi(x, labels) == pytest.approx(1.0)
    # Too few clusters cannot be perfect; the seed makes the result reproducible.
    two = metrics.nmi(x, labels, num_clusters=2, seed=3)
    assert 0.0 < two < 1.0
    assert metrics.nmi(x, labels, num_clusters=2, seed=3) == two


def test_nmi_invalid_arguments():
    with pytest.raises(ValueError, match="Received: num_clusters=0"):
        metrics.nmi(np.zeros((4, 2)), [0, 0, 1, 1], num_clusters=0)
    with pytest.raises(ValueError, match="labels.shape"):
        metrics.nmi(np.zeros((4, 2)), [0, 1])
    with pytest.raises(ValueError, match="clusters.shape"):
        metrics.nmi_from_assignments([0, 1], [0, 1, 1])
