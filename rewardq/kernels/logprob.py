"""Triton kernel for the log-probability of target tokens under an LM head, without the [tokens x vocab] logits.

One program takes BLOCK_N rows of hidden states and walks the vocabulary in BLOCK_V chunks: each
chunk's logits tile is a [BLOCK_N, BLOCK_V] matmul over the hidden size (in BLOCK_H steps), folded
into an online logsumexp (running max and scaled sum) and into the target's logit, then dropped.
Only logprob[N] (and the logsumexp, for a later backward) is written: the full logits never exist.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, t_ptr,
    out_ptr, lse_ptr,
    N, V, H,
    s_hn, s_hh,
    s_wv, s_wh,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    picked = tl.zeros([BLOCK_N], dtype=tl.float32)
    hs = tl.arange(0, BLOCK_H)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            k = h0 + hs
            k_ok = k < H
            x = tl.load(
                h_ptr + rows[:, None] * s_hn + k[None, :] * s_hh, mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + cols[None, :].to(tl.int64) * s_wv + k[:, None] * s_wh,
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            if UPCAST:  # the interpreter's dot misreads bf16 tiles (numpy has no bf16): widen them first
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif IEEE:  # fp32 inputs: full-precision products (no TF32), so the result matches eager fp32
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], acc, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(out_ptr + rows, picked - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) on CUDA, largest first: the first whose pipelined tiles fit the
# device's shared memory. On an H200 at N 16,384, H 4,096, V 128,256 in bf16 (benchmark_logprob.py's sweep,
# benchmarks/results/selfcheck_h200.json) 128 x 256 tiles took 32.3 ms, 64 x 128 tiles 48.2 ms, eager 37.6 ms. The
# 128 x 256 tiles were measured on Hopper only: older GPUs keep 64 x 128.
_CUDA_BLOCKS = ((128, 256, 64, 8, 3), (64, 128, 64, 8, 3), (32, 64, 32, 4, 2))


def _shared_bytes(cfg: tuple[int, int, int, int, int], itemsize: int) -> int:
    block_n, block_v, block_h, _, stages = cfg
    return stages * (block_n * block_h + block_h * block_v) * itemsize


def cuda_blocks(shared_limit: int, itemsize: int, major: int = 9) -> tuple[int, int, int, int, int]:
    """The largest of _CUDA_BLOCKS whose pipelined input tiles fit ``shared_limit`` bytes of shared memory, on a GPU
    of compute capability ``major``.x (the largest tiles only from Hopper, 9.x, where they were measured)."""
    fits = [c for c in _CUDA_BLOCKS[0 if major >= 9 else 1 :] if _shared_bytes(c, itemsize) <= shared_limit]
    return fits[0] if fits else _CUDA_BLOCKS[-1]


def _blocks(n: int, v: int, h: int, device: torch.device, itemsize: int = 2) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages). tl.dot needs every block dim >= 16."""
    if device.type == "cuda":
        # The matmul runs on tensor cores, the online softmax on the fp32 tile in registers. fp32 inputs (twice the
        # bytes) and GPUs with less shared memory than a Hopper get the smaller tiles.
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
        return cuda_blocks(limit, itemsize, props.major)
    # The interpreter pays per program and per op: few, wide programs.
    block_h = max(16, min(64, triton.next_power_of_2(h)))
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    return block_n, max(16, min(256, triton.next_power_of_2(v))), block_h, 1, 1


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int [{hidden.shape[0]}]; got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype of {_DTYPES}; got {hidden.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}]; got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, targets, *(() if bias is None else (bias,)))}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    blocks: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], logsumexp [N]), both float32, for hidden[N, H], weight[V, H], targets[N]. ``blocks``:
    (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) instead of ``_blocks``' choice (benchmark_logprob.py's sweep)."""
    _check(hidden, weight, targets, bias)
    if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernel on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)")
    n, h = hidden.shape
    v = weight.shape[0]
    out = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    if n == 0:
        return out, lse
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"targets must lie in [0, {v})")
    block_n, block_v, block_h, warps, stages = blocks or _blocks(n, v, h, hidden.device, hidden.element_size())
    _logprob_fwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, bias if bias is not None else weight, targets.contiguous(),
        out, lse, n, v, h,
        *hidden.stride(), *weight.stride(),
        HAS_BIAS=bias is not None, IEEE=hidden.dtype == torch.float32,
        UPCAST=hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def token_logprobs_triton(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return token_logprobs_fwd(hidden, weight, targets, bias)[0]
