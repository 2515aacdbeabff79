"""Losses of the two evaluation tasks of Knowledge Evolution (sec. 3.4).

Classification uses cross entropy (Eq. 2) on integer labels, optionally with label smoothing
(the paper's "Smth" regularizer, alpha = 0.1): targets (1 - alpha) * one_hot + alpha / C, as
PyTorch's and Keras's label smoothing.

Metric learning uses the triplet loss with semi-hard negative mining (Eq. 3-4), written here
from the algorithm of FaceNet (Schroff, Kalenichenko & Philbin, CVPR 2015) as it was
implemented by tensorflow-addons 0.23 (`tfa.losses.triplet_semihard_loss`), whose outputs it
reproduces; tensorflow-addons itself is archived and does not work with Keras 3.

`--loss=adacos` replaces the classification logits by AdaCos's (Zhang et al., CVPR 2019): the
network's classifier outputs cosines and `AdaCosLoss` scales them by its adaptive scale
(`adacos_scale`, `adacos_logits`) before the cross entropy.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

DISTANCE_METRICS = ("L2", "squared-L2", "angular")


def pairwise_distance(embeddings: tf.Tensor, squared: bool = False) -> tf.Tensor:
    """Pairwise Euclidean distances of the rows of `embeddings` ([B, D] -> [B, B]).

    Computed as tfa did: |x|^2 + |y|^2 - 2 x.y, clipped at 0 against rounding; for the
    non-squared distance, exact zeros get 1e-16 under the square root (and are zeroed again
    after it), so the gradient of sqrt is finite there. The diagonal is set to exactly 0.
    """
    squared_norms = tf.reduce_sum(tf.square(embeddings), axis=1, keepdims=True)
    distances = squared_norms + tf.transpose(squared_norms) - 2.0 * tf.matmul(
        embeddings, embeddings, transpose_b=True)
    distances = tf.maximum(distances, 0.0)
    zero = tf.cast(tf.less_equal(distances, 0.0), distances.dtype)
    if not squared:
        distances = tf.sqrt(distances + zero * 1e-16) * (1.0 - zero)
    return distances * (1.0 - tf.eye(tf.shape(embeddings)[0], dtype=distances.dtype))


def angular_distance(embeddings: tf.Tensor) -> tf.Tensor:
    """1 - cosine similarity of the L2-normalized rows of `embeddings`, clipped at 0 (as tfa)."""
    normalized = tf.math.l2_normalize(embeddings, axis=1)
    return tf.maximum(1.0 - tf.matmul(normalized, normalized, transpose_b=True), 0.0)


def _masked_minimum(data: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Minimum of `data` over its last axis where `mask` (0/1) is 1, as tfa computed it.

    Where the mask is all 0 the result is the maximum of `data` (callers do not use it there).
    """
    maximums = tf.reduce_max(data, axis=-1, keepdims=True)
    return tf.reduce_min((data - maximums) * mask, axis=-1) + maximums[..., 0]


