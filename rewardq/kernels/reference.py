"""The plain torch formula the Triton kernel must match, and the CPU path."""

from __future__ import annotations

import torch

from rewardq.kernels import EPS


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


def token_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 1024,
    block_v: int = 8192,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) = logit[i, t_i] - logsumexp_v logit[i, v], with logit = hidden @ weight.T + bias.

    Chunked over tokens and vocabulary with a running logsumexp, so at most a [block_n, block_v] tile of
    logits exists at a time: the CPU path scores a large vocabulary in bounded memory. Accumulates in
    float32 (float64 stays float64, the tests' ground truth).
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=acc, device=hidden.device)
    for n0 in range(0, n, block_n):
        h = hidden[n0 : n0 + block_n].to(acc)
        t = targets[n0 : n0 + block_n].long()
        lse = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
        picked = torch.zeros(h.shape[0], dtype=acc, device=h.device)
        for v0 in range(0, v, block_v):
            logits = h @ weight[v0 : v0 + block_v].to(acc).T
            if bias is not None:
                logits += bias[v0 : v0 + block_v].to(acc)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (t >= v0) & (t < v0 + logits.shape[1])
            rows = inside.nonzero().squeeze(-1)
            picked[rows] = logits[rows, t[rows] - v0]
        out[n0 : n0 + block_n] = picked - lse
    return out
