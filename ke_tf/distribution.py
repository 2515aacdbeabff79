"""Distribution: how a run spreads over devices and machines (--strategy), in one module.

- `strategy(config)`: the `tf.distribute` strategy of --strategy: TensorFlow's default one,
  `MirroredStrategy` over every local GPU (or logical CPU device), or
  `MultiWorkerMirroredStrategy` over the machines of the cluster that TF_CONFIG describes
  (`cluster_from_env`; created once a process, before any other TensorFlow op), the global batch
  split among them (`ke_tf.rules.check_replicas`); `synchronize_batchnorm` makes BatchNorm
  statistics those of the global batch.
- `is_chief(config)`: whether this process writes the run directory (under multi_worker only
  the chief task does).
- --strategy=multi_worker's own training loop, `fit`, and what a multi-worker run needs besides
  (`predict`, `barrier`, `SameOnEveryWorker`), below.

`fit` without Keras's trainer, for --strategy=multi_worker (MultiWorkerMirroredStrategy).

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

import dataclasses
import functools
import json
import os
import weakref
from typing import Dict, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ke_tf import rules
from ke_tf.config import ConfigError, RunConfig, RunError
from ke_tf.hooks import Hook


def strategy(config: RunConfig) -> tf.distribute.Strategy:
    """The strategy of --strategy ("none": TensorFlow's default strategy). "multi_worker": the
    process's one MultiWorkerMirroredStrategy (created at the first call, which must come
    before any other TensorFlow op of the process, and waits for every worker of TF_CONFIG);
    ConfigError (exit 2) for a bad TF_CONFIG or a --batch_size that its replicas cannot share
    equally."""
    if config.strategy == "multi_worker":
        found = _multi_worker_strategy()
        rules.check_replicas(config, found.num_replicas_in_sync,
                             cluster_from_env().num_workers)
        return found
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# --- --strategy=multi_worker: the cluster of TF_CONFIG ---------------------------------------

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains with
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\' (index 1 on host2)')


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The cluster of TF_CONFIG: `jobs` {"chief"/"worker": ("host:port", ...)} and this
    process's task (`task_type`, `task_index`)."""

    jobs: Dict[str, Tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        return sum(len(addresses) for addresses in self.jobs.values())

    @property
    def is_chief(self) -> bool:
        """TensorFlow's convention: the "chief" task, or worker 0 of a cluster without one."""
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_index == 0


def cluster_from_env(environ: Optional[Mapping[str, str]] = None) -> Cluster:
    """The cluster of the TF_CONFIG environment variable (TensorFlow's cluster spec: {"cluster":
    {"worker": ["host:port", ...], ["chief": ["host:port"]]}, "task": {"type": "worker",
    "index": i}}). Pure Python: ConfigError (exit 2) naming TF_CONFIG when it is missing or
    bad, before any TensorFlow op."""
    text = (os.environ if environ is None else environ).get(TF_CONFIG, "")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"--strategy=multi_worker: {why}. TF_CONFIG is TensorFlow's cluster "
                           f"spec, the same cluster on every machine and this machine's task, "
                           f"e.g. {TF_CONFIG_EXAMPLE}")

    if not text.strip():
        raise bad("the environment variable TF_CONFIG is not set")
    try:
        spec = json.loads(text)
    except ValueError as err:
        raise bad(f"TF_CONFIG is not valid JSON ({err}). Received: TF_CONFIG={text!r}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict) \
            or not spec["cluster"]:
        raise bad(f'TF_CONFIG has no "cluster" object. Received: TF_CONFIG={text!r}')
    other = sorted(set(spec["cluster"]) - set(JOBS))
    if other:
        raise bad(f'TF_CONFIG has the job {other[0]!r}: multi_worker trains on "chief" and '
                  f'"worker" tasks only (no parameter servers or evaluators). '
                  f"Received: TF_CONFIG={text!r}")
    jobs: Dict[str, Tuple[str, ...]] = {}
    for job in JOBS:
        if job not in spec["cluster"]:
            continue
        addresses = spec["cluster"][job]
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and _is_address(a) for a in addresses):
            raise bad(f'TF_CONFIG cluster.{job} must be a list of "host:port" addresses. '
                      f"Received: {addresses!r}")
        jobs[job] = tuple(addresses)
    if len(jobs.get("chief", ())) > 1:
        raise bad(f"TF_CONFIG cluster.chief holds {len(jobs['chief'])} addresses, not one")
    everyone = [a for addresses in jobs.values() for a in addresses]
    if len(set(everyone)) != len(everyone):
        raise bad(f"TF_CONFIG lists an address twice. Received: {everyone!r}")
    task = spec.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise bad(f'TF_CONFIG has no "task" object with "type" and "index" (this machine\'s '
                  f"task). Received: TF_CONFIG={text!r}")
    task_type, index = task["type"], task["index"]
    if task_type not in jobs:
        raise bad(f"TF_CONFIG task.type {task_type!r} is not a job of its cluster "
                  f"({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(jobs[task_type]):
        raise bad(f"TF_CONFIG task.index {index!r} is not one of the {len(jobs[task_type])} "
                  f"{task_type} tasks (0 to {len(jobs[task_type]) - 1})")
    return Cluster(jobs, task_type, index)


def _is_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(host) and bool(sep) and port.isdigit() and 0 < int(port) < 65536


def start_multi_worker(config: RunConfig, verbose: bool = True) -> tf.distribute.Strategy:
    """--strategy=multi_worker from the command line: TF_CONFIG checked (exit 2 naming it), then
    the process's MultiWorkerMirroredStrategy created, before any other TensorFlow op (it
    configures the collective ops; the flags' checks run none). It waits for every worker of
    the cluster, and --batch_size must divide by its replicas (`ke_tf.rules.check_replicas`)."""
    cluster = cluster_from_env()
    if verbose:
        role = "the chief: it writes --run_dir" if cluster.is_chief else "writes nothing"
        print(f"--strategy=multi_worker: task {cluster.task_type}:{cluster.task_index} of "
              f"{cluster.num_workers} ({role}); waiting for every worker", flush=True)
    return strategy(config)


def is_chief(config: RunConfig) -> bool:
    """Whether this process writes the run directory (results, TensorBoard, checkpoints,
    export): always, except under --strategy=multi_worker, where only the chief task does
    (TensorFlow's convention; `Cluster.is_chief`) and the other workers write nothing."""
    return config.strategy != "multi_worker" or cluster_from_env().is_chief



_MULTI_WORKER: Optional[tf.distribute.Strategy] = None


def _multi_worker_strategy() -> tf.distribute.Strategy:
    """The process's one MultiWorkerMirroredStrategy. It configures TensorFlow's collective ops,
    which only works before the first op of the process ('Collective ops must be configured
    at program startup'); `python -m ke_tf.main` creates it right after checking the flags."""
    global _MULTI_WORKER
    if _MULTI_WORKER is None:
        cluster_from_env()  # a clear error before TensorFlow reads it
        try:
            _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as err:
            if "program startup" not in str(err):
                raise
            raise ConfigError("--strategy=multi_worker: TensorFlow ran operations in this "
                              "process before MultiWorkerMirroredStrategy was created, which "
                              "must come first; from Python, call "
                              "ke_tf.distribution.strategy(config) before anything else") from err
    return _MULTI_WORKER


def synchronize_batchnorm(config: RunConfig, network: keras.Model) -> None:
    """Under a multi-replica strategy, BatchNorm statistics over the global batch, so that N
    devices compute what one device would."""
    if config.strategy != "none":
        for layer in network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True


# --mixed_precision without bfloat16 units in the CPU flags trains in bfloat16 only if the probe's


# --- --strategy=multi_worker: the training loop and what it needs besides ---------------------

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
    (`fingerprint`); when it was evaluated, RunError unless they select and stop alike; when
    the run ends, a barrier, so that no worker leaves before the chief
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

    def generation_end(self, run, state, evaluation) -> None:
        """Every worker evaluated on its own: they must agree on what the run ships and
        whether it stops (`ke_tf.selection`), or they would part ways at the next collective."""
        mine = [state.selected.get(name, 0) for name in ("dense", "slim")] + [bool(state.stopped)]
        found = gather(self.strategy, mine)
        if not (found == found[0]).all():
            raise RunError(f"--strategy=multi_worker: generation {state.generation}: the workers "
                           "evaluated the same weights differently (the generation to ship or "
                           "the early stop differs): every worker must read the same "
                           "validation and test data")

    def run_end(self, run, state) -> None:
        barrier(self.strategy)
