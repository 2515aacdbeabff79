"""--mixed_precision where it helps: CPU detection from /proc/cpuinfo text, the precision decision
(a pure function of the mode, the device, the CPU flags, oneDNN and a probe), the warning, the
flag's spellings and old config.json values. No timing asserts: speed lives in the benchmark."""
import math
import os
import subprocess
import sys
import warnings

import pytest

import conftest
from ke_tf import config as C, cpu, precision
from ke_tf.cpu import CpuInfo, cpu_info
from ke_tf.precision import decide_precision

# First processor blocks of /proc/cpuinfo (flags abridged to what matters, plus neighbours).
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
AMD_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 avx512_bf16
"""
AMD_ZEN4 = """model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
"""
SKYLAKE = """model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: sse sse2 avx avx2 avx512f avx512bw avx512vl
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_info_reads_the_first_processors_model_and_flags():
    amd = cpu_info(AMD_ZEN2)
    assert amd.model == "AMD EPYC 7B12"
    assert "avx2" in amd.flags and "avx512_bf16" not in amd.flags  # processor 1 is not read
    assert amd.x86 and amd.bf16_units is False
    intel = cpu_info(INTEL_AMX)
    assert intel.model == "Intel(R) Xeon(R) Platinum 8480+" and intel.bf16_units is True
    # AVX512_BF16 without AMX: for the probe (the bfloat16 step was slower there, docs/performance.md)
    assert cpu_info(AMD_ZEN4).bf16_units is None
    assert cpu_info(SKYLAKE).bf16_units is False  # AVX-512 without bfloat16: none
    arm = cpu_info(GRAVITON3)
    assert "bf16" in arm.flags and not arm.x86 and arm.bf16_units is None  # not x86: unknown
    assert cpu_info("") == CpuInfo() and CpuInfo().bf16_units is None


def test_describe_names_the_model_and_the_flags_that_decide():
    assert cpu_info(AMD_ZEN2).describe() == (
        "AMD EPYC 7B12 (family 23, model 49) (avx2; no avx512f, avx512_bf16, amx_bf16)")
    assert cpu_info(INTEL_AMX).describe() == ("Intel(R) Xeon(R) Platinum 8480+ (family 6, "
                                              "model 143) (avx2, avx512f, avx512_bf16, amx_bf16)")
    assert cpu_info(AMD_ZEN4).name() == "AMD EPYC 9654 96-Core Processor"  # no ids given
    assert CpuInfo().describe() == "unknown CPU (flags unknown)"


class Probe:
    """A fake 1-second probe: returns `ratio` (bfloat16 / float32 CPU time), counts calls."""

    def __init__(self, ratio):
        self.ratio, self.calls = ratio, 0

    def __call__(self):
        self.calls += 1
        return self.ratio


@pytest.mark.parametrize("mode", ["auto", "force"])
def test_gpu_is_unchanged_float16(mode):
    probe = Probe(5.0)
    assert decide_precision(mode, True, cpu_info(AMD_ZEN2), False, probe) == (
        "mixed_float16", None)
    assert probe.calls == 0


@pytest.mark.parametrize("gpu", [False, True])
def test_off_is_float32_everywhere(gpu):
    probe = Probe(0.1)
    assert decide_precision("off", gpu, cpu_info(INTEL_AMX), True, probe) == ("float32", None)
    assert probe.calls == 0


def test_auto_on_a_cpu_with_amx_is_bfloat16_without_a_probe():
    probe = Probe(5.0)
    assert decide_precision("auto", False, cpu_info(INTEL_AMX), True, probe) == (
        "mixed_bfloat16", None)
    assert probe.calls == 0


@pytest.mark.parametrize("ratio, expected", [(0.6, "mixed_bfloat16"), (1.66, "float32")])
def test_auto_with_avx512_bf16_but_no_amx_asks_the_probe(ratio, expected):
    probe = Probe(ratio)
    policy, warning = decide_precision("auto", False, cpu_info(AMD_ZEN4), True, probe)
    assert probe.calls == 1 and policy == expected
    if expected == "float32":
        assert "AVX512_BF16 but no AMX" in warning and "1.66x" in warning
    else:
        assert warning is None


