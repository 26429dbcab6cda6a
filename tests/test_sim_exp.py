"""The fused sim-exp kernel against the float64 torch reference, under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch

from rewardq import kernels
from rewardq.kernels.reference import sim_exp_reward_torch
from rewardq.kernels.sim_exp import sim_exp_reward_triton

# Odd shapes: 1, primes, near powers of two; d up to 1031 (> 1024, so the d loop runs twice), K up to 16.
SHAPES = [(1, 1, 1), (1, 1, 384), (7, 3, 31), (37, 4, 384), (127, 1, 128), (257, 2, 65), (64, 16, 257), (5, 1, 1031),
          (3, 2, 1024)]  # fmt: skip
# Forward accumulates in fp32 whatever the input dtype; gradients are stored in the input dtype.
TOL = {
    torch.float32: {"fwd": (1e-5, 1e-5), "grad": (1e-5, 1e-4)},
    torch.float16: {"fwd": (1e-5, 1e-5), "grad": (2e-3, 1e-2)},
    torch.bfloat16: {"fwd": (1e-5, 1e-5), "grad": (2e-2, 5e-2)},
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bsz, k, d = shape
    a = torch.randn(bsz, k, d, generator=g, dtype=torch.float64)
    b = torch.randn(bsz, k, d, generator=g, dtype=torch.float64)
    b[0] = 0.8 * a[0] + 0.2 * b[0]  # one strongly similar pair
    alpha = torch.randn(k, generator=g, dtype=torch.float64)
    weight = torch.randn(k, generator=g, dtype=torch.float64)
    # Round once to the tested dtype so the float64 reference sees exactly the kernel's inputs.
    return a.to(dtype), b.to(dtype), alpha.float(), weight.float()


def _close(got, want, atol_rtol, what):
    atol, rtol = atol_rtol
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.double(), want, atol=atol * scale.item(), rtol=rtol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_float64_reference(shape, dtype):
    a, b, alpha, weight = _inputs(shape, dtype)
    leaves = [t.clone().requires_grad_() for t in (a, b, alpha, weight)]
    reward, cos = sim_exp_reward_triton(*leaves)
    assert reward.dtype == torch.float32 and cos.dtype == torch.float32
    assert reward.shape == shape[:1] and cos.shape == shape[:2]

    ref_leaves = [t.double().requires_grad_() for t in (a, b, alpha, weight)]
    ref_reward, ref_cos = sim_exp_reward_torch(*ref_leaves)
    _close(reward, ref_reward, TOL[dtype]["fwd"], "reward")
    _close(cos, ref_cos, TOL[dtype]["fwd"], "cos")

    # Upstream gradients into both outputs, as a loss over R and a penalty on cos would give.
    g_r = torch.randn(shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_c = torch.randn(shape[:2], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.autograd.backward([reward, cos], [g_r.float(), g_c.float()])
    torch.autograd.backward([ref_reward, ref_cos], [g_r, g_c])
    for name, got, want in zip(("a", "b", "alpha", "weight"), leaves, ref_leaves, strict=True):
        assert got.grad.dtype == got.dtype
        tol = TOL[dtype]["grad"] if name in ("a", "b") else (1e-4, 1e-4)
        _close(got.grad, want.grad, tol, f"grad {name}")


def test_reward_only_backward_and_no_grad_forward():
    a, b, alpha, weight = _inputs((33, 2, 48), torch.float32)
    with torch.no_grad():
        r0, _ = sim_exp_reward_triton(a, b, alpha, weight)
    a1 = a.clone().requires_grad_()
    r1, _ = sim_exp_reward_triton(a1, b, alpha, weight)
    r1.sum().backward()
    a2 = a.double().requires_grad_()
    sim_exp_reward_torch(a2, b.double(), alpha.double(), weight.double())[0].sum().backward()
    torch.testing.assert_close(r0, r1.detach())
    torch.testing.assert_close(a1.grad.double(), a2.grad, atol=1e-6, rtol=1e-4)


# d cos/d a = b/eps once |a||b| is clamped: finite in fp32, may overflow fp16's range (inf, never NaN).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_zero_vectors_give_finite_results_never_nan(dtype):
    a, b, alpha, weight = _inputs((6, 2, 40), dtype)
    a[1] = 0
    b[2, 1] = 0
    a[3] = 0
    b[3] = 0
    leaves = [t.clone().requires_grad_() for t in (a, b, alpha, weight)]
    reward, cos = sim_exp_reward_triton(*leaves)
    assert torch.isfinite(reward).all() and torch.isfinite(cos).all()
    assert cos[1].abs().max() == 0 and cos[3].abs().max() == 0
    ref_reward, _ = sim_exp_reward_torch(a.double(), b.double(), alpha.double(), weight.double())
    _close(reward, ref_reward, (1e-5, 1e-5), "reward")
    reward.sum().backward()
    for t in leaves:
        assert not torch.isnan(t.grad).any()


def test_non_contiguous_inputs_need_no_copy():
    base_a, base_b, alpha, weight = _inputs((40, 3, 200), torch.float32)
    cases = {
        "every other element of d": (base_a[:, :, ::2], base_b[:, :, ::2]),
        "padded rows": (base_a[:, :, :97], base_b[:, :, 3:100]),
        "K-major layout": (base_a.transpose(0, 1).contiguous().transpose(0, 1), base_b),
        "every third batch row": (base_a[::3], base_b[::3]),
    }
    for name, (a, b) in cases.items():
        assert not (a.is_contiguous() and b.is_contiguous()), name
        reward, cos = sim_exp_reward_triton(a, b, alpha, weight)
        ref_reward, ref_cos = sim_exp_reward_torch(a.double(), b.double(), alpha.double(), weight.double())
        _close(reward, ref_reward, (1e-5, 1e-5), name)
        _close(cos, ref_cos, (1e-5, 1e-5), name)


def test_untrained_model_is_the_seed_formula():
    a, b, _, _ = _inputs((9, 1, 16), torch.float32)
    reward, cos = sim_exp_reward_triton(a, b, torch.ones(1), torch.ones(1))
    want = torch.exp(-torch.nn.functional.cosine_similarity(a[:, 0].double(), b[:, 0].double(), dim=-1))
    _close(reward, want, (1e-6, 1e-6), "seed formula")


def test_empty_batch():
    a = torch.empty(0, 2, 8)
    reward, cos = sim_exp_reward_triton(a, a, torch.ones(2), torch.ones(2))
    assert reward.shape == (0,) and cos.shape == (0, 2)


def test_bad_shapes_and_dtypes_are_refused():
    a = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="must both be"):
        sim_exp_reward_triton(a, torch.randn(4, 2, 9), torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        sim_exp_reward_triton(a, a.half(), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="alpha and weight"):
        sim_exp_reward_triton(a, a, torch.ones(3), torch.ones(2))


def test_dispatch_follows_rewardq_kernel(monkeypatch):
    a, b, alpha, weight = _inputs((11, 2, 24), torch.float32)
    monkeypatch.delenv("REWARDQ_KERNEL", raising=False)
    assert kernels.backend("cpu") == "torch" and kernels.backend("cuda") == "triton"
    outs = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("REWARDQ_KERNEL", choice)
        assert kernels.backend("cpu") == choice
        outs[choice] = kernels.sim_exp_reward(a, b, alpha, weight)
    torch.testing.assert_close(outs["torch"][0], outs["triton"][0], atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("REWARDQ_KERNEL", "cuda-please")
    with pytest.raises(ValueError, match="REWARDQ_KERNEL"):
        kernels.backend("cpu")
    monkeypatch.setenv("REWARDQ_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.backend("cpu")
