"""KEModel: the network plus the training step that `Model.fit` drives (sec. 4.1).

The step follows the Keras guide ("Customizing what happens in fit()"): `compute_loss`,
`optimizer.apply`, `self.metrics`; the fused SGD update below reads the optimizer's momentum
buffers, the one private Keras attribute here (`ke_tf.internals.sgd_momentums`). One rule of the paper lives here: SGD with
weight decay 1e-4 *as PyTorch applies it* (coupled L2: wd * w is added to the gradient before
momentum, on every trainable variable). Keras's `SGD(weight_decay=...)` is decoupled (it shrinks
the weights after the update) and would give a different trajectory.

The learning-rate schedule (`lr_at_epoch`, `LearningRateSchedule` callback) is per epoch as in
the official code: linear warm-up lr*(e+1)/w for the first w epochs, then cosine decay
0.5*(1 + cos(pi*(e-w)/(E-w)))*lr, restarted every generation (sec. 3.1).

Mixed precision: under the Keras policies "mixed_bfloat16" (CPU) and "mixed_float16" (GPU, where
`compile` wraps the optimizer in a `keras.optimizers.LossScaleOptimizer`) the step scales the
loss with the public `optimizer.scale_loss` before taking gradients; gradients are those of the
float32 variables, and the weight decay is added in float32, multiplied by the same loss scale
so that the optimizer's unscaling leaves exactly g + wd * w. `restart_optimizer` and
`LearningRateSchedule` act on the inner optimizer and keep the loss-scale state.

Speed: for a plain `keras.optimizers.SGD` with momentum (no clipping, EMA, decoupled decay, loss
scale, gradient accumulation or distribution strategy), the update with the coupled decay,
m = mu*m - lr*(g + wd*w); w += m, runs as two fused TensorFlow kernels per variable on the
optimizer's own momentum variables (`_apply_fused_sgd`) instead of seven element-wise ops; any
other optimizer goes through `optimizer.apply`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ke_tf import internals, losses, tasks
from ke_tf.config import RunConfig


def lr_at_epoch(epoch: int, base_lr: float, epochs: int, warmup_epochs: int) -> float:
    """Learning rate of 0-based `epoch` in a generation of `epochs` epochs (official cosine_lr)."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    e, es = epoch - warmup_epochs, epochs - warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * e / es)) * base_lr


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer doing the updates: the wrapped one of a LossScaleOptimizer, else itself."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


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
        optimizer = inner_optimizer(self.model.optimizer)
        lr = lr_at_epoch(epoch, self.base_lr, self.epochs, self.warmup_epochs)
        old = float(optimizer.learning_rate.numpy())
        if old > 0 and lr != old:
            for velocity in internals.sgd_momentums(optimizer):
                velocity.assign(velocity * (lr / old))
        optimizer.learning_rate.assign(lr)


def restart(model: "KEModel") -> None:
    """What every generation starts with (sec. 3.1): the optimizer's state zeroed
    (`restart_optimizer`) and a loss with a state restarted with it (AdaCos's scale); the
    learning-rate schedule restarts with the generation's first epoch (`LearningRateSchedule`)."""
    restart_optimizer(model.optimizer)
    if hasattr(model.loss, "restart"):
        model.loss.restart()


def compile_ke_model(network: keras.Model, config: RunConfig, num_classes: int, *,
                     held_at_zero: Sequence[str] = (), teacher=None) -> "KEModel":
    """The KEModel of `network`, compiled as a run of `config` trains it: SGD with momentum
    (named "sgd": a checkpoint keys its variables by path) at --lr with --weight_decay coupled,
    CS-KD with --regularizer=cskd, the task's loss and metrics, --jit_compile. The one place a
    KE training model is made: the GenerationRunner and the tools use it. `held_at_zero`,
    `teacher`: the method's (`KEModel`)."""
    t, task = config.train, tasks.TASKS[config.data.task]
    model = KEModel(network, weight_decay=t.weight_decay,
                    cskd=(t.cskd_temperature, t.cskd_lambda) if t.regularizer == "cskd" else None,
                    held_at_zero=held_at_zero, teacher=teacher)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=t.lr, momentum=t.momentum,
                                                 name="sgd"),
                  loss=task.make_loss(config, num_classes),
                  metrics=task.make_metrics(num_classes), jit_compile=config.jit_compile)
    return model


def restart_optimizer(optimizer: keras.optimizers.Optimizer) -> None:
    """Zero the optimizer's state (momentum buffers, iteration count) in place.

    Every generation starts with a fresh optimizer (sec. 3.1); resetting the variables of the
    same optimizer instead of building a new one keeps the compiled train function valid, so
    generation g > 1 starts without re-tracing. A LossScaleOptimizer keeps its loss scale (and
    its growth counter): only the wrapped optimizer restarts."""
    for v in inner_optimizer(optimizer).variables:
        v.assign(tf.zeros(v.shape, v.dtype))


