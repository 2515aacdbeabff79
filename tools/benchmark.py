"""Performance benchmark of ke_tf on this machine's CPU (docs/performance.md).

    python tools/benchmark.py --json [--pairs 5] [--torch_python=../torchvenv/bin/python] [--xla]
    python tools/benchmark.py --quick --json          # tiny sizes, one pair: a smoke test

Machines are shared and noisy, so every comparison is measured as a ratio inside one run:
the two sides alternate (A, B, A, B, ...) and each reported number is the median over `--pairs`
pairs (ratios are medians of the per-pair ratios). Wall-clock ratios collapse when other
processes take the cores, so the training step is also measured in process CPU seconds per
image (all threads; `time.process_time`), which a busy machine changes far less: the
`*_cpu_time` ratios. Both sides run with `--threads` intra-op (and inter-op) threads.

With `--json` the last stdout line is one JSON object holding the keys of `REQUIRED_KEYS`
(always numbers) and of `META_KEYS` (`cpu`: the model name; `cpu_flags`: {flag: present} for
`CPU_FLAGS`; `threads`; `onednn`: TensorFlow's oneDNN kernels on; `load_average`: the 1-minute
load at the start and the end; `bf16_probe`: ke_tf.precision.bf16_probe's bfloat16/float32 CPU
time; `mixed_precision_auto`: the policy the bare --mixed_precision picks here;
`torch_wait_policy` with `--torch_python`), plus `train_cpu_ms_per_image[_bf16]`, the torch
reference (`torch_images_per_s[_bf16]`, `torch_cpu_ms_per_image[_bf16]`, `vs_torch_fp32`,
`vs_torch_bf16`, `bf16_vs_torch_fp32` and their `_cpu_time` twins) when `--torch_python` names a
Python with torch, `train_images_per_s_xla` under `--xla`, and the intermediate numbers
(`plain_images_per_s`, `pipeline_vs_model_digits`, ...) under `--details`. Progress and per-pair
numbers go to stderr.

What is measured:
  train_images_per_s[_bf16]: KEModel (compiled, driven by Model.fit) training ResNet18 (ImageNet
    stem, 120 classes, 64 px, batch 32, SGD momentum 0.9, wd 1e-4) from one in-memory batch;
    `_bf16` under the Keras policy "mixed_bfloat16". `train_cpu_ms_per_image[_bf16]`: process CPU
    milliseconds per image of the same steps. vs_torch_*: KE images/s over torch's
    (tools/torch_resnet18_step.py: the same network, batch and optimizer in PyTorch, float32 or
    autocast bfloat16); vs_torch_*_cpu_time: torch's CPU time per image over KE's (above 1: KE
    needs less CPU per image), both medians of per-pair ratios.
  ke_vs_plain_throughput: that KE step vs plain `keras.Model.fit` of the same network.
  reinit_seconds_resnet50: reinit.reset (KELS s=0.5) + model.restart + schedule restart of a
    ResNet50 (224 px, 1000 classes) with a built optimizer.
  gen2_first_epoch_vs_steady: the digits default (ResNet18 x0.25, 32 px, batch 25, 400 in-memory
    images) trained by the real GenerationRunner, its epochs timed by a hook (checkpoints/last
    written after every epoch included): the first epoch of generation g+1 (after Eq. 1 and
    the restarts) over a steady epoch of generation g. `_pipeline` (--details): the same fed by
    ke_tf.data's digits pipeline.
  slim_vs_dense_latency_b{1,32}: tf.function inference latency of the KELS s=0.5 slim ResNet18
    (224 px, ImageNet stem) over the dense one.
  pipeline_vs_model: min of `pipeline_vs_model_digits` and `pipeline_vs_model_224`: images/s of
    `ke_tf.data` training batches alone over images/s of the model's training step (digits:
    the digits default; 224: tfds-mocked oxford_flowers102 at 224 px, batch 32, ResNet18).
  peak_rss_mb: peak resident memory of a process training ResNet18 at 224 px, batch 32 (the
    same subprocess gives the 224 px model rate).
  two_workers_step_ms, one_process_step_ms, two_workers_vs_one_process (--details): the digits
    default's training step (global batch 20) in two local worker processes of
    --strategy=multi_worker (TF_CONFIG on 127.0.0.1, half the threads each) and in one process
    (tools/multi_worker_step.py), the two alternating. On one machine the workers share its
    cores: this measures what the collectives cost (every gradient and BatchNorm statistic
    all-reduced over loopback gRPC), not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

REQUIRED_KEYS = ("train_images_per_s", "train_images_per_s_bf16", "ke_vs_plain_throughput",
                 "reinit_seconds_resnet50", "gen2_first_epoch_vs_steady",
                 "slim_vs_dense_latency_b1", "slim_vs_dense_latency_b32", "pipeline_vs_model",
                 "peak_rss_mb")
META_KEYS = ("cpu", "cpu_flags", "threads", "onednn", "load_average", "bf16_probe",
             "mixed_precision_auto")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_resnet18_step.py")
EXTRA_KEYS = ("train_cpu_ms_per_image", "train_cpu_ms_per_image_bf16",
              "torch_images_per_s", "torch_images_per_s_bf16", "torch_cpu_ms_per_image",
              "torch_cpu_ms_per_image_bf16", "vs_torch_fp32", "vs_torch_bf16",
              "bf16_vs_torch_fp32", "vs_torch_fp32_cpu_time", "vs_torch_bf16_cpu_time",
              "bf16_vs_torch_fp32_cpu_time", "train_images_per_s_xla")

# Sizes of the full benchmark and of --quick (tiny, one pair: a smoke test of every path).
FULL = dict(train=dict(arch="resnet18", classes=120, size=64, stem="imagenet", width=1.0,
                       batch=32, warmup=3, steps=8),
            reinit=dict(arch="resnet50", classes=1000, size=224, width=1.0),
            gen2=dict(digits_per_class=40, epochs=3),
            slim=dict(classes=102, size=224, width=1.0, b1_calls=20, b32_calls=2),
            pipeline=dict(digits_batches=80, mock_examples=64, mock_batches=12, mock_size=224,
                          digits_model_steps=12),
            rss=dict(size=224, batch=32, width=1.0, steps=3),
            multi_worker=dict(batch=20, size=32, width=0.25, warmup=3, steps=10))
QUICK = dict(train=dict(arch="resnet18", classes=10, size=32, stem="small", width=1 / 8,
                        batch=8, warmup=1, steps=2),
             reinit=dict(arch="resnet18", classes=10, size=32, width=1 / 8),
             gen2=dict(digits_per_class=10, epochs=2),
             slim=dict(classes=10, size=32, width=1 / 8, b1_calls=2, b32_calls=1),
             pipeline=dict(digits_batches=8, mock_examples=8, mock_batches=2, mock_size=32,
                           digits_model_steps=2),
             rss=dict(size=32, batch=8, width=1 / 8, steps=2),
             multi_worker=dict(batch=8, size=16, width=1 / 16, warmup=1, steps=2))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def median(values):
    return float(statistics.median(values))


# ------------------------------------------------------------------------------------------------
# Training throughput: KE step, plain Keras, mixed_bfloat16, XLA, torch.

def _train_batch(size, batch, classes, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.random((batch, size, size, 3), dtype=np.float32),
            rng.integers(0, classes, batch).astype("int32"))


def _ke_config(s, jit_compile=False):
    """The RunConfig of the benchmark's KE training: s's network, SGD lr 0.1 with momentum 0.9
    and coupled weight decay 1e-4, plain cross entropy."""
    from ke_tf import config as C

    return C.RunConfig(data=C.DataConfig(image_size=s["size"]),
                       model=C.ModelConfig(arch=s["arch"], stem=s.get("stem"),
                                           width_multiplier=s["width"]),
                       train=C.TrainConfig(lr=0.1, weight_decay=1e-4), jit_compile=jit_compile)


def _build_trainer(s, kind, policy="float32", jit_compile=False):
    """A compiled model training s["arch"]: kind "ke" (the runner's KEModel,
    `ke_tf.model.compile_ke_model`) or "plain" (the functional network's own Model.fit)."""
    import keras
    from ke_tf import losses, networks
    from ke_tf.model import compile_ke_model

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        net = networks.build(s["arch"], s["classes"], s["size"], stem=s["stem"],
                             width_multiplier=s["width"])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if kind == "ke":
        return compile_ke_model(net, _ke_config(s, jit_compile), s["classes"])
    net.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=losses.SparseCrossEntropy(), jit_compile=jit_compile)
    return net


