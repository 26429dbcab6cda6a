"""Triton kernels for the fused sim-exp reward, their host launchers and the autograd Function.

One program handles BLOCK_B batch rows and loops over the K heads and over d in BLOCK_D
chunks, so a[B, K, d] and b[B, K, d] are read once, in place (any strides), and only
R[B], cos[B, K] (and the squared norms when a backward will follow) are written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rewardq.kernels import EPS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_tiles(a_ptr, b_ptr, rows, k, c, m, s_ab, s_ak, s_ad, s_bb, s_bk, s_bd):
    """The [BLOCK_B, BLOCK_D] tiles of a and b for head k and columns c, in place (any strides), as fp32."""
    x = tl.load(a_ptr + rows[:, None] * s_ab + k * s_ak + c[None, :] * s_ad, mask=m, other=0.0)
    y = tl.load(b_ptr + rows[:, None] * s_bb + k * s_bk + c[None, :] * s_bd, mask=m, other=0.0)
    return x.to(tl.float32), y.to(tl.float32)


@triton.jit
def _sim_exp_fwd_kernel(
    a_ptr, b_ptr, alpha_ptr, w_ptr,
    r_ptr, cos_ptr, sa_ptr, sb_ptr,
    B, K, D,
    s_ab, s_ak, s_ad,
    s_bb, s_bk, s_bd,
    eps,
    SAVE_NORMS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # int64 row offsets: B*K*d may exceed 2**31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_D)
    reward = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k in range(K):
        dot = tl.zeros([BLOCK_B], dtype=tl.float32)
        sa = tl.zeros([BLOCK_B], dtype=tl.float32)
        sb = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m = row_ok[:, None] & (c[None, :] < D)
            x, y = _load_tiles(a_ptr, b_ptr, rows, k, c, m, s_ab, s_ak, s_ad, s_bb, s_bk, s_bd)
            dot += tl.sum(x * y, axis=1)
            sa += tl.sum(x * x, axis=1)
            sb += tl.sum(y * y, axis=1)
        cos = dot / tl.maximum(tl.sqrt(sa) * tl.sqrt(sb), eps)
        alpha = tl.load(alpha_ptr + k)
        w = tl.load(w_ptr + k)
        reward += w * tl.exp(-alpha * cos)
        tl.store(cos_ptr + rows * K + k, cos, mask=row_ok)
        if SAVE_NORMS:
            tl.store(sa_ptr + rows * K + k, sa, mask=row_ok)
            tl.store(sb_ptr + rows * K + k, sb, mask=row_ok)
    tl.store(r_ptr + rows, reward, mask=row_ok)


@triton.jit
def _sim_exp_bwd_kernel(
    a_ptr, b_ptr, alpha_ptr, w_ptr,
    cos_ptr, sa_ptr, sb_ptr, gr_ptr, gcos_ptr,
    ga_ptr, gb_ptr, galpha_ptr, gw_ptr,
    B, K, D,
    s_ab, s_ak, s_ad,
    s_bb, s_bk, s_bd,
    eps,
    HAS_GCOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_D)
    gr = tl.load(gr_ptr + rows, mask=row_ok, other=0.0)
    for k in range(K):
        cos = tl.load(cos_ptr + rows * K + k, mask=row_ok, other=0.0)
        sa = tl.load(sa_ptr + rows * K + k, mask=row_ok, other=0.0)
        sb = tl.load(sb_ptr + rows * K + k, mask=row_ok, other=0.0)
        alpha = tl.load(alpha_ptr + k)
        w = tl.load(w_ptr + k)
        e = tl.exp(-alpha * cos)
        # Per-program partial sums; the host adds them up (deterministic, no atomics).
        tl.store(galpha_ptr + pid * K + k, tl.sum(gr * (-w * cos * e), axis=0))
        tl.store(gw_ptr + pid * K + k, tl.sum(gr * e, axis=0))
        g = gr * (-w * alpha * e)
        if HAS_GCOS:
            g += tl.load(gcos_ptr + rows * K + k, mask=row_ok, other=0.0)
        norm = tl.sqrt(sa) * tl.sqrt(sb)
        clamped = norm < eps
        # d cos / d a = b / n - cos * a / |a|^2 while |a||b| >= eps; b / eps once clamped.
        g_n = g / tl.maximum(norm, eps)
        g_a = tl.where(clamped, 0.0, g * cos / tl.where(clamped, 1.0, sa))
        g_b = tl.where(clamped, 0.0, g * cos / tl.where(clamped, 1.0, sb))
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m = row_ok[:, None] & (c[None, :] < D)
            x, y = _load_tiles(a_ptr, b_ptr, rows, k, c, m, s_ab, s_ak, s_ad, s_bb, s_bk, s_bd)
            dx = g_n[:, None] * y - g_a[:, None] * x
            dy = g_n[:, None] * x - g_b[:, None] * y
            out = rows[:, None] * K * D + k * D + c[None, :]
            tl.store(ga_ptr + out, dx.to(ga_ptr.dtype.element_ty), mask=m)
            tl.store(gb_ptr + out, dy.to(gb_ptr.dtype.element_ty), mask=m)


def _blocks(d: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps). See kernels/README.md for the reasoning."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 1024)
    if device.type == "cuda":
        # ~4k elements per operand per program: enough loads in flight per SM at d=384.
        block_b = max(1, min(64, 4096 // block_d))
        return block_b, block_d, 4
    # The interpreter pays per program and per op, not per element: few, wide programs.
    block_b = max(1, min(256, 32768 // block_d))
    return block_b, block_d, 1


def _check(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [B, K, d]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in _DTYPES or b.dtype != a.dtype:
        raise TypeError(f"a and b must share one dtype of {_DTYPES}; got {a.dtype} and {b.dtype}")
    k = a.shape[1]
    if alpha.shape != (k,) or weight.shape != (k,):
        raise ValueError(f"alpha and weight must be [{k}]; got {tuple(alpha.shape)} and {tuple(weight.shape)}")
    devices = {t.device for t in (a, b, alpha, weight)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def sim_exp_fwd(
    a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, save_norms: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    _check(a, b, alpha, weight)
    bsz, k, d = a.shape
    dev = a.device
    reward = torch.empty(bsz, device=dev, dtype=torch.float32)
    cos = torch.empty(bsz, k, device=dev, dtype=torch.float32)
    sa = torch.empty(bsz, k, device=dev, dtype=torch.float32) if save_norms else cos
    sb = torch.empty(bsz, k, device=dev, dtype=torch.float32) if save_norms else cos
    if bsz == 0 or k == 0:
        reward.zero_()
        return reward, cos, (sa if save_norms else None), (sb if save_norms else None)
    block_b, block_d, warps = _blocks(d, dev)
    alpha32 = alpha.detach().to(torch.float32).contiguous()
    w32 = weight.detach().to(torch.float32).contiguous()
    _sim_exp_fwd_kernel[(triton.cdiv(bsz, block_b),)](
        a, b, alpha32, w32, reward, cos, sa, sb, bsz, k, d,
        *a.stride(), *b.stride(), EPS,
        SAVE_NORMS=save_norms, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return reward, cos, (sa if save_norms else None), (sb if save_norms else None)


def sim_exp_bwd(
    a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor,
    cos: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
    g_reward: torch.Tensor, g_cos: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    bsz, k, d = a.shape
    dev = a.device
    ga = torch.empty((bsz, k, d), device=dev, dtype=a.dtype)
    gb = torch.empty((bsz, k, d), device=dev, dtype=b.dtype)
    block_b, block_d, warps = _blocks(d, dev)
    n_prog = triton.cdiv(bsz, block_b)
    g_alpha = torch.zeros((max(n_prog, 1), k), device=dev, dtype=torch.float32)
    g_w = torch.zeros((max(n_prog, 1), k), device=dev, dtype=torch.float32)
    if bsz and k:
        g_reward = g_reward.to(torch.float32).contiguous()
        g_cos = None if g_cos is None else g_cos.to(torch.float32).contiguous()
        _sim_exp_bwd_kernel[(n_prog,)](
            a, b, alpha.detach().to(torch.float32).contiguous(), weight.detach().to(torch.float32).contiguous(),
            cos, sa, sb, g_reward, g_cos if g_cos is not None else g_reward,
            ga, gb, g_alpha, g_w, bsz, k, d,
            *a.stride(), *b.stride(), EPS,
            HAS_GCOS=g_cos is not None, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    else:
        ga.zero_()
        gb.zero_()
    return ga, gb, g_alpha.sum(0).to(alpha.dtype), g_w.sum(0).to(weight.dtype)


class SimExpReward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, alpha, weight):  # type: ignore[override]
        needs_grad = any(ctx.needs_input_grad)
        reward, cos, sa, sb = sim_exp_fwd(a, b, alpha, weight, save_norms=needs_grad)
        if needs_grad:
            ctx.save_for_backward(a, b, alpha, weight, cos, sa, sb)
        return reward, cos

    @staticmethod
    def backward(ctx, g_reward, g_cos):  # type: ignore[override]
        a, b, alpha, weight, cos, sa, sb = ctx.saved_tensors
        if g_reward is None:
            g_reward = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
        ga, gb, g_alpha, g_w = sim_exp_bwd(a, b, alpha, weight, cos, sa, sb, g_reward, g_cos)
        return ga, gb, g_alpha, g_w


def sim_exp_reward_triton(
    a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if a.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernel on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)")
    return SimExpReward.apply(a, b, alpha, weight)
