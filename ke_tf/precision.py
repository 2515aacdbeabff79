"""The numeric precision a run computes in (--mixed_precision), decided for this machine.

`precision_policy(config)`: the Keras dtype policy the networks are built with: float32, or
mixed_float16 on a GPU / mixed_bfloat16 on a CPU with float32 master weights, the CPU's only
where it helps (`decide_precision`: AMX bfloat16 units in the CPU flags (`ke_tf.cpu`), or a
1-second probe, `bf16_probe`; elsewhere float32 with a warning unless --mixed_precision=force).
It never changes the numbers a run should reach, so a run may be resumed with another value
(`config.NOT_TRAINING`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
import warnings
from typing import Callable, Iterator, Optional, Tuple

import keras
import tensorflow as tf

from ke_tf import internals
from ke_tf.config import RunConfig
from ke_tf.cpu import BF16_FLAGS, CpuInfo, as_onednn_sees_it, this_cpu


# bfloat16 step takes at most this share of the float32 step's CPU time (the whole training step
# gains less than the convolution alone: casts, BatchNorm and the float32 update stay).
PROBE_MAX_RATIO = 0.8


class PrecisionWarning(UserWarning):
    """--mixed_precision was asked for where it would slow training down: float32 instead."""


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (the only ones with fast bfloat16; off
    with TF_ENABLE_ONEDNN_OPTS=0, and by default on CPUs without AVX-512, where ke_tf's command
    line turns them on: `ke_tf.cpu.onednn_default`)."""
    return internals.onednn_enabled()


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


@contextlib.contextmanager
def policy(config: RunConfig) -> Iterator[str]:
    """Within: Keras's global dtype policy is `precision_policy(config)` (the layers built here
    keep it); after: the policy it was."""
    before = keras.mixed_precision.global_policy()
    chosen = precision_policy(config)
    keras.mixed_precision.set_global_policy(chosen)
    try:
        yield chosen
    finally:
        keras.mixed_precision.set_global_policy(before)