def _fit_rate(model, dataset, batch, warmup, steps, cpu=False):
    """Images/s of `steps` training steps of Model.fit after `warmup` steps (callback clock);
    with `cpu`, (images/s, process CPU seconds per image) of the same steps."""
    import keras
    stamps = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            stamps.append((time.perf_counter(), time.process_time()))

    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[Clock()])
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup - 1], stamps[-1]
    rate = batch * steps / (wall1 - wall0)
    return (rate, (cpu1 - cpu0) / (batch * steps)) if cpu else rate


def _torch_rate(python, bf16, script=TORCH_SCRIPT, threads=None, wait_policy=None):
    """(images/s, CPU seconds per image or None) of the torch reference in a fresh process.
    The script prints a JSON line (tools/torch_resnet18_step.py) or a bare images/s (an older
    script: no CPU time). `wait_policy`: OMP_WAIT_POLICY of its OpenMP threads (None: the
    environment's)."""
    cmd = [python, script] + (["--bf16"] if bf16 else [])
    if threads:
        cmd.append(f"--threads={threads}")  # (an older script ignores it)
    env = dict(os.environ, **({"OMP_WAIT_POLICY": wait_policy} if wait_policy else {}))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1]
    if last.startswith("{"):
        result = json.loads(last)
        return float(result["images_per_s"]), float(result["cpu_seconds_per_image"])
    return float(last), None