def _masked_maximum(data: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Maximum of `data` over its last axis where `mask` (0/1) is 1, as tfa computed it.

    Where the mask is all 0 the result is the minimum of `data`: tfa's fallback for an anchor
    without negatives, which the golden single-class cases pin down.
    """
    minimums = tf.reduce_min(data, axis=-1, keepdims=True)
    return tf.reduce_max((data - minimums) * mask, axis=-1) + minimums[..., 0]


def _check_distance_metric(distance_metric) -> None:
    if not callable(distance_metric) and distance_metric not in DISTANCE_METRICS:
        raise ValueError(f"`distance_metric` must be one of {DISTANCE_METRICS} or a callable. "
                         f"Received: distance_metric={distance_metric!r}")


def _distance_matrix(embeddings: tf.Tensor, distance_metric) -> tf.Tensor:
    if callable(distance_metric):
        return tf.cast(distance_metric(embeddings), tf.float32)
    if distance_metric == "L2":
        return pairwise_distance(embeddings, squared=False)
    if distance_metric == "squared-L2":
        return pairwise_distance(embeddings, squared=True)
    return angular_distance(embeddings)


def triplet_semihard_loss(y_true, y_pred, margin: float = 1.0, distance_metric="L2") -> tf.Tensor:
    """Triplet loss with semi-hard negative mining (paper sec. 3.4, Eq. 3-4; FaceNet sec. 3.2).

    Every anchor-positive pair (a, p), a != p, of the batch forms one triplet with the negative
    n that is semi-hard (Eq. 4): the closest negative farther than the positive,
    D_an = min {D_an' : D_an' > D_ap}. Where no negative is farther than the positive, n is
    the farthest negative of the anchor instead (tfa's fallback; for an anchor without any
    negative, in a single-class batch, tfa's masked maximum degenerates to the smallest
    distance of the anchor's row, 0 for "L2", and so does this function). The loss is the mean
    over the pairs of Eq. 3, [D_ap - D_an + m]_+. Negatives farther than D_ap + m give 0.

    This reproduces `tfa.losses.triplet_semihard_loss` of tensorflow-addons 0.23 (tests compare
    against its outputs) with two deliberate differences:

    - A batch without any positive pair (all labels distinct) gives 0.0, with zero gradients;
      tfa divided 0 by 0 and returned NaN.
    - The computation is always float32 and so is the result: float16/bfloat16 embeddings
      (mixed precision) are cast in; tfa cast its result back to the embeddings' dtype.

    Args:
      y_true: integer class labels, shape [B] or [B, 1].
      y_pred: embeddings, shape [B, D], any float dtype.
      margin: the margin m of Eq. 3.
      distance_metric: "L2" (Euclidean, the paper's D), "squared-L2", "angular"
        (1 - cosine similarity), or a callable mapping float32 embeddings [B, D] to a [B, B]
        distance matrix.

    Returns:
      The scalar float32 loss.
    """
    _check_distance_metric(distance_metric)
    embeddings = tf.cast(tf.convert_to_tensor(y_pred), tf.float32)
    labels = tf.convert_to_tensor(y_true)
    if labels.shape.rank is not None and (
            labels.shape.rank > 2 or (labels.shape.rank == 2 and labels.shape[1] not in (1, None))):
        raise ValueError("`y_true` must have shape [B] or [B, 1]. "
                         f"Received: y_true.shape={labels.shape}")
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise ValueError("`y_pred` must have shape [B, D]. "
                         f"Received: y_pred.shape={embeddings.shape}")
    labels = tf.reshape(labels, [-1, 1])

    distances = _distance_matrix(embeddings, distance_metric)  # [a, n]
    same = tf.equal(labels, tf.transpose(labels))
    negative = tf.cast(tf.logical_not(same), tf.float32)  # [a, n]
    batch_size = tf.shape(labels)[0]
    positive = tf.cast(same, tf.float32) - tf.eye(batch_size)  # [a, p], a != p

    # semi_hard[a, p, n]: n is a negative of a and D_an > D_ap (semi-hard, Eq. 4, or easy).
    row = distances[:, tf.newaxis, :]  # [a, 1, n]
    farther = tf.cast(tf.greater(row, distances[:, :, tf.newaxis]), tf.float32)
    semi_hard = negative[:, tf.newaxis, :] * farther
    rows = tf.broadcast_to(row, tf.shape(semi_hard))
    negatives_outside = _masked_minimum(rows, semi_hard)  # [a, p]
    negatives_inside = _masked_maximum(distances, negative)[:, tf.newaxis]  # [a, 1]
    has_farther_negative = tf.reduce_any(semi_hard > 0.0, axis=-1)
    negative_distance = tf.where(has_farther_negative, negatives_outside, negatives_inside)

    triplet = tf.maximum(distances - negative_distance + margin, 0.0) * positive
    return tf.math.divide_no_nan(tf.reduce_sum(triplet), tf.reduce_sum(positive))


@keras.saving.register_keras_serializable(package="ke_tf")
class TripletSemiHardLoss(keras.losses.Loss):
    """Keras loss wrapping `triplet_semihard_loss` (Eq. 3-4), like `tfa.losses.TripletSemiHardLoss`.

    The loss of a batch is one scalar, always float32 (the loss computes in float32 whatever
    the dtype policy). With the default reduction, sample weights w scale it by mean(w).
    A callable `distance_metric` must be a registered Keras serializable for `get_config` to
    round-trip.
    """

    def __init__(self, margin: float = 1.0, distance_metric="L2",
                 name: str = "triplet_semihard_loss", reduction="sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction, dtype="float32")
        _check_distance_metric(distance_metric)
        self.margin = margin
        self.distance_metric = distance_metric

    def call(self, y_true, y_pred):
        return triplet_semihard_loss(y_true, y_pred, margin=self.margin,
                                     distance_metric=self.distance_metric)

    def get_config(self):
        metric = self.distance_metric
        if callable(metric):
            metric = keras.saving.serialize_keras_object(metric)
        return {**super().get_config(), "margin": self.margin, "distance_metric": metric}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["distance_metric"], dict):
            config["distance_metric"] = keras.saving.deserialize_keras_object(
                config["distance_metric"])
        return cls(**config)


def sparse_cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Mean cross entropy (Eq. 2) of integer `labels` [B] and `logits` [B, C], in float32."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    if not label_smoothing:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(labels, num_classes) * (1.0 - label_smoothing) + \
        label_smoothing / tf.cast(num_classes, tf.float32)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))


@keras.saving.register_keras_serializable(package="ke_tf")
class SparseCrossEntropy(keras.losses.Loss):
    """`sparse_cross_entropy` as a Keras loss (integer labels, logits, optional smoothing)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "cross_entropy",
                 reduction="sum_over_batch_size"):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: "
                             f"label_smoothing={label_smoothing!r}")
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        return sparse_cross_entropy(y_true, y_pred, self.label_smoothing)

    def get_config(self):
        return {"name": self.name, "label_smoothing": self.label_smoothing}


def class_wise_kd(anchor_logits, partner_logits, temperature: float = 4.0) -> tf.Tensor:
    """CS-KD's class-wise self-distillation term (Yun et al., CVPR 2020), as the official KE code
    computes it: T^2 * KL(softmax(partner/T) || softmax(anchor/T)), summed over classes and
    averaged over anchors. The partners (same class as their anchor) are the constant targets:
    their logits get no gradient."""
    anchor = tf.cast(anchor_logits, tf.float32) / temperature
    target = tf.nn.softmax(tf.stop_gradient(tf.cast(partner_logits, tf.float32)) / temperature)
    kl = tf.math.xlogy(target, target) - target * tf.nn.log_softmax(anchor)
    n = tf.cast(tf.shape(anchor)[0], tf.float32)
    return tf.reduce_sum(kl) * temperature**2 / n



def adacos_initial_scale(num_classes: int) -> float:
    """AdaCos's fixed scale sqrt(2) * ln(C - 1) (Zhang et al., CVPR 2019, sec. 4.1), the initial
    scale of the dynamic rule of `adacos_logits`."""
    if num_classes < 2:
        raise ValueError(f"AdaCos needs at least 2 classes. Received: num_classes={num_classes!r}")
    return math.sqrt(2.0) * math.log(num_classes - 1)


def adacos_scale(cosines, labels, scale) -> tf.Tensor:
    """AdaCos's dynamic scale of a batch (Zhang et al., CVPR 2019, sec. 4.2), computed
    from the OLD `scale` and the batch's cosines, without gradient:

    theta = arccos(clip(cos, -1 + 1e-7, 1 - 1e-7));
    B_avg = (1/N) sum_i sum_{j != y_i} exp(scale * cos_ij);
    theta_med = the median of the target angles theta_{i, y_i} (for an even N the lower of the
    two middle values, as torch.median returns);
    new_scale = ln(B_avg) / cos(min(pi/4, theta_med)).

    Args:
      cosines: [N, C] cosines between the normalised features and class weights (any float
        dtype, computed in float32).
      labels: [N] (or [N, 1]) integer target classes.
      scale: the scalar scale of the previous batch (`adacos_initial_scale(C)` at first).

    Returns:
      new_scale [], float32, a constant (tf.stop_gradient).
    """
    cos = tf.stop_gradient(tf.cast(tf.convert_to_tensor(cosines), tf.float32))
    labels = tf.reshape(tf.cast(tf.convert_to_tensor(labels), tf.int32), [-1])
    scale = tf.cast(tf.convert_to_tensor(scale), tf.float32)
    theta = tf.acos(tf.clip_by_value(cos, -1.0 + 1e-7, 1.0 - 1e-7))
    target = tf.one_hot(labels, tf.shape(cos)[1], dtype=tf.float32)
    n = tf.shape(cos)[0]
    b_avg = tf.reduce_sum(tf.exp(scale * cos) * (1.0 - target)) / tf.cast(n, tf.float32)
    target_theta = tf.sort(tf.gather(theta, labels[:, tf.newaxis], batch_dims=1)[:, 0])
    theta_med = target_theta[(n - 1) // 2]  # the lower middle value, as torch.median
    return tf.stop_gradient(
        tf.math.log(b_avg) / tf.cos(tf.minimum(tf.constant(math.pi / 4, tf.float32), theta_med)))


def adacos_logits(features, class_weights, labels, scale):
    """Training logits of AdaCos (Zhang, Zhao, Liu, Fu & Zhu, "AdaCos: Adaptively Scaling
    Cosine Logits for Effectively Learning Deep Face Representations", CVPR 2019, sec. 4.2).

    In this order:

    1. L2-normalise every feature row ([N, D]) and every class-weight column ([D, C]);
       cos = normalised features @ normalised weights ([N, C]).
    2. Without gradient, the dynamic scale of the batch from the OLD one (`adacos_scale`):
       B_avg over the non-target cosines, theta_med the median target angle,
       new_scale = ln(B_avg) / cos(min(pi/4, theta_med)).
    3. logits = new_scale * cos: the NEW scale, just computed from the old one, scales this
       batch's logits (as 4uiiurz1/pytorch-adacos does); the caller keeps new_scale as the
       `scale` of the next batch.

    Unlike that widely used PyTorch code, this is the paper's rule: no additive angular margin
    on the target logits (it applies ArcFace's m = 0.5 by default) and the median over the
    target angles theta_{i, y_i} only (it takes the median of all N x C angles).

    The gradient flows to `features` and `class_weights` through cos only; new_scale is a
    constant of the batch. At evaluation there are no labels and no scale update: the logits
    are the cosines themselves (their arg max, or the normalised features for retrieval);
    this function is for training only. `AdaCosLoss` is the same rule as a Keras loss on the
    cosines of a `ke_tf.networks.layers.CosineDense` classifier.

    Args:
      features: [N, D] embeddings, any float dtype (computed in float32).
      class_weights: [D, C] class centres, one per column.
      labels: [N] (or [N, 1]) integer target classes.
      scale: the scalar scale of the previous batch (`adacos_initial_scale(C)` at first).

    Returns:
      (logits [N, C], new_scale []), both float32.
    """
    x = tf.math.l2_normalize(tf.cast(tf.convert_to_tensor(features), tf.float32), axis=1)
    w = tf.math.l2_normalize(tf.cast(tf.convert_to_tensor(class_weights), tf.float32), axis=0)
    cos = tf.matmul(x, w)
    new_scale = adacos_scale(cos, labels, scale)
    return new_scale * cos, new_scale


@keras.saving.register_keras_serializable(package="ke_tf")
class AdaCosLoss(keras.losses.Loss):
    """AdaCos (Zhang et al., CVPR 2019) as a Keras loss on cosines ([N, C], the outputs of a
    `ke_tf.networks.layers.CosineDense` classifier): cross entropy (KE's Eq. 2, with label
    smoothing if given) of s * cos, where s is the adaptive scale.

    `scale` is a non-trainable float32 variable, sqrt(2) ln(C - 1) at first (and after
    `restart()`, which the GenerationRunner calls when a generation starts afresh). Every call
    (every training batch) replaces it by `adacos_scale` of the old value and the batch's
    cosines, then scales this batch's cosines by the new value, exactly as `adacos_logits`.
    Under a tf.distribute strategy each replica computes the scale of its own shard and the
    variable takes their mean. The loss is for training: evaluation ranks the cosines.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "adacos",
                 reduction="sum_over_batch_size"):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: "
                             f"label_smoothing={label_smoothing!r}")
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.initial_scale = adacos_initial_scale(num_classes)
        self.scale = keras.Variable(self.initial_scale, dtype="float32", trainable=False,
                                    autocast=False, aggregation="mean", name="adacos_scale")

    @property
    def variables(self) -> list:
        """The loss's state (for checkpoints): [scale]."""
        return [self.scale]

    def restart(self) -> None:
        """The scale back to sqrt(2) ln(C - 1)."""
        self.scale.assign(self.initial_scale)

    def call(self, y_true, y_pred):
        new_scale = adacos_scale(y_pred, y_true, self.scale)
        self.scale.assign(new_scale)
        return sparse_cross_entropy(y_true, new_scale * tf.cast(y_pred, tf.float32),
                                    self.label_smoothing)

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing}
