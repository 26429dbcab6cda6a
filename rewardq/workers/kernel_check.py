"""The worker's kernel self-check at start (kernels.selfcheck): compiled kernels are proven on this device before the
worker takes work. Run by `rewardq worker` in a child process, so CUDA is never initialised in the process that forks
the pool; a kernel that fails runs the torch path in every pool process (REWARDQ_KERNEL_FALLBACK), or, with
REWARDQ_KERNEL=triton, the worker refuses to start."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from rewardq.kernels import FALLBACK_ENV
from rewardq.kernels.selfcheck import KERNELS, Check, describe_failures, failed_kernels, run_in_child
from rewardq.storage.settings import Settings

log = logging.getLogger(__name__)
_DTYPE = {"fp16": "float16", "bf16": "bfloat16"}


class KernelsUntrusted(RuntimeError):
    """REWARDQ_KERNEL=triton and a compiled kernel failed its self-check: the worker must not start."""


@dataclass
class Outcome:
    device: str
    checks: list[Check] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    message: str = ""


def triton_device(settings: Settings) -> str | None:
    """The device whose compiled kernels this worker would run ('cuda', or 'cpu' under TRITON_INTERPRET=1 with
    REWARDQ_KERNEL=triton), or None when it runs the torch path anyway. Asks CUDA without initialising it here."""
    if settings.kernel == "torch":
        return None
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() through NVML: safe to fork after
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if settings.kernel == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


def dtypes_in_use(settings: Settings, device: str) -> list[str]:
    """fp32 always (the kernels' inputs in the exact profile), plus the encoder's autocast dtype when one is set."""
    extra = _DTYPE.get(settings.autocast)
    if extra is None and settings.precision in ("fast", "auto") and device == "cuda":
        extra = "bfloat16"
    return ["float32", *([extra] if extra else [])]


def check_kernels(settings: Settings, device: str | None = None, timeout_s: float = 600) -> Outcome | None:
    """Run the self-check for the worker about to start; None when it will run no compiled kernel. Sets the
    fallback for failed kernels, or raises KernelsUntrusted when REWARDQ_KERNEL=triton forbids falling back."""
    device = device or triton_device(settings)
    if device is None:
        return None
    checks = run_in_child(device, dtypes_in_use(settings, device), timeout_s)
    outcome = Outcome(device, checks)
    failed = failed_kernels(checks)
    if not failed:
        log.info("kernel self-check on %s: %d checks passed (%s)", device, len(checks), ", ".join(KERNELS))
        return outcome
    outcome.message = describe_failures(checks)
    if settings.kernel == "triton":
        raise KernelsUntrusted(
            f"kernel self-check failed on {device} and REWARDQ_KERNEL=triton forbids the torch path: {outcome.message}"
        )
    outcome.fallback = failed
    os.environ[FALLBACK_ENV] = ",".join(failed)  # inherited by every pool process forked after this
    log.error(
        "kernel self-check failed on %s; %s run(s) the torch path: %s", device, " and ".join(failed), outcome.message
    )
    try:
        from rewardq.workers import metrics

        metrics.record(settings.redis_url, {"kernel_selfcheck_failures": 1.0})
    except Exception:  # Redis down at start: the log says it
        pass
    return outcome