@pytest.mark.parametrize("text", [AMD_ZEN2, SKYLAKE])
def test_auto_on_a_cpu_without_bfloat16_units_is_float32_with_the_measured_reason(text):
    probe = Probe(5.31)
    policy, warning = decide_precision("auto", False, cpu_info(text), True, probe)
    assert policy == "float32" and probe.calls == 1
    assert "no bfloat16 units" in warning and cpu_info(text).model in warning
    assert "5.31x the CPU time of float32" in warning
    assert "--mixed_precision=force" in warning
    # a bfloat16 step TensorFlow cannot run (oneDNN forced on an AVX2 CPU): said so
    _, warning = decide_precision("auto", False, cpu_info(text), True, Probe(math.inf))
    assert "could not run a bfloat16 convolution" in warning
    # even a probe that finds bfloat16 faster does not override the flags: float32
    assert decide_precision("auto", False, cpu_info(text), True, Probe(0.5))[0] == "float32"


def test_force_trains_bfloat16_on_any_cpu_without_a_probe_or_warning():
    probe = Probe(5.0)
    assert decide_precision("force", False, cpu_info(AMD_ZEN2), False, probe) == (
        "mixed_bfloat16", None)
    assert probe.calls == 0


@pytest.mark.parametrize("ratio, expected", [(0.5, "mixed_bfloat16"), (8.9, "float32")])
def test_units_with_onednn_off_and_unknown_cpus_ask_the_probe(ratio, expected):
    for machine in (cpu_info(INTEL_AMX), cpu_info(GRAVITON3), CpuInfo()):
        onednn = not machine.bf16_units  # units: oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)
        probe = Probe(ratio)
        policy, warning = decide_precision("auto", False, machine, onednn, probe)
        assert probe.calls == 1 and policy == expected
        assert (warning is None) == (expected == "mixed_bfloat16")
        if machine.bf16_units and warning:
            assert "oneDNN" in warning
    # the threshold: bfloat16 must be clearly faster than float32 in the probe
    assert decide_precision("auto", False, CpuInfo(), True, Probe(0.95))[0] == "float32"


def test_an_isa_cap_below_amx_leaves_the_decision_to_the_probe():
    amx = cpu_info(INTEL_AMX)
    for cap in ("AVX512_CORE_BF16", "avx2", "AVX512_CORE"):
        capped = cpu.as_onednn_sees_it(amx, {"ONEDNN_MAX_CPU_ISA": cap})
        assert capped.bf16_units is None and "amx_bf16" not in capped.flags
    assert cpu.as_onednn_sees_it(amx, {"DNNL_MAX_CPU_ISA": "AVX2"}).bf16_units is None
    for environ in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, {"ONEDNN_MAX_CPU_ISA": "ALL"}):
        assert cpu.as_onednn_sees_it(amx, environ) == amx


def test_onednn_is_turned_on_for_avx2_cpus_without_avx512_unless_the_user_chose():
    assert cpu.onednn_default(cpu_info(AMD_ZEN2), {}) == "1"  # AVX2, no AVX-512: TF leaves it off
    for user in ("0", "1", ""):  # the user's value, whatever it is, wins
        assert cpu.onednn_default(cpu_info(AMD_ZEN2), {"TF_ENABLE_ONEDNN_OPTS": user}) is None
    for text in (INTEL_AMX, SKYLAKE, AMD_ZEN4):  # AVX-512: TensorFlow's own default (on)
        assert cpu.onednn_default(cpu_info(text), {}) is None
    assert cpu.onednn_default(cpu_info(GRAVITON3), {}) is None  # not x86
    assert cpu.onednn_default(CpuInfo(), {}) is None  # flags unknown
    assert cpu.onednn_default(CpuInfo(flags=frozenset({"sse2", "avx"})), {}) is None  # no AVX2
    environ = {}
    cpu.enable_onednn_where_faster(environ)
    assert environ == ({"TF_ENABLE_ONEDNN_OPTS": "1"}
                       if cpu.onednn_default(cpu.this_cpu(), {}) else {})
    environ = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    cpu.enable_onednn_where_faster(environ)
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": "0"}


