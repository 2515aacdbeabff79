"""Shipping a trained network: TensorFlow SavedModel, TFLite or Keras file.

`save_saved_model(model, path, output_name)` writes `path` atomically (a temporary directory,
then a rename): image batch `images` [N, H, W, 3] float32 (normalized as the evaluation
pipeline does) in, `{output_name: [N, K]}` out ("logits", or "embeddings" for metric nets).
Under Keras 3, `TFLiteConverter.from_keras_model` fails (tensorflow issue 63867); `save_tflite`
converts that SavedModel with `tf.lite.TFLiteConverter.from_saved_model` instead, so the TFLite
model has the same `serving_default` signature. `save_keras` writes a `.keras` file;
`load_keras` reads one in safe mode: loading never executes code stored in the file (a `Lambda`
layer's Python function is refused).

The command line exports a network of a finished (or interrupted) run from its checkpoints:

    python -m ke_tf.export RUN_DIR --format=saved_model|tflite|keras --net=dense|slim \
        [--generation=N]

of the generation the run ships (`--select_by`'s, by default the last), or of generation N,
into `RUN_DIR/export/`: `<net>/` (SavedModel), `<net>.tflite` or `<net>.keras`, named
`<net>-g<N>...` with --generation; the slim network is the BatchNorm-recalibrated one when the run
recalibrates. Classification runs also get `class_names.txt` there (one name a line, the order of
the logits). It prints the path written and its size. Exit status 2 for bad usage or a run
directory (or generation) without a checkpoint.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Sequence

from ke_tf import cli  # first: quiets TensorFlow's C++ logging before it is imported

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from ke_tf import atomic  # noqa: E402
from ke_tf.config import ConfigError  # noqa: E402

FORMATS = ("saved_model", "tflite", "keras")
NETS = ("dense", "slim")
CLASS_NAMES = "class_names.txt"


def save_saved_model(model: keras.Model, path: str, output_name: str = "logits") -> str:
    """Export `model` (inference mode) as a SavedModel directory at `path`; returns `path`.

    The SavedModel holds the network's variables and its one serving function, not its Keras
    layers: writing and loading it do not walk every layer, as `keras.export.ExportArchive` does
    (InceptionResNetV2 on an AMD EPYC with AVX-512: written in 5 s instead of 11 s, loaded and
    served in 3 s instead of 5 s). A network that reads other TensorFlow resources (a lookup
    table in a layer) is written by `ExportArchive`, which finds them in its layers."""
    spec = tf.TensorSpec((None,) + tuple(model.input.shape[1:]), tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def serve(images):  # float32 out, also from a mixed-precision network
        return {output_name: tf.cast(model(images, training=False), tf.float32)}

    module = tf.Module()
    module.serve = serve
    module.network_variables = list(serve.get_concrete_function().variables)  # what it reads
    try:
        with atomic.atomic_dir(path) as tmp:
            tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
    except AssertionError as err:  # TensorFlow's "untracked resource": not only variables
        if "untracked" not in str(err):
            raise
        archive = keras.export.ExportArchive()  # tracks every layer's resources (lookup tables)
        archive.track(model)
        archive.add_endpoint(name="serve", fn=serve, input_signature=[spec])
        with atomic.atomic_dir(path) as tmp:
            archive.write_out(tmp, verbose=False)
    return path


def save_tflite(model: keras.Model, path: str, output_name: str = "logits") -> str:
    """`model` as a float32 TFLite flatbuffer at `path` (atomically), converted from its
    SavedModel: signature `serving_default`, input `images`, output `output_name`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=parent) as tmp:
        saved = save_saved_model(model, os.path.join(tmp, "saved_model"), output_name)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
    with atomic.open_atomic(path, "wb") as f:
        f.write(flatbuffer)
    return path


