"""How a run executes, not what it trains: the flags of the execution topic.

- `strategy(config)`: the `tf.distribute` strategy (--strategy): the default one,
  `MirroredStrategy` over every local GPU (or logical CPU device), or
  `MultiWorkerMirroredStrategy` over the machines of the cluster that TF_CONFIG describes
  (`cluster_from_env`; created once a process, before any other TensorFlow op), the global batch
  split among them; `synchronize_batchnorm` makes BatchNorm statistics those of the global
  batch. `is_chief(config)`: whether this process writes the run directory (under
  multi_worker only the chief task does).
- `precision_policy(config)`: the Keras dtype policy the networks are built with
  (--mixed_precision): float32, or mixed_float16 on a GPU / mixed_bfloat16 on a CPU with float32
  master weights.

These never change the numbers a run should reach, so a run may be resumed with other values
(`config.NOT_TRAINING`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Mapping, Optional, Tuple

import keras
import tensorflow as tf

from ke_tf.config import ConfigError, RunConfig


def strategy(config: RunConfig) -> tf.distribute.Strategy:
    """The strategy of --strategy ("none": TensorFlow's default strategy). "multi_worker": the
    process's one MultiWorkerMirroredStrategy (created at the first call, which must come
    before any other TensorFlow op of the process, and waits for every worker of TF_CONFIG);
    ConfigError (exit 2) for a bad TF_CONFIG or a --batch_size that its replicas cannot share
    equally."""
    if config.strategy == "multi_worker":
        found = _multi_worker_strategy()
        check_global_batch(config, found.num_replicas_in_sync, cluster_from_env().num_workers)
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


def is_chief(config: RunConfig) -> bool:
    """Whether this process writes the run directory (results, TensorBoard, checkpoints,
    export): always, except under --strategy=multi_worker, where only the chief task does
    (TensorFlow's convention; `Cluster.is_chief`) and the other workers write nothing."""
    return config.strategy != "multi_worker" or cluster_from_env().is_chief


def check_global_batch(config: RunConfig, replicas: int, workers: int) -> None:
    """ConfigError (exit 2) unless every one of the `replicas` gets an equal share of the global
    batch (of its anchors and of their partners with CS-KD), as one process would compute."""
    share = 2 * replicas if config.train.regularizer == "cskd" else replicas
    batch = config.data.batch_size
    if batch % share:
        how = (f"{replicas} replicas ({workers} workers x {replicas // max(workers, 1)} "
               f"devices)")
        what = (f"2 x the {how}, with --regularizer=cskd (each replica's share: its anchors, "
                "then their partners)" if share != replicas else f"the {how}")
        raise ConfigError(f"--batch_size must divide by {what} of --strategy=multi_worker: the "
                          f"global batch is split equally among them. Received: "
                          f"batch_size={batch}")


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
                              "ke_tf.execution.strategy(config) before anything else") from err
    return _MULTI_WORKER


def synchronize_batchnorm(config: RunConfig, network: keras.Model) -> None:
    """Under a multi-replica strategy, BatchNorm statistics over the global batch, so that N
    devices compute what one device would."""
    if config.strategy != "none":
        for layer in network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True


def precision_policy(config: RunConfig) -> str:
    """The Keras dtype policy of --mixed_precision: float16 on a GPU, bfloat16 on a CPU."""
    if not config.mixed_precision:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
