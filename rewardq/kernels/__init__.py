"""Fused kernels: the sim-exp reward R = sum_k w_k * exp(-alpha_k * cos_k), and token log-probabilities under
an LM head computed in vocabulary chunks (never the whole [tokens x vocab] logits).

Kept light on purpose: transformers probes for a package named ``kernels`` (Hugging Face
publishes one) and may import it, so this module imports nothing heavy and has no side
effects; the Triton and torch implementations load on first call.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["EPS", "backend", "path", "sim_exp_reward", "token_logprobs"]

EPS = 1e-8
_BACKENDS = ("auto", "triton", "torch")


def backend(device_type: str = "cpu") -> str:
    """Which implementation serves a tensor on ``device_type``: 'triton' or 'torch'.

    ``REWARDQ_KERNEL`` forces one; ``auto`` picks compiled Triton on CUDA and the torch
    reference elsewhere. Forcing ``triton`` on CPU needs ``TRITON_INTERPRET=1``.
    """
    choice = os.environ.get("REWARDQ_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"REWARDQ_KERNEL must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if choice == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("REWARDQ_KERNEL=triton on a CPU tensor needs TRITON_INTERPRET=1")
    return choice


FALLBACK_ENV = "REWARDQ_KERNEL_FALLBACK"  # set by `rewardq worker` for kernels that failed their self-check


def path(kernel: str, device_type: str = "cpu") -> str:
    """What serves ``kernel`` ('sim_exp' or 'logprob') here: ``backend``, except that a kernel whose compiled
    version failed this worker's self-check (kernels.selfcheck) runs the torch path."""
    chosen = backend(device_type)
    if chosen == "triton" and kernel in os.environ.get(FALLBACK_ENV, "").split(","):
        return "torch"
    return chosen


def sim_exp_reward(
    a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward R[B] (float32) and cos[B, K] (float32) for a[B, K, d], b[B, K, d].

    Differentiable in a, b, alpha and weight on both backends.
    """
    if path("sim_exp", a.device.type) == "triton":
        from rewardq.kernels.sim_exp import sim_exp_reward_triton

        return sim_exp_reward_triton(a, b, alpha, weight)
    from rewardq.kernels.reference import sim_exp_reward_torch

    return sim_exp_reward_torch(a, b, alpha, weight)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(targets[i]) under logits = hidden @ weight.T (+ bias): float32 [N] for hidden[N, H], weight[V, H].

    Forward only. Dispatched like ``sim_exp_reward``: both paths work in vocabulary chunks.
    """
    if path("logprob", hidden.device.type) == "triton":
        from rewardq.kernels.logprob import token_logprobs_triton

        return token_logprobs_triton(hidden, weight, targets, bias)
    from rewardq.kernels.reference import token_logprobs_torch

    return token_logprobs_torch(hidden, weight, targets, bias).float()
