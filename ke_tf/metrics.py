"""Evaluation metrics of Knowledge Evolution, as pure functions on numpy arrays.

Classification (sec. 4.1; Table 2 reports top-1): top-k accuracy of the logits, and their mean
cross entropy (Eq. 2 without smoothing: the validation loss `ke_tf.selection` can select by). Metric learning
(sec. 3.4, appendix C.2): Recall@K of retrieval among the test embeddings, and the Normalized
Mutual Information NMI = I(Omega, C) / sqrt(H(Omega) H(C)) of a K-means clustering of them.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

# K-means restarts for `nmi`: fixed so that the score depends only on the embeddings and seed.
KMEANS_N_INIT = 10
# Queries per block of the distance matrix in `recall_at_k`: 1024 x N float64 at a time.
_QUERY_CHUNK = 1024


def topk_accuracy(logits, labels, k: int) -> float:
    """Percent of samples whose label is among the `k` highest logits.

    Ties are broken as by `tf.math.top_k` and a stable `np.argsort(-logits)`: among equal
    logits the lower class index ranks first. The label's rank is the number of classes with
    a larger logit plus the number with an equal logit and a lower index; it is a hit when that
    rank is below k.

    Args:
      logits: [N, C] scores.
      labels: [N] integer classes in [0, C).
      k: 1 <= k <= C.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError("`logits` must have shape [N, C] with N > 0. "
                         f"Received: logits.shape={logits.shape}")
    num_samples, num_classes = logits.shape
    if labels.shape != (num_samples,):
        raise ValueError(f"`labels` must have shape [{num_samples}]. "
                         f"Received: labels.shape={labels.shape}")
    if not 1 <= k <= num_classes:
        raise ValueError(f"`k` must be in [1, {num_classes}]. Received: k={k}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"`labels` must be in [0, {num_classes}). "
                         f"Received: labels in [{labels.min()}, {labels.max()}]")
    label_logits = logits[np.arange(num_samples), labels][:, None]
    lower_index = np.arange(num_classes)[None, :] < labels[:, None]
    rank = np.sum(logits > label_logits, axis=1) + np.sum(
        (logits == label_logits) & lower_index, axis=1)
    return float(100.0 * np.mean(rank < k))


def cross_entropy(logits, labels) -> float:
    """Mean -log softmax(logits)[label] over the samples (natural log; float64, a stable
    log-sum-exp, so a large logit gives a large loss, never inf or NaN; NaN logits give NaN)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"`logits` must be [N, C] with N > 0 and `labels` [N]. Received: "
                         f"logits.shape={logits.shape}, labels.shape={labels.shape}")
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))


def recall_at_k(embeddings, labels, ks=(1, 2, 4, 8)) -> dict:
    """Recall@K in percent for each K in `ks` (paper sec. 3.4, appendix C.2).

    Every embedding queries all the other embeddings (never itself), ranked by Euclidean
    distance; the query is a hit at K when one of its K nearest neighbours has its label.
    Equal distances are ranked by index (lower first). A query whose label no other item has
    is never a hit. The distance matrix is computed in blocks of queries, in float64, so
    ~10k embeddings take little memory.

    Args:
      embeddings: [N, D], N >= 2.
      labels: [N] class labels.
      ks: positive integers.

    Returns:
      {k: percent of queries that are hits at k}.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"`embeddings` must have shape [N, D] with N >= 2. "
                         f"Received: embeddings.shape={embeddings.shape}")
    num_items = embeddings.shape[0]
    if labels.shape != (num_items,):
        raise ValueError(f"`labels` must have shape [{num_items}]. "
                         f"Received: labels.shape={labels.shape}")
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"`ks` must be positive integers. Received: ks={ks}")

    squared_norms = np.sum(embeddings ** 2, axis=1)
    index = np.arange(num_items)
    # rank[q]: how many items precede q's first same-label neighbour in q's ranking.
    ranks = np.empty(num_items, dtype=np.int64)
    for start in range(0, num_items, _QUERY_CHUNK):
        query = slice(start, min(start + _QUERY_CHUNK, num_items))
        rows = index[query]
        distances = (squared_norms[query, None] + squared_norms[None, :]
                     - 2.0 * embeddings[query] @ embeddings.T)
        distances = np.maximum(distances, 0.0)
        distances[np.arange(len(rows)), rows] = np.inf  # a query never retrieves itself
        same = labels[query, None] == labels[None, :]
        same[np.arange(len(rows)), rows] = False
        positive_distances = np.where(same, distances, np.inf)
        first_positive = np.argmin(positive_distances, axis=1)  # lowest index among ties
        nearest = positive_distances[np.arange(len(rows)), first_positive][:, None]
        rank = np.sum(distances < nearest, axis=1) + np.sum(
            (distances == nearest) & (index[None, :] < first_positive[:, None]), axis=1)
        ranks[query] = np.where(same.any(axis=1), rank, num_items)
    return {k: float(100.0 * np.mean(ranks < k)) for k in ks}


def nmi_from_assignments(labels, clusters) -> float:
    """NMI = I(Omega, C) / sqrt(H(Omega) H(C)) of two labelings (appendix C.2).

    The geometric mean of the entropies, as in the paper; scikit-learn's default is the
    arithmetic mean. In [0, 1]; invariant to renaming the clusters.
    """
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    if labels.ndim != 1 or labels.shape != clusters.shape or labels.size == 0:
        raise ValueError(f"`labels` and `clusters` must be non-empty with the same shape [N]. "
                         f"Received: labels.shape={labels.shape}, clusters.shape={clusters.shape}")
    return float(normalized_mutual_info_score(labels, clusters, average_method="geometric"))


def nmi(embeddings, labels, num_clusters: int | None = None, seed: int = 0) -> float:
    """NMI of a K-means clustering of `embeddings` against `labels` (appendix C.2).

    K-means (scikit-learn, `KMEANS_N_INIT` restarts, `random_state=seed`) with `num_clusters`
    clusters, by default the number of distinct labels; then `nmi_from_assignments`.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError("`embeddings` must have shape [N, D] and `labels` shape [N]. "
                         f"Received: embeddings.shape={embeddings.shape}, "
                         f"labels.shape={labels.shape}")
    if num_clusters is None:
        num_clusters = len(np.unique(labels))
    if not 1 <= num_clusters <= embeddings.shape[0]:
        raise ValueError(f"`num_clusters` must be in [1, {embeddings.shape[0]}]. "
                         f"Received: num_clusters={num_clusters}")
    clusters = KMeans(n_clusters=num_clusters, n_init=KMEANS_N_INIT,
                      random_state=seed).fit_predict(embeddings)
    return nmi_from_assignments(labels, clusters)
