"""tools/benchmark.py runs end to end (tiny sizes) and prints its JSON line; no timing checks."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"train_images_per_s", "train_images_per_s_bf16", "ke_vs_plain_throughput",
            "reinit_seconds_resnet50", "gen2_first_epoch_vs_steady", "slim_vs_dense_latency_b1",
            "slim_vs_dense_latency_b32", "pipeline_vs_model", "peak_rss_mb"}


def test_quick_json_line_has_exactly_the_required_finite_numbers():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--quick",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == REQUIRED
    for key, value in result.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value), key


def test_bad_pairs_is_a_usage_error():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                          "--pairs=0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--pairs" in out.stderr
