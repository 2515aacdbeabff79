"""Command-line plumbing shared by every entry point: quiet TensorFlow and exit statuses.

Importing this module imports TensorFlow with its native start-up noise filtered, after
choosing its CPU kernels (`ke_tf.cpu.enable_onednn_where_faster`); entry points import it first.
Exit status contract: 0 done; 1 a run that failed while running; 2 bad usage or bad input (a
flag error or a `ConfigError`), with a message naming the flag or file. absl's `app.run`
exits 1 on flag errors, so flags are parsed here instead.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Callable, List, Sequence

# TensorFlow's C++ INFO and WARNING lines drown the progress output; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from ke_tf import cpu  # noqa: E402
from ke_tf.config import ConfigError, RunError  # noqa: E402

# oneDNN's kernels on where TensorFlow leaves them off although they are faster (AVX2 CPUs
# without AVX-512: 1.6x ResNet18's training step); a TF_ENABLE_ONEDNN_OPTS the user set wins.
cpu.enable_onednn_where_faster()

USAGE_ERROR = 2

# TensorFlow 2.21 logs these through absl before its logging is initialized, ignoring
# TF_CPP_MIN_LOG_LEVEL: the absl preamble, INFO/WARNING lines, and on machines without a GPU
# driver "failed call to cuInit". Every other line (errors included) is passed on.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] |E\d{4} .*failed call to cuInit)")


_LOG_HEADER = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


def import_tensorflow_quietly():
    """Import TensorFlow and find its devices with its native start-up noise filtered out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            dropping = False
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if _LOG_HEADER.match(line) or line.startswith("WARNING: All log messages"):
                    dropping = bool(_NATIVE_NOISE.match(line))
                if not dropping:  # a continuation line goes with its message
                    sys.stderr.write(line)
            sys.stderr.flush()
    tf.get_logger().addFilter(_expected_retracing)
    return tf


def _expected_retracing(record) -> bool:
    """Drops TensorFlow's "N out of the last M calls to <function ...> triggered tf.function
    retracing" warning: every network evaluated traces its predict step twice (full batches and
    the last, smaller one), which on small test splits (folder datasets) crosses TensorFlow's
    threshold although nothing is retraced in a loop."""
    return "triggered tf.function retracing" not in record.getMessage()


def _parse_flags(argv: List[str]) -> List[str]:
    try:
        return flags.FLAGS(argv)
    except SystemExit:  # --help / --helpfull printed the help: that is no failure
        sys.exit(0)
    except (flags.Error, ValueError) as err:  # ValueError: a value for --noFLAG
        message = re.sub(r"^ERROR:+\s*", "", str(err))  # absl's missing --flagfile: "ERROR:: ..."
        sys.stderr.write(f"error: {message}\nPass --helpfull to see help on flags.\n")
        sys.exit(USAGE_ERROR)


def run(main: Callable[[List[str]], None], argv: List[str] | None = None,
        positional: Sequence[str] = (),
        prepare: Callable[[List[str]], List[str]] | None = None) -> None:
    """`absl.app.run(main)` where flag errors and ConfigError exit 2 with one clear line.
    `positional`: the names of the positional arguments `main` takes (none by default); `main`
    gets them as `args[1:]`, and a missing or extra one exits 2. `prepare` rewrites argv before
    the flags are parsed (`--preset`); its ConfigError exits 2 too."""
    if prepare is not None:
        try:
            argv = prepare(list(sys.argv if argv is None else argv))
        except ConfigError as err:
            sys.stderr.write(f"error: {err}\n")
            sys.exit(USAGE_ERROR)

    def guarded(args: List[str]) -> None:
        if len(args) > 1 + len(positional):
            extra = args[1 + len(positional):]
            sys.stderr.write(f"error: unexpected positional arguments: {' '.join(extra)}\n")
            sys.exit(USAGE_ERROR)
        if len(args) < 1 + len(positional):
            missing = positional[len(args) - 1:]
            sys.stderr.write(f"error: missing positional arguments: {' '.join(missing)}\n")
            sys.exit(USAGE_ERROR)
        if not flags.FLAGS["verbosity"].present:  # TensorFlow's INFO lines (SavedModel writing...)
            logging.set_verbosity(logging.WARNING)
        try:
            main(args)
        except ConfigError as err:
            sys.stderr.write(f"error: {err}\n")
            sys.exit(USAGE_ERROR)
        except RunError as err:
            sys.stderr.write(f"error: {err}\n")
            sys.exit(1)

    app.run(guarded, argv=argv, flags_parser=_parse_flags)


# Entry points import this module before anything that imports TensorFlow.
import_tensorflow_quietly()
