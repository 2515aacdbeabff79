"""Standalone reproducer of TensorFlow 2.21's oneDNN heap corruption (docs/performance.md, the oneDNN crash).

The backward-weights kernel of a strided 1x1 convolution (oneDNN `jit_1x1:avx512_core`,
`backward_weights`) with fewer than 16 input channels corrupts the heap at odd batch sizes when
TensorFlow runs 2 or more intra-op threads on a CPU with AVX-512: the process dies in a later
malloc/free (SIGSEGV, or SIGABRT with "double free or corruption", "corrupted size vs.
prev_size", "malloc(): ..."). Not on CPUs without AVX-512 (TensorFlow leaves oneDNN off there, and
with TF_ENABLE_ONEDNN_OPTS=1 its AVX2 kernel is fine), not with ONEDNN_MAX_CPU_ISA=AVX2,
TF_ENABLE_ONEDNN_OPTS=0, one intra-op thread, an even batch, 16+ input channels or stride 1.

    python tools/onednn_crash_repro.py                    # 10 processes, raw Conv2DBackpropFilter
    python tools/onednn_crash_repro.py --via=keras        # a plain keras.Model.fit does it too
    python tools/onednn_crash_repro.py --via=ke_tf        # ke_tf's Conv2D (a matmul): no crash
    python tools/onednn_crash_repro.py --batch=24         # an even batch: no crash
    ONEDNN_VERBOSE=1 python tools/onednn_crash_repro.py --runs=1   # the primitive, in the log

Each run is a fresh process (a crash kills it) training `--steps` steps; the last stdout line
is JSON: {"runs", "crashes", "crash_rate", "signals", "cpu", "avx512f", "onednn", ...}. Exit
status 0 whatever the crash rate (it is the measurement), 2 on bad usage. Needs only TensorFlow
(and Keras for --via=keras; ke_tf for --via=ke_tf).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys


def child(args) -> None:
    """Train a strided 1x1 convolution `args.steps` times at the given shape (in this process)."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    rng = np.random.default_rng(0)
    b, s, c, co = args.batch, args.size, args.channels, 2 * args.channels
    x = tf.constant(rng.random((b, s, s, c), dtype=np.float32))
    if args.via == "tf":
        w = tf.constant(rng.random((1, 1, c, co), dtype=np.float32))
        dy = tf.constant(rng.random((b, (s - 1) // args.stride + 1, (s - 1) // args.stride + 1,
                                     co), dtype=np.float32))
        step = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(w), out_backprop=dy,
            strides=[1, args.stride, args.stride, 1], padding="VALID"))
        for _ in range(args.steps):
            step().numpy()
            _ = [np.empty(int(n)) for n in rng.integers(1, 5000, 20)]  # churn the heap
        return
    import keras

    if args.via == "ke_tf":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from ke_tf.networks.layers import Conv2D
    else:
        Conv2D = keras.layers.Conv2D
    inputs = keras.Input((s, s, c))
    y = Conv2D(co, 1, args.stride, use_bias=False)(inputs)
    y = keras.layers.GlobalAveragePooling2D()(y)
    model = keras.Model(inputs, keras.layers.Dense(10)(y))
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = rng.integers(0, 10, b).astype("int32")
    data = tf.data.Dataset.from_tensors((x, labels)).repeat()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="processes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="training steps a process")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--channels", type=int, default=4, help="input channels (output: 2x)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(2, os.cpu_count() or 2),
                        help="TensorFlow intra-op threads (default: the CPUs, at least 2)")
    parser.add_argument("--via", choices=("tf", "keras", "ke_tf"), default="tf",
                        help="tf: the raw Conv2DBackpropFilter op; keras: keras.Model.fit of a "
                             "Conv2D; ke_tf: the same with ke_tf's Conv2D")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("runs", "steps", "batch", "channels", "size", "stride", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1. Received: --{name}={getattr(args, name)}")
    if args.child:
        child(args)
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [
        f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "channels", "size", "stride",
                                              "threads", "via")]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signals, messages = collections.Counter(), collections.Counter()
    for run in range(args.runs):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if out.returncode:
            name = (signal.Signals(-out.returncode).name if out.returncode < 0
                    else f"exit {out.returncode}")
            signals[name] += 1
            lines = [line for line in out.stderr.splitlines()
                     if "free" in line or "corrupt" in line or "malloc" in line]
            messages[lines[-1].strip() if lines else name] += 1
            if os.environ.get("ONEDNN_VERBOSE"):
                prims = [line for line in out.stdout.splitlines() if ",exec," in line]
                print("last oneDNN primitives:\n  " + "\n  ".join(prims[-3:]), file=sys.stderr)
        print(f"run {run + 1}/{args.runs}: "
              + ("ok" if not out.returncode else f"crashed ({name})"), file=sys.stderr)
    crashes = sum(signals.values())
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("model name")), "unknown")
        flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                          if line.startswith("flags")), []))
    except OSError:
        model = "unknown"
    print(json.dumps({
        "runs": args.runs, "crashes": crashes, "crash_rate": crashes / args.runs,
        "signals": dict(signals), "messages": dict(messages), "via": args.via,
        "batch": args.batch, "channels": args.channels, "size": args.size,
        "stride": args.stride, "threads": args.threads, "steps": args.steps, "cpu": model,
        "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "(default)")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
