"""Knowledge Evolution on keras.applications: the table of docs/guide.md (Your own model).

    python tools/applications.py [--models=families|all|NAME,...] [--out=runs/applications]

For every constructor (weights=None, 4 classes, 32 px; 75 px for the Inceptions and Xception),
in a process of its own: whether KELS (s=0.5) accepts it, the dense and slim parameter counts,
and the slim network's largest relative difference to the dense one with its reset hypothesis
zeroed (random BatchNorm statistics and biases). With --train (on by default) the model is also
trained two ways, each in a fresh process timed from the model's construction to the end:
`ke_tf.evolve` (16 random images, batch 8, two generations of one epoch, the dense, slim and
re-estimated slim networks evaluated after each, both SavedModels exported) and plain Keras
(`compile` + `fit` of two epochs + `evaluate` + one SavedModel export). "outside" is the
difference: what KE costs beyond the training a user would run anyway (masks, resets, slim
extraction, BatchNorm re-estimation, the extra evaluations, checkpoints, the second export).
--models=families (the default) trains the smallest member of each of the 14 families; the
check runs for every constructor named. Results are cached in --out/NAME.json (delete to redo);
the last stdout lines are the Markdown table. Name the CPU with the numbers.
"""
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

from ke_tf import cli  # first: exit statuses, TensorFlow's start-up noise filtered

from absl import flags  # noqa: E402

flags.DEFINE_list("models", ["families"], "families (the smallest of each), all, or names.")
flags.DEFINE_string("out", "runs/applications", "Directory of the cached results.")
flags.DEFINE_bool("train", True, "Also time ke_tf.evolve against plain fit (else: check only).")
flags.DEFINE_string("one", "", "Internal: measure this constructor in this process.")
flags.DEFINE_enum("mode", "check", ["check", "evolve", "plain"], "Internal: what --one does.")
FLAGS = flags.FLAGS
FAMILIES = ("ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0",
            "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2", "MobileNetV3Small",
            "NASNetMobile", "ResNet50", "ResNet50V2", "VGG16", "Xception")
SIDE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 75}  # their smallest input


def build(name):
    import keras

    side = SIDE.get(name, 32)
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(weights=None, classes=4, input_shape=(side, side, 3),
                                             classifier_activation=None)


def check(name):
    """KELS masks, parameter counts and slim equivalence of one constructor."""
    import numpy as np
    import keras
    from ke_tf import masks, slim
    from ke_tf.config import ConfigError

    model = build(name)
    try:
        m = masks.compute(model, "kels", 0.5)
    except (ConfigError, ValueError) as err:
        return {"accepted": False, "error": str(err), "dense_params": model.count_params()}
    rng = np.random.default_rng(0)
    for v in model.weights:  # non-trivial BatchNorm statistics and biases
        if v.name in ("moving_mean", "beta", "bias"):
            v.assign(rng.normal(0, 0.5, v.shape).astype(v.dtype))
        elif v.name in ("moving_variance", "gamma"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
    small = slim.extract(model, m)
    for v in model.weights:
        if v.path in m:
            v.assign(np.where(m[v.path], v.numpy(), 0).astype(v.dtype))
    x = rng.normal(size=(2,) + tuple(model.input.shape[1:])).astype("float32")
    want = keras.ops.convert_to_numpy(model(x, training=False))
    got = keras.ops.convert_to_numpy(small(x, training=False))
    return {"accepted": True, "dense_params": model.count_params(),
            "slim_params": small.count_params(),
            "relative_difference": float(np.abs(got - want).max() / np.abs(want).max())}


def train(name, mode):
    """Seconds from construction to the end of `mode` (evolve or plain), in this process."""
    import numpy as np
    import keras
    import tensorflow as tf
    import ke_tf
    from ke_tf import export

    start = time.perf_counter()
    model = build(name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + tuple(model.input.shape[1:])).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 4)).batch(8)
    with tempfile.TemporaryDirectory() as run_dir:
        if mode == "evolve":
            ke_tf.evolve(model, data, test=data, generations=2, epochs=1, warmup_epochs=0,
                         lr=0.01, split_rate=0.5, run_dir=run_dir, verbose=False)
        else:
            model.compile(keras.optimizers.SGD(0.01, momentum=0.9), metrics=["accuracy"],
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(data, epochs=2, verbose=0)
            model.evaluate(data, verbose=0)
            export.save_saved_model(model, os.path.join(run_dir, "dense"))
    return {f"{mode}_seconds": time.perf_counter() - start}


def measure(name):
    """The cached or freshly measured results of one constructor (one process per part)."""
    path = os.path.join(FLAGS.out, f"{name}.json")
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    modes = ["check"] + (["plain", "evolve"] if FLAGS.train and name in FAMILIES else [])
    for mode in modes:
        if (mode == "check" and "accepted" in result) or f"{mode}_seconds" in result:
            continue
        if mode != "check" and not result.get("accepted"):
            break
        print(f"{name}: {mode}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, f"--one={name}", f"--mode={mode}"],
                             check=True, capture_output=True, text=True).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(results):
    lines = ["| model | accepted | dense params | slim params | slim / dense | equivalence | "
             "evolve s | plain s | outside s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r["accepted"]:
            lines.append(f"| {name} | no: {r['error']} | {r['dense_params']:,} | | | | | | |")
            continue
        seconds = ["", "", ""]
        if "evolve_seconds" in r:
            e, p = r["evolve_seconds"], r["plain_seconds"]
            seconds = [f"{e:.0f}", f"{p:.0f}", f"{e - p:+.0f}"]
        lines.append(f"| {name} | yes | {r['dense_params']:,} | {r['slim_params']:,} | "
                     f"{r['slim_params'] / r['dense_params']:.2f} | "
                     f"{r['relative_difference']:.1e} | " + " | ".join(seconds) + " |")
    return "\n".join(lines)


def main(_):
    if FLAGS.one:
        result = check(FLAGS.one) if FLAGS.mode == "check" else train(FLAGS.one, FLAGS.mode)
        print(json.dumps(result))
        return
    import keras

    constructors = sorted(n for n, f in inspect.getmembers(keras.applications, inspect.isfunction)
                          if n[0].isupper())
    names = {"families": list(FAMILIES), "all": constructors}.get(FLAGS.models[0], FLAGS.models)
    unknown = sorted(set(names) - set(constructors))
    if unknown:
        raise cli.ConfigError(f"--models: not keras.applications constructors: {unknown}")
    print(table({name: measure(name) for name in names}))


if __name__ == "__main__":
    cli.run(main)
