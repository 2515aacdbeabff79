"""One process of `tools/benchmark.py --details`'s multi-worker measurement (docs/performance.md).

    TF_CONFIG=... python tools/multi_worker_step.py --strategy=multi_worker   # one worker
    python tools/multi_worker_step.py --strategy=none                         # one process

Trains the digits default's network (ResNet18 x0.25, small stem, 32 px, 10 classes; the KEModel of
`ke_tf.model.compile_ke_model` with the digits preset's lr and decay) on one in-memory global batch of `--batch` images for
`--warmup` + `--steps` steps and prints one JSON line: `step_ms` (wall milliseconds a step over
the timed steps) and `cpu_ms` (this process's CPU milliseconds a step). Under
`--strategy=multi_worker` the global batch is split over the workers of TF_CONFIG, BatchNorm is
synchronized and the steps run through `ke_tf.distribution.fit`, as `python -m ke_tf.main
--strategy=multi_worker` trains; under `none`, through Keras's `fit`. Threads: the environment's
(TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS), set by the benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("none", "multi_worker"), default="none")
    parser.add_argument("--batch", type=int, default=20, help="global batch")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    from ke_tf import config as C, distribution

    cfg = C.RunConfig(data=C.DataConfig(dataset="digits", image_size=args.size,
                                        batch_size=args.batch),
                      model=C.ModelConfig(width_multiplier=args.width),
                      train=C.TrainConfig(lr=0.05, weight_decay=5e-4, regularizer="smooth"),
                      strategy=args.strategy)
    strategy = distribution.strategy(cfg)  # first: MultiWorkerMirroredStrategy precedes every op
    import keras
    import tensorflow as tf

    from ke_tf import model as model_lib, networks

    with strategy.scope():
        keras.utils.set_random_seed(0)
        network = networks.from_config(cfg, 10)
        distribution.synchronize_batchnorm(cfg, network)
        model = model_lib.compile_ke_model(network, cfg, 10)
    x = tf.random.stateless_uniform((args.batch, args.size, args.size, 3), (1, 2))
    y = tf.random.stateless_uniform((args.batch,), (3, 4), maxval=10, dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    stamps = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append((time.perf_counter(), time.process_time()))

    steps = args.warmup + args.steps
    if distribution.is_multi_worker(strategy):
        distribution.fit(model, dataset, steps_per_epoch=steps, initial_epoch=0, epochs=1,
                         callbacks=[Clock()])
    else:
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[Clock()])
    (wall0, cpu0), (wall1, cpu1) = stamps[args.warmup - 1], stamps[-1]
    print(json.dumps({"step_ms": 1e3 * (wall1 - wall0) / args.steps,
                      "cpu_ms": 1e3 * (cpu1 - cpu0) / args.steps,
                      "replicas": strategy.num_replicas_in_sync}))
    return 0


if __name__ == "__main__":
    # This checkout's ke_tf (run as a script, sys.path[0] is tools/).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
