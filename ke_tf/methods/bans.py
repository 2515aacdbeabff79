"""Born-Again Networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural
Networks", ICML 2018): a sequence of networks of one architecture, each trained from scratch by
the last one.

Generation 1 trains the network normally (its task loss only). After every generation g the
trained network becomes the teacher: a second network of the same architecture, built once
(`keras.models.clone_model`) and frozen, is assigned its weights in memory; the student, the
network trained, is re-initialized completely: every conv/dense kernel and bias from its
layer's own initializer with a seed of (run seed, g) (`reinit`, as KE's Eq. 1 with nothing
kept; --reset_init and --fix_reset_seed apply) and every BatchNorm layer to its initial state
(gamma 1, beta 0, moving mean 0, moving variance 1, as its initializers say). The optimizer and
the lr schedule restart as in every generation. Generation g + 1 then minimizes

    cross entropy (with --regularizer's label smoothing or CS-KD, if any)
      + --bans_lambda * T^2 * KL(softmax(t / T) || softmax(s / T)),   T = --bans_temperature,

t the teacher's logits of the same batch (inference mode, no gradient: `KEModel`'s `teacher`),
s the student's. Nothing passes from one generation to the next but the teacher's predictions.
Rows: the dense network of every generation; there is no split, so no slim network.

`arrays` keeps the teacher's weights and the distillation weight in `checkpoints/last`, so a
resumed run goes on with the very teacher it had.
"""
from __future__ import annotations

from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from ke_tf import masks as masks_lib
from ke_tf.config import ConfigError
from ke_tf.methods.base import Method, Setting, require

TEACHER = "teacher/"  # key prefix of the teacher's weights in the method's checkpoint arrays
WEIGHT = "distillation_weight"


def _is_batchnorm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def reset_batchnorm(network: keras.Model) -> None:
    """Every BatchNorm layer of `network` back to its initial state (its initializers)."""
    for layer in network.layers:
        if not _is_batchnorm(layer):
            continue
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            var = getattr(layer, name, None)
            if var is not None:  # gamma/beta are None with scale/center=False
                init = getattr(layer, f"{name}_initializer")
                var.assign(np.asarray(init(tuple(var.shape), dtype=var.dtype)))


def all_reset(network: keras.Model) -> masks_lib.Masks:
    """Masks that keep nothing: every masked variable (conv/dense kernels and biases) re-drawn."""
    return {var.path: np.zeros(tuple(var.shape), bool)
            for _, roles in masks_lib.masked_layers(network) for var, _ in roles}


class BornAgainNetworks(Method):
    name = "bans"
    settings = {
        "bans_temperature": Setting(1.0, "--method=bans: distillation temperature.",
                                    ok=lambda v: v > 0, rule="must be > 0"),
        "bans_lambda": Setting(1.0, "--method=bans: weight of KL(teacher || student).",
                               ok=lambda v: v >= 0, rule="must be >= 0"),
    }

    def __init__(self, config):
        super().__init__(config)
        self._teacher = None  # (teacher network, weight variable), built by `teacher`

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        require(config.data.task == "classification", "method",
                "bans distills the teacher's class probabilities: it needs "
                "--task=classification", config.method)
        # An AdaCos network outputs cosines in [-1, 1] at inference, not logits: softmax(cos/T)
        # is nearly uniform for any T, and the scale that makes them logits is a training-time
        # statistic of the batch's labels, which the teacher does not have.
        require(config.train.loss == "ce", "loss", "must be ce with --method=bans (the teacher's "
                "outputs would be AdaCos's cosines, not logits to distill)", config.train.loss)
        require(config.split.evolve_mode != "zero", "evolve_mode",
                "zero would start every student from all-zero weights; --method=bans "
                "re-initializes the whole network from its initializers", config.split.evolve_mode)

    def teacher(self, network: keras.Model):
        """The frozen teacher, a clone of `network` (weights assigned after generation 1), the
        temperature and the distillation weight (0 in generation 1)."""
        masked = {id(v) for _, roles in masks_lib.masked_layers(network) for v, _ in roles}
        for layer in network.layers:
            other = [v.path for v in layer.weights if id(v) not in masked]
            if other and not _is_batchnorm(layer):
                raise ConfigError(f"--method=bans re-initializes conv/dense kernels, biases and "
                                  f"BatchNorm; {other[0]} of layer {layer.name} is neither. "
                                  f"Received: arch={self.config.model.arch!r}")
        teacher = keras.models.clone_model(network)
        teacher.trainable = False
        if [v.path for v in teacher.weights] != [v.path for v in network.weights]:
            raise ValueError("the teacher's weights are not named like the network's")
        weight = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="bans_weight")
        self._teacher = (teacher, weight)
        return teacher, self.setting("bans_temperature"), weight

    @property
    def teacher_network(self) -> keras.Model:
        return self._teacher[0]

    @property
    def distillation_weight(self) -> tf.Variable:
        return self._teacher[1]

    def between_generations(self, run, generation: int) -> masks_lib.Masks:
        """The trained network becomes the teacher; the student starts again from scratch."""
        network = run.network
        for t, s in zip(self.teacher_network.weights, network.weights):
            t.assign(s.value)
        self.reinitialize(network, all_reset(network), generation)
        reset_batchnorm(network)
        self.distillation_weight.assign(self.setting("bans_lambda"))
        return run.masks

    def arrays(self, run) -> Dict[str, np.ndarray]:
        out = {TEACHER + v.path: np.asarray(v.numpy()) for v in self.teacher_network.weights}
        out[WEIGHT] = np.asarray(self.distillation_weight.numpy())
        return out

    def restore(self, run, arrays: Dict[str, np.ndarray]) -> None:
        if WEIGHT not in arrays:
            raise ConfigError("the checkpoint holds no Born-Again teacher: was it written by "
                              "another --method?")
        weights = self.teacher_network.weights
        missing = [v.path for v in weights if TEACHER + v.path not in arrays]
        if missing:
            raise ConfigError(f"the checkpoint's teacher does not fit this network (missing "
                              f"{missing[:3]}): was it written by other flags?")
        for v in weights:
            v.assign(arrays[TEACHER + v.path].astype(v.dtype))
        self.distillation_weight.assign(float(arrays[WEIGHT]))
