"""train.precision=auto: bf16 exactly where the hardware computes it natively."""

from __future__ import annotations

from pathlib import Path

from pipeline import precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n")
    assert {"avx2", "avx512_bf16"} <= precision.cpu_flags(cpuinfo)
    assert precision.cpu_flags(tmp_path / "absent") == set()
    assert precision.cpu_has_native_bf16({"avx2", "amx_bf16"})
    assert not precision.cpu_has_native_bf16({"avx2", "avx512f", "f16c"})  # AVX-512 without BF16 emulates it


def test_auto_follows_the_hardware():
    assert precision.resolve("auto", "cpu", cpu_bf16=False).name == "fp32"
    assert precision.resolve("auto", "cpu", cpu_bf16=True).name == "bf16"
    assert precision.resolve("auto", "gpu", gpu_has_bf16=True).name == "bf16"
    assert precision.resolve("auto", "gpu", gpu_has_bf16=False).name == "fp32"  # auto never needs a loss scale
    chosen = precision.resolve("auto", "cpu", cpu_bf16=False)
    assert "no native bf16" in chosen.describe() and not chosen.autocast


def test_an_explicit_setting_is_kept_whatever_the_hardware():
    for name in ("fp32", "bf16", "fp16"):
        chosen = precision.resolve(name, "cpu", cpu_bf16=False)
        assert (chosen.name, chosen.reason, chosen.autocast) == (name, "set in the config", name != "fp32")
