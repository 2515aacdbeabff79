"""`fit` without Keras's trainer, for --strategy=multi_worker (MultiWorkerMirroredStrategy).

Keras 3's `Model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy` before its first
step (keras-team/keras issue 20585: its symbolic build reduces the PerReplica batch, "Attempt to
convert a value (PerReplica:...)"; past that, reducing the scalar logs with axis=0 fails,
tensorflow/tensorflow issue 72388). Everything `fit` calls does work there: `fit` below is a
small epoch loop over the same pieces, public APIs only, used under this strategy alone:

- the data: `strategy.experimental_distribute_dataset` of the global batches, sharded by data
  (every worker reads the same batches and keeps its replicas' share: replica r of R gets the
  r-th of R equal parts of every global batch, what one process would train on);
- the step: the model's own `train_step` (`ke_tf.model.KEModel`: per-replica loss and weight
  decay divided by the replicas, BatchNorm synchronized) run by `strategy.run` in a
  `tf.function`; the optimizer sums the replicas' gradients over every worker;
- the callbacks, called where `fit` calls them: `on_epoch_begin` (the learning-rate schedule),
  `on_train_batch_end` (the crash tests' faults), `on_epoch_end` with the epoch's metrics,
  reduced over every replica of every worker by the strategy (Keras's metric variables are
  summed on read), which the runner's epoch end checks, records and checkpoints.

And what a multi-worker run needs besides: `predict` (a network's outputs computed on this
worker alone: every worker evaluates the same networks on the same images, without collectives
or a sharded evaluation order), `barrier` and `SameOnEveryWorker` (a hook: every worker holds
the same generation, epoch, weights, optimizer state and masks when a generation starts,
checked; a clear error otherwise, e.g. for a run directory that is not shared).

A worker that stops (killed, its machine lost) makes the others' next collective fail within
seconds: `fit` turns that into a RunError (exit 1). Running the same command again on every
worker resumes the run from the chief's last checkpoint.
"""
from __future__ import annotations

import functools
import weakref
from typing import Dict, Sequence

import keras
import numpy as np
import tensorflow as tf

from ke_tf.config import RunError
from ke_tf.hooks import Hook

# What a collective raises when another worker of the cluster stopped or cannot be reached.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
               tf.errors.DeadlineExceededError)

_train_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_predict_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_gather_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def replica_pairs(images: tf.Tensor, labels: tf.Tensor, replicas: int):
    """CS-KD's batch (b/2 anchors, then their b/2 partners in the same order) laid out so that
    each of the `replicas` equal parts is anchors then their partners:
    (a1..ah, p1..ph) -> (a1..ak, p1..pk, a(k+1)..a(2k), p(k+1)..p(2k), ...), k = h / replicas."""
    n = tf.shape(labels)[0]
    order = tf.reshape(tf.transpose(tf.reshape(tf.range(n), [2, replicas, -1]), [1, 0, 2]), [-1])
    return tf.gather(images, order), tf.gather(labels, order)


def distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset,
               class_pairs: bool = False):
    """`dataset` (global batches) as the strategy's distributed dataset, sharded by data."""
    replicas = strategy.num_replicas_in_sync
    if class_pairs and replicas > 1:
        dataset = dataset.map(functools.partial(replica_pairs, replicas=replicas))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _train_function(model: keras.Model):
    """One training step over the next distributed batch, traced once per model (a new
    generation's iterator has the same type: no re-tracing)."""
    step = _train_functions.get(model)
    if step is None:
        strategy = model.distribute_strategy

        @tf.function(jit_compile=bool(model.jit_compile))
        def step(iterator):
            strategy.run(model.train_step, args=(next(iterator),))

        _train_functions[model] = step
    return step


