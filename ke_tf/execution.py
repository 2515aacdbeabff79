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
  master weights, the CPU's only where it helps (`decide_precision`: AMX bfloat16 units in the
  CPU flags, or a 1-second probe; elsewhere float32 with a warning unless
  --mixed_precision=force).

These never change the numbers a run should reach, so a run may be resumed with other values
(`config.NOT_TRAINING`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple

import keras
import tensorflow as tf

from ke_tf.config import ConfigError, RunConfig
from ke_tf.cpu import BF16_FLAGS, CpuInfo, as_onednn_sees_it, this_cpu


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
        what = f"the {replicas} replicas"
        if share != replicas:
            what = (f"2 x {what} with --regularizer=cskd (each replica's share: its anchors, "
                    "then their partners)")
        raise ConfigError(f"--batch_size must divide by {what} of --strategy=multi_worker "
                          f"({workers} workers x {replicas // max(workers, 1)} device each): the "
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


# --mixed_precision without bfloat16 units in the CPU flags trains in bfloat16 only if the probe's
# bfloat16 step takes at most this share of the float32 step's CPU time (the whole training step
# gains less than the convolution alone: casts, BatchNorm and the float32 update stay).
PROBE_MAX_RATIO = 0.8


class PrecisionWarning(UserWarning):
    """--mixed_precision was asked for where it would slow training down: float32 instead."""


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (the only ones with fast bfloat16; off
    with TF_ENABLE_ONEDNN_OPTS=0, and by default on CPUs without AVX-512, where ke_tf's command
    line turns them on: `ke_tf.cpu.onednn_default`)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") not in ("0", "false", "False")


@functools.lru_cache(maxsize=None)
def bf16_probe(seconds: float = 1.0) -> float:
    """CPU seconds of a bfloat16 convolution training step (forward, input and filter
    gradients; 16x16x16x64 -> 64, 3x3) over those of the same step in float32, the two
    alternating for about `seconds` after tracing (process CPU time: a busy machine does not
    change it). Below 1: bfloat16 is faster on this CPU; infinity: TensorFlow cannot run the
    bfloat16 step here (a build without bfloat16 convolution kernels; with oneDNN on a CPU
    without AVX-512 TensorFlow falls back to its Eigen kernels, which run it, 18-25x slower on
    an AMD EPYC with AVX2). Cached: once a process."""
    x = tf.random.stateless_uniform((16, 16, 16, 64), (1, 2))
    w = tf.random.stateless_uniform((3, 3, 64, 64), (3, 4))

    def step_of(dtype):
        @tf.function(autograph=False)
        def step():
            xx, ww = tf.cast(x, dtype), tf.cast(w, dtype)
            with tf.GradientTape() as tape:
                tape.watch([xx, ww])
                loss = tf.reduce_sum(tf.cast(tf.nn.conv2d(xx, ww, 1, "SAME"), tf.float32))
            return tape.gradient(loss, [xx, ww])
        return step

    steps = {tf.float32: step_of(tf.float32), tf.bfloat16: step_of(tf.bfloat16)}
    try:
        for step in steps.values():
            step()[0].numpy()  # trace and warm up
    except (tf.errors.OpError, NotImplementedError):
        return math.inf
    times = {dtype: [] for dtype in steps}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[tf.float32]) < 2:
        for dtype, step in steps.items():
            start = time.process_time()
            step()[0].numpy()
            times[dtype].append(time.process_time() - start)
    return statistics.median(times[tf.bfloat16]) / max(statistics.median(times[tf.float32]),
                                                       1e-9)


def decide_precision(mode: str, gpu: bool, cpu: CpuInfo, onednn: bool,
                     probe: Callable[[], float]) -> Tuple[str, Optional[str]]:
    """Pure (given `probe`): (the Keras dtype policy, a warning or None) of --mixed_precision=
    `mode` ("off", "auto", "force"). GPU: mixed_float16. CPU: mixed_bfloat16 where it helps:
    with bfloat16 matrix units (`CpuInfo.bf16_units`: AMX) and oneDNN, without asking the probe;
    an x86 CPU without any bfloat16 arithmetic trains in float32 (the probe measures by how much
    bfloat16 would have been slower, for the warning) unless mode is "force"; any other CPU
    (AVX512_BF16 alone, unknown flags) or oneDNN off is decided by the probe (bfloat16/float32
    CPU time at most PROBE_MAX_RATIO)."""
    if mode == "off":
        return "float32", None
    if gpu:
        return "mixed_float16", None
    if mode == "force":
        return "mixed_bfloat16", None
    units = cpu.bf16_units
    if units and onednn:
        return "mixed_bfloat16", None
    ratio = probe()
    if units is not False and ratio <= PROBE_MAX_RATIO:
        return "mixed_bfloat16", None
    if units is False:
        why = (f"this CPU, {cpu.describe()}, has no bfloat16 units "
               f"({' or '.join(BF16_FLAGS)} in its flags)")
    elif units:
        why = (f"TensorFlow's oneDNN kernels are off on this CPU, {cpu.describe()} "
               "(TF_ENABLE_ONEDNN_OPTS=0?), and its other bfloat16 kernels are slow")
    elif "avx512_bf16" in cpu.flags:
        why = (f"this CPU, {cpu.describe()}, has AVX512_BF16 but no AMX bfloat16 matrix units, "
               "and bfloat16 does not pay on it")
    else:
        why = f"bfloat16 does not pay on this CPU, {cpu.describe()}"
    measured = ("TensorFlow could not run a bfloat16 convolution training step here"
                if math.isinf(ratio) else "a 1-second probe measured a bfloat16 convolution "
                f"training step at {ratio:.2f}x the CPU time of float32")
    return "float32", (
        f"--mixed_precision: {why}: {measured}, so this run trains in float32. "
        "--mixed_precision=force trains in bfloat16 anyway.")


_warned: set = set()


def precision_policy(config: RunConfig) -> str:
    """The Keras dtype policy of --mixed_precision (`decide_precision` on this machine): float16
    on a GPU, bfloat16 on a CPU where it helps; a CPU where it would slow training down gets
    float32 and a PrecisionWarning, once a process."""
    mode = config.mixed_precision
    if mode == "off":
        return "float32"
    gpu = bool(tf.config.list_logical_devices("GPU"))
    cpu = as_onednn_sees_it(this_cpu(), os.environ)
    policy, warning = decide_precision(mode, gpu, cpu, onednn_enabled(), bf16_probe)
    if warning and warning not in _warned:
        _warned.add(warning)
        warnings.warn(warning, PrecisionWarning, stacklevel=2)
    return policy
