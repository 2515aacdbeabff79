"""TensorFlow 2.21's oneDNN heap corruption (docs/performance.md, the oneDNN crash): ke_tf's networks train at the shapes
that crash, with oneDNN on (the rest of the tests run with TF_ENABLE_ONEDNN_OPTS=0, conftest).

The crash needs a CPU with AVX-512 and 2+ threads; elsewhere these tests pass without
exercising it. The plain-Keras crash itself is not asserted (it is TensorFlow's, and depends on
the CPU): tools/onednn_crash_repro.py measures it.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", PYTHONPATH=ROOT)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    return env


def test_ke_tf_conv2d_survives_the_crashing_strided_1x1_shape():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "onednn_crash_repro.py"),
                          "--via=ke_tf", "--runs=2", "--steps=100", "--threads=2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["crashes"] == 0, result
    assert (result["batch"], result["channels"], result["stride"]) == (25, 4, 2)


@pytest.mark.parametrize("flags", [["--width_multiplier=0.0625", "--batch_size=15"],
                                   ["--method=slim_scratch", "--batch_size=25"]],
                         ids=["width_1_16_batch_15", "slim_scratch_batch_25"])
def test_the_runs_that_crashed_train_with_onednn(tmp_path, flags):
    """The two runs docs/performance.md named: 4-8-channel ResNet18 shortcuts at batch 15, the slim
    digits architecture (13 channels) at batch 25; 3 of 3 crashed before ke_tf's Conv2D ran
    those convolutions as a matmul."""
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "ke_tf.main", *flags,
                          "--generations=2", "--epochs=2", "--noexport", "--quiet",
                          f"--run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