def fit(model: keras.Model, dataset: tf.data.Dataset, *, steps_per_epoch: int,
        initial_epoch: int, epochs: int, callbacks: Sequence[keras.callbacks.Callback] = (),
        class_pairs: bool = False) -> Dict[str, float]:
    """`model.fit(dataset, steps_per_epoch=, initial_epoch=, epochs=, callbacks=)` under the
    model's MultiWorkerMirroredStrategy, `dataset` endless global batches; `class_pairs`: CS-KD
    batches (`replica_pairs`). Returns the last epoch's logs. RunError (exit 1) if another
    worker stopped."""
    strategy = model.distribute_strategy
    iterator = iter(distribute(strategy, dataset, class_pairs))
    if not model.optimizer.built:  # before the step: variables are created in this scope
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
    step = _train_function(model)
    callback_list = keras.callbacks.CallbackList(list(callbacks), model=model)
    model.stop_training = False
    logs: Dict[str, float] = {}
    try:
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            for batch in range(steps_per_epoch):
                callback_list.on_train_batch_begin(batch)
                step(iterator)
                callback_list.on_train_batch_end(batch)
            # summed over every replica of every worker when read here (SyncOnRead variables)
            logs = {k: float(v) for k, v in model.get_metrics_result().items()}
            callback_list.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        callback_list.on_train_end(logs)
    except PEER_ERRORS as err:
        raise peer_error(err) from err
    return logs


def peer_error(err: Exception) -> RunError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return RunError(f"--strategy=multi_worker: another worker of the cluster stopped or cannot "
                    f"be reached ({type(err).__name__}: {first[:200]}). Run the same command "
                    "again on every worker: the run resumes from the chief's last checkpoint "
                    "(--run_dir/checkpoints/last)")


def predict(network: keras.Model, dataset: tf.data.Dataset) -> np.ndarray:
    """`network.predict(dataset)` on this worker alone (no collective, the dataset's own order):
    the outputs of every batch of (images, labels), concatenated."""
    forward = _predict_functions.get(network)
    if forward is None:
        forward = tf.function(lambda x: network(x, training=False), reduce_retracing=True)
        _predict_functions[network] = forward
    return np.concatenate([np.asarray(forward(x)) for x, _ in dataset])


def gather(strategy: tf.distribute.Strategy, values: Sequence[float]) -> np.ndarray:
    """[replicas, len(values)]: `values` of every replica of every worker, on every worker. A
    collective: every worker calls it at the same point of the run."""
    run = _gather_functions.get(strategy)
    if run is None:
        @tf.function
        def run(local):
            return strategy.run(
                lambda v: tf.distribute.get_replica_context().all_gather(tf.identity(v), axis=0),
                args=(local,))

        _gather_functions[strategy] = run
    try:
        out = run(tf.constant([list(values)], tf.float64))
        return strategy.experimental_local_results(out)[0].numpy()
    except PEER_ERRORS as err:
        raise peer_error(err) from err


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Under MultiWorkerMirroredStrategy, wait until every worker got here (else nothing)."""
    if is_multi_worker(strategy):
        gather(strategy, [0.0])


def fingerprint(run, state) -> list:
    """Where the run stands and sums of its arrays: equal on every worker of a sound run."""

    def total(arrays) -> list:
        arrays = [np.asarray(a, np.float64) for a in arrays]
        return [float(sum(a.sum() for a in arrays)), float(sum(np.abs(a).sum() for a in arrays))]

    return ([state.generation, state.epoch, len(state.rows)]
            + total(v.numpy() for v in run.network.variables)
            + total(v.numpy() for v in run.model.optimizer.variables)
            + total(run.masks.values()) + total(run.model.held_values()))


class SameOnEveryWorker(Hook):
    """Under --strategy=multi_worker: when a generation starts (fresh, resumed, or after the
    method's rule between generations), RunError unless every worker holds the same run
    (`fingerprint`); when the run ends, a barrier, so that no worker leaves before the chief
    has exported. First of a multi-worker run's hooks, on every worker."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy

    def generation_start(self, run, state) -> None:
        found = gather(self.strategy, fingerprint(run, state))
        if not (found == found[0]).all():
            where = ("generation, epoch" if (found[:, :3] != found[0, :3]).any()
                     else "weights, optimizer state or masks")
            raise RunError(
                f"--strategy=multi_worker: generation {state.generation}: the workers do not "
                f"hold the same run (their {where} differ). When a run resumes, every worker "
                "reads the chief's checkpoint: --run_dir must be one directory that every "
                "worker reads (a shared file system), and every worker must run the same "
                "command, the same ke_tf and TensorFlow")

    def run_end(self, run, state) -> None:
        barrier(self.strategy)
