"""The chunked log-prob kernel (Triton under TRITON_INTERPRET=1, and the chunked torch path) against float64 eager
logits -> log_softmax -> gather, on odd shapes and vocabularies that are not a multiple of any block."""

from __future__ import annotations

import pytest
import torch

from rewardq import kernels
from rewardq.kernels.logprob import token_logprobs_triton
from rewardq.kernels.reference import token_logprobs_torch

# (tokens N, hidden H, vocabulary V): 1, primes, near powers of two; V never a multiple of the 16..256 blocks.
SHAPES = [(1, 1, 1), (1, 16, 3), (7, 33, 101), (37, 64, 1000), (65, 24, 257), (130, 48, 517), (16, 100, 4099)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}  # vs float64 on the same rounded inputs


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets, b


def _eager64(hidden, weight, targets, bias=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_float64_eager(shape, dtype):
    hidden, weight, targets, _ = _inputs(*shape, dtype)
    got = token_logprobs_triton(hidden, weight, targets)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), _eager64(hidden, weight, targets), atol=TOL[dtype], rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_torch_path_matches_float64_eager_at_any_block(shape):
    hidden, weight, targets, bias = _inputs(*shape, torch.float32, bias=True)
    want = _eager64(hidden, weight, targets, bias)
    for block_n, block_v in ((2, 13), (64, 100), (1024, 8192)):
        got = token_logprobs_torch(hidden, weight, targets, bias, block_n=block_n, block_v=block_v)
        # Narrow chunks fold hundreds of fp32 logaddexps in a row: relative 5e-5 of a log-prob near -15.
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=5e-5)
    exact = token_logprobs_torch(hidden.double(), weight.double(), targets, bias.double(), block_n=5, block_v=11)
    torch.testing.assert_close(exact, want, atol=1e-12, rtol=1e-12)


def test_bias_strided_hidden_and_int32_targets():
    hidden, weight, targets, bias = _inputs(40, 32, 300, torch.float32, seed=3, bias=True)
    wide = torch.randn(40, 80)
    wide[:, 5:37] = hidden
    strided = wide[:, 5:37]  # a row stride of 80: read in place
    assert not strided.is_contiguous()
    got = token_logprobs_triton(strided, weight, targets.int(), bias)
    torch.testing.assert_close(got.double(), _eager64(hidden, weight, targets, bias), atol=2e-5, rtol=1e-5)


def test_extreme_logits_stay_finite():
    hidden, weight, targets, _ = _inputs(9, 16, 50, torch.float32, seed=4)
    hidden = hidden * 300  # logits in the thousands: a naive exp would overflow
    got = token_logprobs_triton(hidden, weight, targets)
    assert torch.isfinite(got).all() and (got <= 1e-6).all()
    torch.testing.assert_close(got.double(), _eager64(hidden, weight, targets), atol=1e-3, rtol=1e-5)


def test_dispatch_and_bad_inputs(monkeypatch):
    hidden, weight, targets, _ = _inputs(12, 16, 70, torch.float32, seed=5)
    want = _eager64(hidden, weight, targets)
    for choice in ("torch", "triton"):
        monkeypatch.setenv("REWARDQ_KERNEL", choice)
        torch.testing.assert_close(kernels.token_logprobs(hidden, weight, targets).double(), want, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="targets must lie"):
        token_logprobs_triton(hidden, weight, torch.full((12,), 70))
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        token_logprobs_triton(hidden, weight[:, :8], targets)
    with pytest.raises(TypeError):
        token_logprobs_triton(hidden.half(), weight, targets)
    assert token_logprobs_triton(hidden[:0], weight, targets[:0]).shape == (0,)


def test_the_cuda_tiles_fit_shared_memory_and_compute_the_same_log_probs():
    from rewardq.kernels.logprob import cuda_blocks, token_logprobs_fwd

    # An H200's 227 KiB per block: the 128 x 256 tiles the sweep chose for 2-byte inputs, smaller ones for fp32, for
    # GPUs before Hopper and for GPUs with less shared memory (an RTX 4090's 99 KiB; the 48 KiB every CUDA GPU has).
    assert cuda_blocks(232_448, 2) == (128, 256, 64, 8, 3)
    assert cuda_blocks(232_448, 4) == (64, 128, 64, 8, 3)
    assert cuda_blocks(166_912, 2, major=8) == (64, 128, 64, 8, 3)  # an A100: the large tiles were not measured there
    assert cuda_blocks(101_376, 2, major=8) == (64, 128, 64, 8, 3)
    assert cuda_blocks(49_152, 4, major=7) == (32, 64, 32, 4, 2)
    # The chosen tiles, run by the interpreter on an odd shape: rows and vocabulary that fill no tile.
    hidden, weight, targets, _ = _inputs(37, 64, 1000, torch.bfloat16, seed=3)
    for cfg in {cuda_blocks(232_448, 2), cuda_blocks(232_448, 4)}:
        got = token_logprobs_fwd(hidden, weight, targets, blocks=cfg)[0]
        assert (got.double() - _eager64(hidden, weight, targets)).abs().max() < 2e-5, cfg