def bench_train(s, pairs, torch_python=None, xla=False, torch_script=TORCH_SCRIPT, threads=None,
                torch_wait_policy=None):
    import tensorflow as tf
    x, y = _train_batch(s["size"], s["batch"], s["classes"])
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    models = {"ke": _build_trainer(s, "ke"), "plain": _build_trainer(s, "plain"),
              "ke_bf16": _build_trainer(s, "ke", policy="mixed_bfloat16")}
    if xla:
        models["ke_xla"] = _build_trainer(s, "ke", jit_compile=True)
    for model in models.values():  # trace and warm up once, outside the timed pairs
        _fit_rate(model, dataset, s["batch"], 1, 1)
    rates = {name: [] for name in models}
    cpu = {name: [] for name in models}  # process CPU seconds per image
    if torch_python:
        rates.update(torch=[], torch_bf16=[])
        cpu.update(torch=[], torch_bf16=[])
    for pair in range(pairs):
        for name, model in models.items():
            rate, seconds = _fit_rate(model, dataset, s["batch"], s["warmup"], s["steps"],
                                      cpu=True)
            rates[name].append(rate)
            cpu[name].append(seconds)
        if torch_python:
            for name, bf16 in (("torch", False), ("torch_bf16", True)):
                rate, seconds = _torch_rate(torch_python, bf16, torch_script, threads,
                                            torch_wait_policy)
                rates[name].append(rate)
                cpu[name].append(seconds)
        log(f"train pair {pair + 1}/{pairs}: " + ", ".join(
            f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " images/s; CPU ms/image " +
            ", ".join(f"{k} {1e3 * v[-1]:.2f}" for k, v in cpu.items() if v[-1] is not None))

    def ratio(a, b):
        return median([p / q for p, q in zip(rates[a], rates[b])])

    def cpu_ratio(a, b):  # b's CPU time per image over a's: above 1, a needs less CPU
        return median([q / p for p, q in zip(cpu[a], cpu[b])])

    out = {"train_images_per_s": median(rates["ke"]),
           "train_images_per_s_bf16": median(rates["ke_bf16"]),
           "train_cpu_ms_per_image": 1e3 * median(cpu["ke"]),
           "train_cpu_ms_per_image_bf16": 1e3 * median(cpu["ke_bf16"]),
           "plain_images_per_s": median(rates["plain"]),
           "ke_vs_plain_throughput": ratio("ke", "plain"),
           "ke_vs_plain_cpu_time": cpu_ratio("ke", "plain")}
    # The best block of each side (--details keys `best_*`): contention only ever slows a
    # side down, so these bound the unshared machine's figures (docs/performance.md quotes medians).
    out.update({f"best_{name}_images_per_s": max(values) for name, values in rates.items()})
    if xla:
        out["train_images_per_s_xla"] = median(rates["ke_xla"])
    if torch_python:
        out.update(torch_images_per_s=median(rates["torch"]),
                   torch_images_per_s_bf16=median(rates["torch_bf16"]),
                   vs_torch_fp32=ratio("ke", "torch"), vs_torch_bf16=ratio("ke_bf16", "torch_bf16"),
                   bf16_vs_torch_fp32=ratio("ke_bf16", "torch"))
        if None not in cpu["torch"] + cpu["torch_bf16"]:
            out.update(torch_cpu_ms_per_image=1e3 * median(cpu["torch"]),
                       torch_cpu_ms_per_image_bf16=1e3 * median(cpu["torch_bf16"]),
                       vs_torch_fp32_cpu_time=cpu_ratio("ke", "torch"),
                       vs_torch_bf16_cpu_time=cpu_ratio("ke_bf16", "torch_bf16"),
                       bf16_vs_torch_fp32_cpu_time=cpu_ratio("ke_bf16", "torch"))
    return out


# ------------------------------------------------------------------------------------------------
# Between generations: re-initialization and the second generation's first epoch.

def bench_reinit(s, pairs):
    import keras
    from ke_tf import internals, masks, networks, reinit
    from ke_tf.model import LearningRateSchedule, compile_ke_model, restart

    net = networks.build(s["arch"], s["classes"], s["size"], stem="imagenet",
                         width_multiplier=s["width"])
    m = masks.compute(net, "kels", 0.5, seed=0)
    model = compile_ke_model(net, _ke_config(dict(s, stem="imagenet")), s["classes"])
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    schedule = LearningRateSchedule(0.1, epochs=10, warmup_epochs=2)
    schedule.set_model(model)
    seconds = []
    for g in range(1, pairs + 1):
        for v in internals.sgd_momentums(optimizer):  # used, at the end of generation g
            v.assign(keras.ops.ones(v.shape, v.dtype))
        optimizer.learning_rate.assign(0.001)
        start = time.perf_counter()
        reinit.reset(net, m, seed=(0, g))  # KE's rule between generations (Eq. 1)
        restart(model)  # what the runner does when a generation starts
        schedule.on_epoch_begin(0)
        seconds.append(time.perf_counter() - start)
    log(f"reinit {s['arch']}: " + ", ".join(f"{t:.3f}" for t in seconds) + " s")
    return {"reinit_seconds_resnet50": median(seconds)}


def bench_gen2(s, pairs, source="memory"):
    """Generations of the digits default (`presets.digits`: ResNet18 x0.25, 32 px, batch 25,
    KELS s=0.8), `epochs` epochs each, trained by the real `GenerationRunner` (pairs + 1
    generations, a temporary run directory, no export): the median over generations g >= 2 of
    g's first epoch over the median of generation g-1's steady epochs (all but its first).

    A hook times the epochs: from one `epoch_end` to the next, a generation's first epoch from
    its `generation_start` (after the optimizer restart; it holds `fit`'s start and the data's
    `train_from`, not Eq. 1's re-initialization before it, which `bench_reinit` times). An
    epoch is a real run's: the runner's own hooks included (TensorBoard scalars and
    `checkpoints/last` written after every epoch). `source`: "memory" (the digits data with
    `train_from` giving in-memory images, a new tf.data pipeline every generation: the
    model's own restart cost) or "pipeline" (the `ke_tf.data` digits pipeline, as a run)."""
    import dataclasses
    import shutil
    import tempfile

    import tensorflow as tf
    from ke_tf import data, presets
    from ke_tf.generations import GenerationRunner
    from ke_tf.hooks import Hook

    class EpochClock(Hook):
        def __init__(self):
            self.seconds = []  # per generation, its epochs' seconds

        def generation_start(self, run, state):
            self.seconds.append([])
            self.last = time.perf_counter()

        def epoch_end(self, run, state):
            now = time.perf_counter()
            self.seconds[-1].append(now - self.last)
            self.last = now

    clock = EpochClock()
    run_dir = tempfile.mkdtemp(prefix="ke_bench_gen2_")
    try:
        config = presets.digits(generations=pairs + 1, epochs=s["epochs"], run_dir=run_dir,
                                export=False, digits_per_class=s["digits_per_class"])
        d = None  # "pipeline": the runner loads the digits pipeline itself
        if source == "memory":
            d = data.load(config.data)
            x, y = _train_batch(config.data.image_size, d.info.num_train, d.info.num_classes,
                                seed=1)

            def in_memory(first_epoch):
                return tf.data.Dataset.from_tensor_slices((x, y)).batch(
                    config.data.batch_size).repeat()

            d = dataclasses.replace(d, train_from=in_memory)
        GenerationRunner(config, data=d, verbose=False, hooks=[clock]).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    for g, seconds in enumerate(clock.seconds, 1):
        log(f"generation {g} epochs ({source}): " + ", ".join(f"{t:.3f}" for t in seconds) + " s")
    ratios = [seconds[0] / median(previous[1:])
              for previous, seconds in zip(clock.seconds, clock.seconds[1:])]
    key = "gen2_first_epoch_vs_steady" + ("_pipeline" if source == "pipeline" else "")
    return {key: median(ratios)}


# ------------------------------------------------------------------------------------------------
# Inference: slim vs dense.

def bench_slim(s, pairs):
    import numpy as np
    import tensorflow as tf
    from ke_tf import masks, networks, slim

    dense = networks.build("resnet18", s["classes"], s["size"], stem="imagenet",
                           width_multiplier=s["width"])
    m = masks.compute(dense, "kels", 0.5, seed=0)
    small = slim.architecture(dense, m)
    slim.copy_fit_weights(dense, m, small)
    fns = {name: tf.function(lambda x, net=net: net(x, training=False), autograph=False)
           for name, net in (("dense", dense), ("slim", small))}
    rng = np.random.default_rng(0)
    inputs = {b: tf.constant(rng.random((b, s["size"], s["size"], 3), dtype=np.float32))
              for b in (1, 32)}
    calls = {1: s["b1_calls"], 32: s["b32_calls"]}
    for fn in fns.values():
        for x in inputs.values():
            fn(x).numpy()
            fn(x).numpy()
    ratios = {1: [], 32: []}
    for pair in range(pairs):
        for b, x in inputs.items():
            seconds = {}
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls[b]):
                    fn(x).numpy()
                seconds[name] = (time.perf_counter() - start) / calls[b]
            ratios[b].append(seconds["slim"] / seconds["dense"])
            log(f"latency b{b} pair {pair + 1}: dense {1e3 * seconds['dense']:.1f} ms, "
                f"slim {1e3 * seconds['slim']:.1f} ms")
    return {"slim_vs_dense_latency_b1": median(ratios[1]),
            "slim_vs_dense_latency_b32": median(ratios[32])}