class _Untracked:
    """Holds a value out of Keras's attribute tracking (a teacher network is not a layer of
    the model it teaches)."""

    def __init__(self, value):
        self.value = value


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
      teacher: (teacher network, temperature T, weight) of Born-Again Networks: the loss gains
        weight * T^2 * KL(softmax(t/T) || softmax(s/T)) (`losses.class_wise_kd`, batch mean)
        with t the teacher's logits of the same images (a forward pass in inference mode, no
        gradient) and s the trained network's. `weight` is a scalar float32 tf.Variable read
        by the compiled step, so setting it needs no re-tracing; while it is 0 the teacher is
        not even run. The teacher is not tracked as a part of this model (its variables are
        neither trained nor in `variables`). None (the default): no teacher.
    """

    def __init__(self, network: keras.Model, weight_decay: float = 1e-4,
                 cskd: Optional[Tuple[float, float]] = None,
                 held_at_zero: Sequence[str] = (),
                 teacher: Optional[Tuple[keras.Model, float, tf.Variable]] = None, **kwargs):
        super().__init__(name=kwargs.pop("name", "ke_model"), **kwargs)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0. Received: weight_decay={weight_decay!r}")
        self.network = network
        self.weight_decay = weight_decay
        self.cskd = cskd
        self._teacher = _Untracked(teacher) if teacher is not None else None
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

    def held(self) -> Dict[str, np.ndarray]:
        """{variable path: bool array}, False where the variable is held at zero now."""
        return {var.path: multiplier.numpy() != 0 for var, multiplier in self._multipliers}

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
        # Under a tf.distribute strategy with R replicas the optimizer sums the replicas'
        # gradients: each replica's loss (its batch mean: ke_tf's losses reduce to a scalar,
        # which Keras leaves unscaled) and weight decay are divided by R.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            if self.cskd:
                temperature, weight = self.cskd
                with tape.stop_recording():
                    partner_logits = self(partners, training=True)
                loss += weight * losses.class_wise_kd(y_pred, partner_logits, temperature)
            if self._teacher is not None:
                loss += self._distillation(x, y_pred)
            # loss * scale under mixed_float16
            scaled_loss = self.optimizer.scale_loss(loss / replicas if replicas > 1 else loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        if self._fused_sgd():
            self._apply_fused_sgd(grads, variables)
        else:
            if self.weight_decay:
                # Coupled L2 in the (float32) gradients' dtype, scaled like the loss (and
                # divided by the replicas, like it): the optimizer unscales the sum to g + wd*w.
                decay = self.optimizer.scale_loss(
                    tf.constant(self.weight_decay / replicas, "float32"))
                grads = [g + tf.cast(decay, g.dtype) * tf.cast(v, g.dtype)
                         for g, v in zip(grads, variables)]
            self.optimizer.apply(grads, variables)
        for var, multiplier in self._multipliers:
            var.assign(var * multiplier)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:  # float32 outputs for the metrics also under mixed precision
                metric.update_state(y, tf.cast(y_pred, "float32"))
        return {m.name: m.result() for m in self.metrics}

    def _distillation(self, x, y_pred) -> tf.Tensor:
        """weight * T^2 * KL(softmax(teacher(x)/T) || softmax(y_pred/T)), or exactly 0 without
        running the teacher while the weight is 0 (Born-Again Networks' first generation)."""
        teacher, temperature, weight = self._teacher.value

        def term():
            logits = tf.stop_gradient(teacher(x, training=False))
            return tf.cast(weight, tf.float32) * losses.class_wise_kd(y_pred, logits, temperature)

        return tf.cond(tf.not_equal(weight, 0), term, lambda: tf.constant(0.0, tf.float32))

    def _fused_sgd(self) -> bool:
        """Whether the update can run as fused kernels (`_apply_fused_sgd`): a plain, built
        Keras SGD with momentum, TensorFlow, no distribution strategy."""
        opt = self.optimizer
        return (type(opt) is keras.optimizers.SGD
                and keras.backend.backend() == "tensorflow" and opt.built
                and opt.momentum != 0 and not opt.nesterov
                and not tf.distribute.has_strategy()
                and opt.clipnorm is None and opt.clipvalue is None and opt.global_clipnorm is None
                and not opt.use_ema and opt.weight_decay is None and opt.loss_scale_factor is None
                and not opt.gradient_accumulation_steps
                and all(v.constraint is None and v.dtype == "float32"
                        for v in self.trainable_variables))

    def _apply_fused_sgd(self, grads, variables) -> None:
        """Keras's SGD update with the coupled decay, m = mu*m - lr*(g + wd*w); w += m, as two
        fused kernels per variable: m -= (lr*wd/mu) * w (ResourceApplyGradientDescent on the
        momentum), then m = mu*m - lr*g; w += m (ResourceApplyKerasMomentum)."""
        opt = self.optimizer
        lr = tf.cast(opt.learning_rate, "float32")
        momentum = tf.constant(opt.momentum, "float32")
        decay = lr * (self.weight_decay / opt.momentum)
        # The optimizer was built from this same list (its first `apply`, before the fused
        # path can be taken), so its momentum buffers come in the variables' order.
        momentums = internals.sgd_momentums(opt)
        if len(momentums) != len(variables):
            raise ValueError(f"the optimizer holds {len(momentums)} momentum buffers for "
                             f"{len(variables)} variables. Received: variables={variables!r}")
        for grad, var, accum in zip(grads, variables, momentums):
            if grad is None:
                continue
            if self.weight_decay:
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=accum.value.handle, alpha=decay, delta=var.value.read_value(),
                    use_locking=False)
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=var.value.handle, accum=accum.value.handle, lr=lr,
                grad=tf.cast(grad, "float32"), momentum=momentum, use_locking=False,
                use_nesterov=False)
        opt.iterations.assign_add(1)
