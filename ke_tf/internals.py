"""Every private Keras / TensorFlow API ke_tf uses, in one place, each where no public one exists.

Each function names what it reads and raises `PrivateAPIError`, saying what changed and which
ke_tf function needs it, when a Keras or TensorFlow upgrade moves it; tests/test_internals.py
calls every one on the pinned versions, so an upgrade that breaks one fails there first, by
name. Everything else in ke_tf uses public APIs only.

| function | private API | used by |
|---|---|---|
| `is_functional` | `keras.src.models.functional.Functional` (no public name for the class) | `graph.functional` |
| `call_count` | `Layer._inbound_nodes` (no public count of a layer's calls) | `graph.layers_in_order` |
| `node_tensors` | `Layer._inbound_nodes`' `input_tensors`, `output_tensors` (the tensors of each call) | `graph.channel_flow` |
| `producer` | `KerasTensor._keras_history.operation` (the layer that made a tensor) | `graph.output_layers` |
| `sgd_momentums` | `keras.optimizers.SGD.momentums` (its momentum buffers, undocumented) | `model` (fused update, lr rescale), `tools/benchmark.py` |
| `onednn_enabled` | `tensorflow.python.util._pywrap_util_port.IsMklEnabled` | `precision` |
| `xplane_space` | `tensorflow.tsl.profiler.protobuf.xplane_pb2.XSpace` (the profiler's trace format) | `tools/benchmark.py --profile` |
"""
from __future__ import annotations

from typing import List

import keras


class PrivateAPIError(RuntimeError):
    """A private Keras/TensorFlow API that ke_tf relies on is gone or changed (an upgrade)."""


def _changed(what: str, used_by: str, err: Exception) -> PrivateAPIError:
    import tensorflow as tf

    return PrivateAPIError(
        f"{used_by} needs {what}, a private API that this Keras {keras.__version__} / "
        f"TensorFlow {tf.__version__} no longer has ({type(err).__name__}: {err}); ke_tf is "
        "tested with the versions of its constraints file: install those, or update "
        "ke_tf/internals.py")


def is_functional(model) -> bool:
    """Whether `model` is a Keras functional model (keras.Model(inputs, outputs), Sequential
    included), the class of Keras's graph networks, which has no public name."""
    try:
        from keras.src.models.functional import Functional
    except ImportError as err:
        raise _changed("keras.src.models.functional.Functional", "ke_tf.graph.functional",
                       err) from err
    return isinstance(model, Functional)


def call_count(layer) -> int:
    """How many times `layer` was called in the graphs it belongs to (a shared layer: > 1)."""
    try:
        return len(layer._inbound_nodes)  # noqa: SLF001
    except AttributeError as err:
        raise _changed("Layer._inbound_nodes", "ke_tf.graph.layers_in_order", err) from err


def node_tensors(op) -> List[tuple]:
    """(input tensors, output tensors) of every call of layer or op `op` in the graphs it
    belongs to, in call order (a Sequential rebuilt from its config calls its first layer
    twice: once to build, once in its graph)."""
    try:
        return [(list(node.input_tensors), list(node.output_tensors))
                for node in op._inbound_nodes]  # noqa: SLF001
    except AttributeError as err:
        raise _changed("Node.input_tensors / output_tensors of Layer._inbound_nodes",
                       "ke_tf.graph.channel_flow", err) from err


def producer(tensor):
    """The layer (operation) of a functional graph that produced the symbolic `tensor`."""
    try:
        return tensor._keras_history.operation  # noqa: SLF001
    except AttributeError as err:
        raise _changed("KerasTensor._keras_history.operation", "ke_tf.graph.output_layers",
                       err) from err


def sgd_momentums(optimizer) -> List:
    """The momentum buffers of a built `keras.optimizers.SGD` (momentum > 0), one per trainable
    variable in the order the optimizer was built with; [] for any other optimizer and for an
    SGD not built yet (it has no buffers before its first step)."""
    if not isinstance(optimizer, keras.optimizers.SGD) or not optimizer.momentum \
            or not optimizer.built:
        return []
    try:
        return list(optimizer.momentums)
    except AttributeError as err:
        raise _changed("keras.optimizers.SGD.momentums", "ke_tf.model (the fused SGD update)",
                       err) from err


def onednn_enabled() -> bool:
    """Whether this TensorFlow runs its oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS and the CPU
    decide; TensorFlow has no public query)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError) as err:
        raise _changed("tensorflow.python.util._pywrap_util_port.IsMklEnabled",
                       "ke_tf.precision.onednn_enabled", err) from err


def xplane_space(data: bytes):
    """A TensorFlow profiler trace (an `.xplane.pb` file's bytes) parsed as its XSpace proto."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError as err:
        raise _changed("tensorflow.tsl.profiler.protobuf.xplane_pb2", "tools/benchmark.py",
                       err) from err
    space = xplane_pb2.XSpace()
    space.ParseFromString(data)
    return space