# ------------------------------------------------------------------------------------------------
# Input pipeline vs model, and peak memory.

def _pipeline_rate(dataset, batches):
    """Images/s of iterating `batches` batches (after one to start the pipeline)."""
    it = iter(dataset)
    next(it)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def bench_pipeline(s, pairs, model_224_rate):
    from unittest import mock

    import tensorflow as tf
    import tensorflow_datasets as tfds
    from ke_tf import data
    from ke_tf.config import DataConfig

    digits = data.load(DataConfig(dataset="digits", image_size=32, batch_size=25))
    trainer = _build_trainer(dict(arch="resnet18", classes=10, size=32, stem="small",
                                  width=0.25), "ke")
    x, y = _train_batch(32, 25, 10)
    batch = tf.data.Dataset.from_tensors((x, y)).repeat()
    _fit_rate(trainer, batch, 25, 1, 1)
    ratios = []
    for pair in range(pairs):
        pipe = _pipeline_rate(digits.train_from(0), s["digits_batches"])
        model_rate = _fit_rate(trainer, batch, 25, 2, s["digits_model_steps"])
        ratios.append(pipe / model_rate)
        log(f"digits pair {pair + 1}: pipeline {pipe:.0f}, model {model_rate:.0f} images/s")
    out = {"pipeline_vs_model_digits": median(ratios)}

    with tfds.testing.mock_data(num_examples=s["mock_examples"]), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
        flowers = data.load(DataConfig(dataset="oxford_flowers102", image_size=s["mock_size"],
                                       batch_size=32))
        rates = [_pipeline_rate(flowers.train_from(0), s["mock_batches"]) for _ in range(pairs)]
    log(f"{s['mock_size']} px pipeline: " + ", ".join(f"{r:.0f}" for r in rates)
        + f" images/s; model {model_224_rate:.1f} images/s")
    out["pipeline_images_per_s_224"] = median(rates)
    out["pipeline_vs_model_224"] = median(rates) / model_224_rate
    out["pipeline_vs_model"] = min(out["pipeline_vs_model_digits"], out["pipeline_vs_model_224"])
    return out


