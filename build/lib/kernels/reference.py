"""The plain torch formula the Triton kernel must match, and the CPU path."""

from __future__ import annotations

import torch

from kernels import EPS


def sim_exp_reward_torch(
    a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """R = sum_k w_k exp(-alpha_k cos_k), cos_k = <a_k, b_k> / max(|a_k| |b_k|, eps).

    Accumulates in float32 (float64 stays float64, which the tests use as ground truth).
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.to(acc)
    b = b.to(acc)
    dot = (a * b).sum(-1)
    # |a|·|b| as a product of two norms, not sqrt(|a|²|b|²), so it neither overflows nor underflows early.
    norm = a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt()
    cos = dot / norm.clamp_min(eps)
    reward = (weight.to(acc) * torch.exp(-alpha.to(acc) * cos)).sum(-1)
    return reward, cos
