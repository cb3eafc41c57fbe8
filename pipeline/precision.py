"""train.precision: which arithmetic the step runs in, decided once per rank from the hardware.

One rule for both frameworks (this module imports neither): bf16 autocast where the device
computes bf16 natively, float32 elsewhere. On a CPU without native bf16 (AVX2 only) bf16 is
emulated and far slower than float32: on our AVX2 machine one 64 px, batch 64 bf16 step took
44.5 s, the float32 step 1.1 s. fp16 is never picked by auto: it needs a loss
scale, and bf16 has float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# x86 flags of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4/5) and AMX (Sapphire Rapids).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    reason: str  # why auto chose it, or "set in the config"

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: Optional[set[str]] = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve(requested: str, device_type: str, gpu_has_bf16: bool = False, cpu_bf16: Optional[bool] = None) -> Precision:
    """`requested` is train.precision; `device_type` is "cpu" or "gpu" (CUDA or TF's GPU);
    `gpu_has_bf16`: the GPU has bf16 tensor cores (compute capability 8.0 or later)."""
    if requested != "auto":
        return Precision(requested, "set in the config")
    if device_type == "cpu":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        if native:
            return Precision("bf16", "auto: this CPU computes bf16 natively")
        return Precision("fp32", "auto: this CPU has no native bf16, where bf16 runs emulated and slower")
    if gpu_has_bf16:
        return Precision("bf16", "auto: this GPU has bf16 tensor cores")
    return Precision("fp32", "auto: this GPU has no bf16 tensor cores (fp16 needs a loss scale: set it explicitly)")
