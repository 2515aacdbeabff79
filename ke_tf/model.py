"""KEModel: the network plus the training step that `Model.fit` drives (sec. 4.1).

The step follows the Keras guide ("Customizing what happens in fit()") with public APIs only:
`compute_loss`, `optimizer.apply`, `self.metrics`. One rule of the paper lives here: SGD with
weight decay 1e-4 *as PyTorch applies it* (coupled L2: wd * w is added to the gradient before
momentum, on every trainable variable). Keras's `SGD(weight_decay=...)` is decoupled (it shrinks
the weights after the update) and would give a different trajectory.

The learning-rate schedule (`lr_at_epoch`, `LearningRateSchedule` callback) is per epoch as in
the official code: linear warm-up lr*(e+1)/w for the first w epochs, then cosine decay
0.5*(1 + cos(pi*(e-w)/(E-w)))*lr, restarted every generation (sec. 3.1).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ke_tf import losses


def lr_at_epoch(epoch: int, base_lr: float, epochs: int, warmup_epochs: int) -> float:
    """Learning rate of 0-based `epoch` in a generation of `epochs` epochs (official cosine_lr)."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    e, es = epoch - warmup_epochs, epochs - warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * e / es)) * base_lr


class LearningRateSchedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at the start of every epoch (`lr_at_epoch`).

    Keras's SGD keeps the learning rate inside its velocity (v = mu*v - lr*g; w += v) while
    PyTorch's keeps it outside (b = mu*b + g; w -= lr*b): the two agree while lr is constant.
    When lr changes from lr0 to lr1, the velocity is scaled by lr1/lr0, which makes every update
    exactly PyTorch's, as the paper's runs had it."""

    def __init__(self, base_lr: float, epochs: int, warmup_epochs: int):
        super().__init__()
        self.base_lr, self.epochs, self.warmup_epochs = base_lr, epochs, warmup_epochs

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = lr_at_epoch(epoch, self.base_lr, self.epochs, self.warmup_epochs)
        old = float(optimizer.learning_rate.numpy())
        if old > 0 and lr != old:
            for velocity in getattr(optimizer, "momentums", None) or []:
                velocity.assign(velocity * (lr / old))
        optimizer.learning_rate.assign(lr)


def restart_optimizer(optimizer: keras.optimizers.Optimizer) -> None:
    """Zero the optimizer's state (momentum buffers, iteration count) in place.

    Every generation starts with a fresh optimizer (sec. 3.1); resetting the variables of the
    same optimizer instead of building a new one keeps the compiled train function valid, so
    generation g > 1 starts without re-tracing."""
    for v in optimizer.variables:
        v.assign(tf.zeros(v.shape, v.dtype))


class KEModel(keras.Model):
    """Wraps a functional `network`; `fit` trains it with coupled L2 weight decay.

    Args:
      network: the dense functional network N (its variables keep their paths, e.g.
        "conv1/kernel", so masks computed on it apply unchanged).
      weight_decay: PyTorch-style L2 coefficient added to the gradients.
      cskd: (temperature, lambda) of CS-KD (sec. 4.1, T=4, lambda_cls=3): each batch is b/2
        anchors then b/2 partners of the same classes; the task loss is on the anchors and the
        partners' logits (a second forward pass in training mode, as the official code, without
        gradient) add lambda * `losses.class_wise_kd`. None: plain training.
      held_at_zero: paths of variables that `hold_at_zero` may pin to zero after every optimizer
        step (DSD's sparse phases); their 0/1 multipliers are variables of the compiled step,
        so changing them needs no re-tracing. Empty (the default) costs nothing.
    """

    def __init__(self, network: keras.Model, weight_decay: float = 1e-4,
                 cskd: Optional[Tuple[float, float]] = None,
                 held_at_zero: Sequence[str] = (), **kwargs):
        super().__init__(name=kwargs.pop("name", "ke_model"), **kwargs)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0. Received: weight_decay={weight_decay!r}")
        self.network = network
        self.weight_decay = weight_decay
        self.cskd = cskd
        by_path = {v.path: v for v in network.trainable_variables}
        self._multipliers = [(by_path[p], tf.Variable(tf.ones(by_path[p].shape, by_path[p].dtype),
                                                      trainable=False)) for p in held_at_zero]

    def hold_at_zero(self, keep: Optional[Dict[str, np.ndarray]]) -> None:
        """From now on, after every step, zero the entries of each variable where `keep` is
        False (and zero them now); `keep=None` frees every entry again."""
        for var, multiplier in self._multipliers:
            m = np.ones(var.shape, bool) if keep is None else keep[var.path]
            multiplier.assign(m.astype(multiplier.dtype.as_numpy_dtype))
            var.assign(var * multiplier)

    def held_values(self, values: Optional[Sequence[np.ndarray]] = None) -> list:
        """The 0/1 multipliers of `hold_at_zero` (to checkpoint them), or set them back."""
        if values is not None:
            for (_, multiplier), value in zip(self._multipliers, values):
                multiplier.assign(value)
        return [multiplier.numpy() for _, multiplier in self._multipliers]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def train_step(self, data):
        x, y = data
        if self.cskd:  # anchors first, their same-class partners second
            half = tf.shape(x)[0] // 2
            x, y, partners = x[:half], y[:half], x[half:]
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            if self.cskd:
                temperature, weight = self.cskd
                with tape.stop_recording():
                    partner_logits = self(partners, training=True)
                loss += weight * losses.class_wise_kd(y_pred, partner_logits, temperature)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        if self.weight_decay:
            grads = [g + tf.cast(self.weight_decay, g.dtype) * tf.cast(v, g.dtype)
                     for g, v in zip(grads, variables)]
        self.optimizer.apply(grads, variables)
        for var, multiplier in self._multipliers:
            var.assign(var * multiplier)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}
