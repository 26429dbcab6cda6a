"""The encoder's precision: exact (fp32, the default) or fast (bf16 where the hardware runs it natively)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _cpuinfo_field(cpuinfo: Path, name: str) -> str:
    """The first CPU's ``name`` line of /proc/cpuinfo, after the colon ("" where it cannot be read or has none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)), "")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    return set(_cpuinfo_field(cpuinfo, "flags").split())


def matrix_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The features the fast profile's speed depends on (AMX, bf16, VNNI), sorted: what the benchmarks report."""
    return sorted(f for f in cpu_flags(cpuinfo) if "amx" in f or "bf16" in f or "vnni" in f)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (empty where it cannot be read): what the benchmarks report."""
    return _cpuinfo_field(cpuinfo, "model name")


def cpu_bf16_flag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU feature that makes bf16 matrix products native here (AMX first, then AVX512-BF16), or None."""
    flags = cpu_flags(cpuinfo)
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_autocast(settings: Any, device_type: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What the encoder runs in: REWARDQ_AUTOCAST when set; else bf16 for REWARDQ_PRECISION=fast on a GPU or on a
    CPU with native bf16 (fp32 elsewhere, saying why); else fp32 ("off"). REWARDQ_PRECISION=auto, the default, is
    fast on a GPU and exact on a CPU."""
    if settings.autocast != "off":
        return str(settings.autocast)
    if settings.precision == "exact" or (settings.precision == "auto" and device_type != "cuda"):
        return "off"
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    flag = cpu_bf16_flag(cpuinfo)
    if flag is None:
        log.warning(
            "REWARDQ_PRECISION=fast: this CPU has neither AMX nor AVX512-BF16, where bf16 would be slower than "
            "fp32; the encoder stays in fp32 (exact)"
        )
        return "off"
    log.info("REWARDQ_PRECISION=fast: the encoder runs in bf16 (%s), in fixed shapes", flag)
    return "bf16"