@pytest.mark.slow
def test_the_command_line_decides_onednn_before_tensorflow_starts():
    """`import ke_tf.cli` (every entry point's first import) sets TF_ENABLE_ONEDNN_OPTS before
    TensorFlow reads it: TensorFlow then runs oneDNN exactly when this CPU should."""
    probe = ("import os, ke_tf.cli; from ke_tf import precision; "
             "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), precision.onednn_enabled())")
    expected = cpu.onednn_default(cpu.this_cpu(), {})
    for user, want in ((None, expected), ("0", "0")):
        env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        if user is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = user
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, check=True, timeout=300).stdout.split()
        assert out[0] == str(want)
        if want is not None:  # on AVX-512 CPUs TensorFlow's own default (on) stays
            assert out[1] == str(want == "1")


def test_precision_policy_warns_once_a_process(monkeypatch):
    monkeypatch.setattr(precision, "this_cpu", lambda: cpu_info(AMD_ZEN2))
    monkeypatch.setattr(precision, "onednn_enabled", lambda: False)
    monkeypatch.setattr(precision, "bf16_probe", Probe(4.2))
    monkeypatch.setattr(precision, "_warned", set())
    cfg = C.RunConfig(mixed_precision="auto")
    with pytest.warns(precision.PrecisionWarning, match="4.20x"):
        assert precision.precision_policy(cfg) == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.precision_policy(cfg) == "float32"  # no second warning
        assert precision.precision_policy(C.RunConfig(mixed_precision="force")) == (
            "mixed_bfloat16")
        assert precision.precision_policy(C.RunConfig()) == "float32"


def test_the_real_probe_returns_a_positive_ratio():
    ratio = precision.bf16_probe(0.05)
    assert math.isfinite(ratio) and ratio > 0


def test_old_boolean_values_still_load():
    flat = C.RunConfig().to_flags()
    assert flat["mixed_precision"] == "off"
    assert C.RunConfig.from_flags(dict(flat, mixed_precision=True)).mixed_precision == "auto"
    assert C.RunConfig.from_flags(dict(flat, mixed_precision=False)).mixed_precision == "off"
    assert C.RunConfig(mixed_precision=True).validate().mixed_precision == "auto"
    with pytest.raises(C.ConfigError, match="mixed_precision"):
        C.RunConfig(mixed_precision="fast").validate()


@pytest.mark.parametrize("argv, value", [([], "off"), (["--mixed_precision"], "auto"),
                                         (["--nomixed_precision"], "off"),
                                         (["--mixed_precision=force"], "force"),
                                         (["--mixed_precision=auto"], "auto"),
                                         (["--mixed_precision=true"], "auto"),
                                         (["--mixed_precision=false"], "off")])
def test_flag_spellings(argv, value):
    from absl import flags
    from ke_tf import main

    fv = flags.FlagValues()
    flags.DEFINE_flag(main._MixedPrecisionFlag("off", "test"), flag_values=fv)
    fv(["prog"] + argv)
    assert fv.mixed_precision == value
    assert fv["mixed_precision"].serialize() == f"--mixed_precision={value}"


def test_a_bad_flag_value_is_refused():
    from absl import flags
    from ke_tf import main

    fv = flags.FlagValues()
    flags.DEFINE_flag(main._MixedPrecisionFlag("off", "test"), flag_values=fv)
    with pytest.raises(flags.IllegalFlagValueError, match="off|auto|force"):
        fv(["prog", "--mixed_precision=fast"])


def test_a_run_on_a_cpu_without_bfloat16_units_trains_float32_and_says_why(tmp_path,
                                                                             monkeypatch):
    from ke_tf.generations import GenerationRunner

    monkeypatch.setattr(precision, "this_cpu", lambda: cpu_info(AMD_ZEN2))
    monkeypatch.setattr(precision, "bf16_probe", Probe(5.0))
    monkeypatch.setattr(precision, "_warned", set())
    cfg = conftest.tiny_config(tmp_path, mixed_precision="auto", export=False,
                               train=dict(generations=1))
    with pytest.warns(precision.PrecisionWarning, match="AMD EPYC 7B12"):
        runner = GenerationRunner(cfg, verbose=False)
    conv = runner.network.get_layer("conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("float32", "float32")
