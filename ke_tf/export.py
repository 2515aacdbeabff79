"""Shipping a trained network: TensorFlow SavedModel with a `serving_default` signature.

`save_saved_model(model, path, output_name)` writes `path` atomically (a temporary directory,
then a rename): image batch `images` [N, H, W, 3] float32 (normalized as the evaluation
pipeline does) in, `{output_name: [N, K]}` out ("logits", or "embeddings" for metric nets).
Under Keras 3, `TFLiteConverter.from_keras_model` fails (tensorflow issue 63867); convert the
SavedModel with `tf.lite.TFLiteConverter.from_saved_model` instead.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ke_tf import atomic


def save_saved_model(model: keras.Model, path: str, output_name: str = "logits") -> str:
    """Export `model` (inference mode) as a SavedModel directory at `path`; returns `path`."""
    spec = tf.TensorSpec((None,) + tuple(model.input.shape[1:]), tf.float32, name="images")

    def serve(images):
        return {output_name: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=serve, input_signature=[spec])
    with atomic.atomic_dir(path) as tmp:
        archive.write_out(tmp, verbose=False)
    return path
