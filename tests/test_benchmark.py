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


META = {"cpu", "cpu_flags", "threads", "onednn", "load_average", "bf16_probe",
        "mixed_precision_auto"}
CPU_TIME = {"train_cpu_ms_per_image", "train_cpu_ms_per_image_bf16"}
TORCH = {"torch_images_per_s", "torch_images_per_s_bf16", "torch_cpu_ms_per_image",
         "torch_cpu_ms_per_image_bf16", "vs_torch_fp32", "vs_torch_bf16", "bf16_vs_torch_fp32",
         "vs_torch_fp32_cpu_time", "vs_torch_bf16_cpu_time", "bf16_vs_torch_fp32_cpu_time"}
# A stand-in for the torch reference (tools/torch_resnet18_step.py's JSON line), so that the
# test needs no torch: bfloat16 "twice as fast".
FAKE_TORCH = """import json, sys
bf16 = "--bf16" in sys.argv
threads = int(next(a.split("=")[1] for a in sys.argv if a.startswith("--threads=")))
print(json.dumps({"images_per_s": 200.0 if bf16 else 100.0, "threads": threads,
                  "cpu_seconds_per_image": 0.01 if bf16 else 0.02}))
"""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_meta(result, threads):
    assert isinstance(result["cpu"], str) and result["cpu"]
    assert set(result["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert all(isinstance(v, bool) for v in result["cpu_flags"].values())
    assert result["threads"] == threads and isinstance(result["onednn"], bool)
    assert len(result["load_average"]) == 2 and all(map(_number, result["load_average"]))
    assert result["bf16_probe"] > 0
    assert result["mixed_precision_auto"] in ("float32", "mixed_bfloat16", "mixed_float16")


# What each part of the benchmark measures (--only=PART): every part runs, in one of two
# processes (xdist runs them at once), and measures its numbers; the others are 0.
PARTS = {"train": {"train_images_per_s", "train_images_per_s_bf16", "ke_vs_plain_throughput",
                   "train_cpu_ms_per_image", "train_cpu_ms_per_image_bf16"},
         "reinit": {"reinit_seconds_resnet50"}, "gen2": {"gen2_first_epoch_vs_steady"},
         "slim": {"slim_vs_dense_latency_b1", "slim_vs_dense_latency_b32"},
         "pipeline": {"pipeline_vs_model", "peak_rss_mb"}}


@pytest.mark.parametrize("parts", ["train,reinit,gen2", "slim,pipeline"])
def test_quick_json_line_has_the_required_finite_numbers_the_cpu_and_cpu_times(parts, tmp_path):
    """Each part measures its numbers. With the train part, the torch reference too (a
    stand-in script, one thread): its wall and CPU time ratios are KE's numbers over it."""
    torch = []
    if "train" in parts.split(","):
        script = tmp_path / "fake_torch.py"
        script.write_text(FAKE_TORCH)
        torch = ["--threads=1", f"--torch_python={sys.executable}", f"--torch_script={script}"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--quick",
                          "--json", f"--only={parts}"] + torch, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    measured = set().union(*(PARTS[part] for part in parts.split(",")))
    cpu_time = CPU_TIME if torch else set()  # the train part's
    assert set(result) == REQUIRED | META | cpu_time | (TORCH | {"torch_wait_policy"} if torch
                                                       else set())
    assert set().union(*PARTS.values()) == REQUIRED | CPU_TIME
    for key in REQUIRED | cpu_time | (TORCH if torch else set()):
        assert _number(result[key]), key
    for key in measured:
        assert result[key] > 0, key  # measured
    _check_meta(result, 1 if torch else os.cpu_count())
    if torch:
        assert result["torch_images_per_s"] == 100.0 and result["torch_cpu_ms_per_image"] == 20.0
        # torch's CPU time per image over KE's, and KE's images/s over torch's
        assert math.isclose(result["vs_torch_fp32_cpu_time"],
                            20.0 / result["train_cpu_ms_per_image"], rel_tol=1e-9)
        assert math.isclose(result["vs_torch_fp32"], result["train_images_per_s"] / 100.0,
                            rel_tol=1e-9)
        assert result["torch_wait_policy"] == "PASSIVE"


def test_bad_pairs_is_a_usage_error():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                          "--pairs=0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--pairs" in out.stderr
