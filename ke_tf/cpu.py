"""The CPU a run trains on, as /proc/cpuinfo describes it, and which TensorFlow kernels suit it.

Free of TensorFlow, so that an entry point can decide `TF_ENABLE_ONEDNN_OPTS` before TensorFlow
is imported (TensorFlow reads it once, at import):

- `cpu_info(text)` / `this_cpu()`: `CpuInfo` (model name, x86 family and model, flags).
- `CpuInfo.bf16_units`: whether the CPU has bfloat16 matrix units (what --mixed_precision asks,
  `ke_tf.precision.decide_precision`); `as_onednn_sees_it` drops AMX that ONEDNN_MAX_CPU_ISA
  forbids.
- `onednn_default(cpu, environ)` / `enable_onednn_where_faster()`: TensorFlow 2.21 turns its
  oneDNN CPU kernels off by default on CPUs without AVX-512; on an AVX2 CPU they train ke_tf's
  ResNet18 1.6x faster, so the command line turns them on there unless the user chose.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
from typing import FrozenSet, Mapping, MutableMapping, Optional

# x86 CPU flags of bfloat16 arithmetic: AVX512_BF16 (bfloat16 dot products in AVX-512 registers:
# AMD Zen 4+, Intel Cooper Lake, Sapphire Rapids+) and AMX-BF16 (tile matrix multiply units:
# Intel Sapphire Rapids+). Only AMX made TensorFlow 2.21's bfloat16 training step faster than
# float32 (1.7x in CPU time); with oneDNN held to AVX512_BF16 (ONEDNN_MAX_CPU_ISA) the same step
# took 1.36x float32's CPU time, so a CPU with AVX512_BF16 alone is left to the probe.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AMX_FLAG = "amx_bf16"
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The CPU as /proc/cpuinfo describes it: `model` (its "model name", "" if unknown),
    `family` / `model_number` (x86 "cpu family" / "model", "" if unknown) and `flags` (x86
    "flags", or aarch64 "Features"; empty if unknown)."""

    model: str = ""
    flags: FrozenSet[str] = frozenset()
    family: str = ""
    model_number: str = ""

    @property
    def x86(self) -> bool:
        return "sse2" in self.flags

    @property
    def bf16_units(self) -> Optional[bool]:
        """True: bfloat16 matrix units (AMX_FLAG); False: an x86 CPU without any bfloat16
        arithmetic (no BF16_FLAGS); None: unknown, for the probe to decide (AVX512_BF16
        without AMX, no flags, or not x86)."""
        if not self.x86:
            return None
        if AMX_FLAG in self.flags:
            return True
        return None if any(flag in self.flags for flag in BF16_FLAGS) else False

    def describe(self) -> str:
        """The model and its bfloat16-relevant flags, e.g. "AMD EPYC 7B12 (avx2; no avx512f,
        avx512_bf16, amx_bf16)"."""
        shown = ("avx2", "avx512f") + BF16_FLAGS
        has = [f for f in shown if f in self.flags]
        lacks = [f for f in shown if f not in self.flags]
        parts = ", ".join(has) + ("; " if has and lacks else "") + (
            "no " + ", ".join(lacks) if lacks else "")
        return f"{self.name()} ({parts if self.flags else 'flags unknown'})"

    def name(self) -> str:
        """The model name with its x86 family and model, e.g. "AMD EPYC 7B12 (family 23,
        model 49)" (virtual machines often show a generic name)."""
        ids = ", ".join(f"{k} {v}" for k, v in (("family", self.family),
                                                 ("model", self.model_number)) if v)
        return (self.model or "unknown CPU") + (f" ({ids})" if ids else "")


def cpu_info(text: str) -> CpuInfo:
    """Pure: the text of /proc/cpuinfo -> CpuInfo of its first processor."""
    fields, found = {}, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu family", "model"):
            fields.setdefault(key, " ".join(value.split()))
        elif key in ("flags", "features") and found is None:
            found = frozenset(value.split())
    return CpuInfo(fields.get("model name", ""), found or frozenset(),
                   fields.get("cpu family", ""), fields.get("model", ""))


@functools.lru_cache(maxsize=None)
def this_cpu() -> CpuInfo:
    """CpuInfo of this machine (/proc/cpuinfo; elsewhere only the model, flags unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_info(f.read())
    except OSError:
        return CpuInfo(platform.processor())


def as_onednn_sees_it(cpu: CpuInfo, environ: Mapping[str, str]) -> CpuInfo:
    """Pure: `cpu` without AMX when ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) holds oneDNN below
    it (e.g. AVX512_CORE_BF16, AVX2): its flags then promise what oneDNN will not use."""
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and cap != "ALL" and "AMX" not in cap:
        return dataclasses.replace(cpu, flags=cpu.flags - {AMX_FLAG})
    return cpu


def onednn_default(cpu: CpuInfo, environ: Mapping[str, str]) -> Optional[str]:
    """Pure: the TF_ENABLE_ONEDNN_OPTS value the command line sets for `cpu`, or None to leave
    TensorFlow's own default. "1" on an x86 CPU with AVX2 and without AVX-512, where TensorFlow
    2.21 leaves oneDNN off although it trains faster there: on an AMD EPYC (family 23, model 49;
    AVX2, 2 vCPUs) ke_tf's ResNet18 step (64 px, batch 32) took 12.6-13.1 CPU ms/image with
    oneDNN against 20.7 with TensorFlow's Eigen kernels, and the digits default run 42 s against
    50 s wall. None when the user set the variable (their choice wins, "0" included), on CPUs
    with AVX-512 (TensorFlow already turns oneDNN on there) and on other or unknown CPUs."""
    if ONEDNN_ENV in environ or not cpu.x86:
        return None
    if "avx2" in cpu.flags and "avx512f" not in cpu.flags:
        return "1"
    return None


def enable_onednn_where_faster(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Set TF_ENABLE_ONEDNN_OPTS in `environ` (default os.environ) to `onednn_default` of this
    CPU. Effective only before TensorFlow is imported: entry points call it first."""
    environ = os.environ if environ is None else environ
    value = onednn_default(this_cpu(), environ)
    if value is not None:
        environ[ONEDNN_ENV] = value