def save_keras(model: keras.Model, path: str) -> str:
    """`model.save` to a `.keras` file at `path`, atomically; returns `path`."""
    if not path.endswith(".keras"):
        raise ValueError(f"A Keras model file must end with .keras. Received: path={path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=parent) as tmp:
        staged = os.path.join(tmp, "model.keras")
        model.save(staged)
        with open(staged, "rb") as src, atomic.open_atomic(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return path


def load_keras(path: str) -> keras.Model:
    """A `.keras` file loaded in safe mode (no compile): a file that would run arbitrary Python
    code when loaded (a `Lambda` layer) raises `ValueError` instead."""
    from ke_tf import networks  # noqa: F401  registers ke_tf's layer classes

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def size_of(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_network(model: keras.Model, directory: str, name: str, fmt: str,
                   output_name: str = "logits") -> str:
    """Writes `model` into `directory` as `name/` (saved_model), `name.tflite` or `name.keras`;
    returns the path written."""
    if fmt == "saved_model":
        return save_saved_model(model, os.path.join(directory, name), output_name)
    if fmt == "tflite":
        return save_tflite(model, os.path.join(directory, f"{name}.tflite"), output_name)
    if fmt == "keras":
        return save_keras(model, os.path.join(directory, f"{name}.keras"))
    raise ValueError(f"Unknown format, expected one of {FORMATS}. Received: fmt={fmt!r}")


def write_class_names(directory: str, class_names: Sequence[str]) -> str:
    """`directory/class_names.txt`: one class name a line, in the order of the logits."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CLASS_NAMES)
    with atomic.open_atomic(path) as f:
        f.write("".join(f"{name}\n" for name in class_names))
    return path


def export_run(run_dir: str, fmt: str, net: str, generation: int | None = None) -> str:
    """Exports network `net` of the generation `run_dir` ships (the one --select_by selected,
    by default the last kept), or of `generation`, from its checkpoint into
    `run_dir/export/`; returns the path written. Raises ConfigError for a run directory or
    generation without a checkpoint, or a network the run does not have."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}. Received: format={fmt!r}")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"RUN_DIR {run_dir} is not a directory. Received: run_dir={run_dir!r}")
    from ke_tf import checkpoint  # the networks and the run's configuration

    loaded = checkpoint.load_networks(run_dir, generation if generation is not None
                                      else checkpoint.shipped_generation(run_dir, net))
    if net not in loaded.nets:
        raise ConfigError(f"--net={net}: {run_dir} has no {net} network (it has "
                          f"{', '.join(sorted(loaded.nets))}; only KELS runs of --method=ke or "
                          f"long have a slim network). Received: net={net!r}")
    directory = os.path.join(run_dir, "export")
    name = net if generation is None else f"{net}-g{loaded.generation:03d}"
    path = export_network(loaded.nets[net], directory, name, fmt, loaded.output_name)
    if loaded.output_name == "logits":
        write_class_names(directory, loaded.class_names)
    return path


# --- the command line ---------------------------------------------------------------------------

def _define_flags():
    from absl import flags

    if "format" in flags.FLAGS:  # defined already (run() called twice in one process)
        return
    flags.DEFINE_enum("format", "saved_model", FORMATS, "saved_model: a directory <net>/; "
                      "tflite: <net>.tflite (float32); keras: <net>.keras.")
    flags.DEFINE_enum("net", "slim", NETS, "dense: N_g; slim: H_g (BatchNorm-recalibrated when "
                      "the run recalibrates).")
    flags.DEFINE_integer("generation", None, "Export this generation's checkpoint (one the run "
                         "kept) instead of the last one.", lower_bound=1)


def main(argv) -> None:
    from absl import flags

    f = flags.FLAGS
    path = export_run(argv[1], f.format, f.net, f.generation)
    print(f"{path}: {size_of(path)} bytes")


def run(argv: list[str] | None = None) -> None:
    """`python -m ke_tf.export RUN_DIR --format=... --net=... [--generation=N]`."""
    _define_flags()
    cli.run(main, sys.argv if argv is None else argv, positional=("RUN_DIR",))


if __name__ == "__main__":
    run()