def rss_child(size, batch, width, steps):
    """In a fresh process: train ResNet18 at `size` px for warm-up + `steps` steps; print
    {"peak_rss_mb", "images_per_s"} as JSON."""
    import tensorflow as tf
    s = dict(arch="resnet18", classes=102, size=size, stem="imagenet", width=width)
    model = _build_trainer(s, "ke")
    x, y = _train_batch(size, batch, 102)
    rate = _fit_rate(model, tf.data.Dataset.from_tensors((x, y)).repeat(), batch, 1, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    print(json.dumps({"peak_rss_mb": peak, "images_per_s": rate}))


def bench_rss(s):
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss_child",
           f"{s['size']},{s['batch']},{s['width']},{s['steps']}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"peak-RSS subprocess failed ({out.returncode}): {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"ResNet18 {s['size']} px batch {s['batch']}: peak RSS {result['peak_rss_mb']:.0f} MB, "
        f"{result['images_per_s']:.1f} images/s")
    return result


# ------------------------------------------------------------------------------------------------
# --strategy=multi_worker on one machine: two local workers vs one process (the collectives' cost).

MULTI_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "multi_worker_step.py")


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _step_children(s, workers, threads):
    """Wall ms a step of `workers` multi_worker processes on 127.0.0.1 (0: one process without
    a strategy), each with `threads` threads: the slowest worker's."""
    cmd = [sys.executable, MULTI_WORKER_SCRIPT] + [f"--{k}={v}" for k, v in s.items()]
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
               TF_NUM_INTEROP_THREADS=str(threads))
    env.pop("TF_CONFIG", None)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(workers)]}
    envs = [dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                            "task": {"type": "worker", "index": i}}))
            for i in range(workers)] or [env]
    strategy = "--strategy=multi_worker" if workers else "--strategy=none"
    procs = [subprocess.Popen(cmd + [strategy], env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in envs]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            if proc.returncode:
                raise RuntimeError(f"{MULTI_WORKER_SCRIPT} failed ({proc.returncode}): "
                                   f"{stderr[-2000:]}")
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return max(out["step_ms"] for out in outs)


def bench_multi_worker(s, pairs, threads=None):
    """The digits default's step in two local multi_worker processes (half the threads each)
    and in one process, alternating; medians over `pairs` (the ratio: of per-pair ratios)."""
    threads = threads or os.cpu_count() or 2
    two, one = [], []
    for i in range(pairs):
        two.append(_step_children(s, 2, max(1, threads // 2)))
        one.append(_step_children(s, 0, threads))
        log(f"multi_worker pair {i + 1}/{pairs}: two local workers {two[-1]:.1f} ms a step, "
            f"one process {one[-1]:.1f} ms (global batch {s['batch']}, {threads} threads)")
    return {"two_workers_step_ms": median(two), "one_process_step_ms": median(one),
            "two_workers_vs_one_process": median([a / b for a, b in zip(two, one)])}


# ------------------------------------------------------------------------------------------------
# Where the time goes: the TensorFlow profiler over a few KE training steps.

def profile_train(s, policy, steps=8, top=20):
    """Share of TensorFlow op time by op type over `steps` KE training steps (host CPU plane of
    the TensorFlow profiler; nested function-call ops are left out so nothing counts twice)."""
    import collections
    import glob
    import re
    import tempfile

    import tensorflow as tf
    from ke_tf import internals

    model = _build_trainer(s, "ke", policy=policy)
    x, y = _train_batch(s["size"], s["batch"], s["classes"])
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    _fit_rate(model, dataset, s["batch"], 1, 2)
    logdir = tempfile.mkdtemp(prefix="ke_profile_")
    tf.profiler.experimental.start(logdir)
    rate = _fit_rate(model, dataset, s["batch"], 1, steps)
    tf.profiler.experimental.stop()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space = internals.xplane_space(f.read())
    by_type = collections.Counter()
    skip = re.compile(r"PartitionedCall|^While|^If|^__inference|Identity$|^NoOp$|^_Recv|^_Send")
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name or "::" in name:
                    continue
                op_type = name.rsplit(":", 1)[1]
                if op_type and not skip.search(op_type) and re.fullmatch(r"[\w]+", op_type):
                    by_type[op_type] += event.duration_ps
    total = sum(by_type.values()) or 1
    shares = {k: v / total for k, v in by_type.most_common(top)}
    log(f"profile ({policy}): {1e3 * s['batch'] / rate:.0f} ms a step (profiled), ops "
        f"{1e-9 * total / (steps + 1):.0f} ms of CPU a step; share of op time:")
    for k, v in shares.items():
        log(f"  {k:<40} {100 * v:5.1f}%")
    return shares


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--pairs", type=int, default=None, help="alternated pairs (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 pair (smoke test)")
    parser.add_argument("--torch_python", default=None,
                        help="a Python with torch: also run the torch ResNet18 reference")
    parser.add_argument("--torch_script", default=TORCH_SCRIPT,
                        help="the torch reference script (default: %(default)s)")
    parser.add_argument("--details", action="store_true",
                        help="also put the intermediate numbers in the JSON line")
    parser.add_argument("--xla", action="store_true",
                        help="also measure the KE step with jit_compile=True (slow on CPU)")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts: train,reinit,gen2,slim,pipeline,multi_worker "
                             "(others 0; multi_worker only with --details)")
    parser.add_argument("--profile", action="store_true",
                        help="print where the KE step's time goes (TF profiler), then exit")
    parser.add_argument("--torch_wait_policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY of the torch reference: PASSIVE (default) idle "
                             "OpenMP threads sleep; ACTIVE they spin, which a busy machine "
                             "turns into CPU time and collapsed wall time")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op and inter-op threads of TensorFlow and of the torch "
                             "reference (default: the CPUs, %(default)s)")
    parser.add_argument("--_rss_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._rss_child:
        size, batch, width, steps = args._rss_child.split(",")
        rss_child(int(size), int(batch), float(width), int(steps))
        return 0
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 5)
    if pairs < 1:
        parser.error(f"--pairs must be >= 1. Received: --pairs={pairs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1. Received: --threads={args.threads}")
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else None

    def wanted(part):
        return only is None or part in only

    # the kernels ke_tf's command line trains with (oneDNN on AVX2 CPUs, unless
    # TF_ENABLE_ONEDNN_OPTS is set), chosen before TensorFlow starts; children inherit it
    from ke_tf.cpu import enable_onednn_where_faster

    enable_onednn_where_faster()
    import tensorflow as tf  # after argument errors, which should be quick
    # before TensorFlow's runtime starts; the torch reference gets the same counts
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.profile:
        for policy in ("float32", "mixed_bfloat16"):
            profile_train(sizes["train"], policy)
        return 0
    meta = machine()
    meta.update(threads=args.threads, load_average=[os.getloadavg()[0]])
    if args.torch_python:
        meta["torch_wait_policy"] = args.torch_wait_policy
    log(f"CPU {meta['cpu']}, flags {meta['cpu_flags']}, oneDNN {meta['onednn']} "
        f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(default)')}), "
        f"bf16 probe {meta['bf16_probe']}: --mixed_precision -> {meta['mixed_precision_auto']}, "
        f"{args.threads} threads, load {meta['load_average'][0]:.2f}, pairs={pairs}, "
        f"quick={args.quick}")
    results = dict.fromkeys(REQUIRED_KEYS, 0.0)
    start = time.perf_counter()
    if wanted("train"):
        results.update(bench_train(sizes["train"], pairs, args.torch_python, args.xla,
                                   args.torch_script, args.threads, args.torch_wait_policy))
    if wanted("reinit"):
        results.update(bench_reinit(sizes["reinit"], pairs))
    if wanted("gen2"):
        results.update(bench_gen2(sizes["gen2"], pairs))
        if not args.quick:
            results.update(bench_gen2(sizes["gen2"], pairs, source="pipeline"))
    if wanted("slim"):
        results.update(bench_slim(sizes["slim"], pairs))
    if wanted("pipeline"):
        rss = bench_rss(sizes["rss"])
        results["peak_rss_mb"] = rss["peak_rss_mb"]
        results["train_images_per_s_224"] = rss["images_per_s"]
        results.update(bench_pipeline(sizes["pipeline"], pairs, rss["images_per_s"]))
    if args.details and wanted("multi_worker"):
        results.update(bench_multi_worker(sizes["multi_worker"], pairs, args.threads))
    meta["load_average"].append(os.getloadavg()[0])
    log(f"benchmark took {time.perf_counter() - start:.0f} s, load average "
        f"{meta['load_average'][0]:.2f} -> {meta['load_average'][1]:.2f}")
    bad = [k for k in REQUIRED_KEYS if not math.isfinite(results[k])]
    if bad:
        raise RuntimeError(f"non-finite results: {bad}")
    if args.json:
        keep = set(REQUIRED_KEYS) | set(EXTRA_KEYS)
        print(json.dumps({**{k: v for k, v in results.items() if args.details or k in keep},
                          **meta}))
    else:
        width = max(map(len, list(results) + list(meta)))
        for key, value in results.items():
            print(f"{key:<{width}}  {value:.4g}")
        for key, value in meta.items():
            print(f"{key:<{width}}  {value}")
    return 0


def machine():
    """The META_KEYS that describe this machine's CPU: `cpu` (model name, family, model),
    `cpu_flags` ({flag: present} for CPU_FLAGS), `onednn`, `bf16_probe` and
    `mixed_precision_auto` (`precision.precision_policy` of the bare --mixed_precision)."""
    import warnings

    from ke_tf import config, precision

    cpu, probe = precision.this_cpu(), precision.bf16_probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.PrecisionWarning)
        policy = precision.precision_policy(config.RunConfig(mixed_precision="auto"))
    return {"cpu": cpu.name(), "cpu_flags": {f: f in cpu.flags for f in CPU_FLAGS},
            "onednn": precision.onednn_enabled(),
            "bf16_probe": probe if math.isfinite(probe) else None,  # None: bfloat16 fails here
            "mixed_precision_auto": policy}


if __name__ == "__main__":
    # Benchmark this checkout's ke_tf: run as a script, sys.path[0] is tools/, and an installed
    # (possibly older) copy of the package would be imported instead.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
