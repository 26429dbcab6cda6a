"""Benchmark the fused sim-exp kernel against torch eager and torch.compile, as a share of copy bandwidth.

On CUDA: forward and forward+backward for B in 1k..4M, K in {1, 4}, d in {384, 1024}, fp16/bf16/fp32;
median times from triton.testing.do_bench; writes benchmarks/results/sim_exp_<gpu>.json and prints a table.
Without a GPU: checks the kernel against the reference under the Triton interpreter at a small size.

    python benchmarks/benchmark_sim_exp.py [--quick] [--max-gb 16]
    python benchmarks/benchmark_sim_exp.py --dry-run   # the GPU code path on CPU at toy sizes (tests use it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def eager(a, b, alpha, weight):
    """What a user would write in plain torch."""
    import torch
    import torch.nn.functional as F

    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-8).float()
    return (weight * torch.exp(-alpha * cos)).sum(-1), cos


def cpu_check() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from rewardq.kernels.reference import sim_exp_reward_torch
    from rewardq.kernels.sim_exp import sim_exp_reward_triton

    print("no CUDA GPU found: checking the Triton kernel under TRITON_INTERPRET=1 at a small size instead")
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(257, 4, 384).to(dtype).requires_grad_()
        b = torch.randn(257, 4, 384).to(dtype).requires_grad_()
        alpha, weight = torch.rand(4).requires_grad_(), torch.rand(4).requires_grad_()
        t0 = time.perf_counter()
        r, c = sim_exp_reward_triton(a, b, alpha, weight)
        r.sum().backward()
        dt = time.perf_counter() - t0
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        r64, _ = sim_exp_reward_torch(a64, b64, alpha.detach().double(), weight.detach().double())
        r64.sum().backward()
        err = (r.double() - r64).abs().max().item()
        gerr = (a.grad.double() - a64.grad).abs().max().item()
        worst = max(worst, err)
        print(f"  {str(dtype):15s} B=257 K=4 d=384: max |R - ref| {err:.2e}, max |dA - ref| {gerr:.2e}, "
              f"interpreter fwd+bwd {dt * 1e3:.0f} ms")  # fmt: skip
    print("OK" if worst < 1e-4 else "MISMATCH")
    return 0 if worst < 1e-4 else 1


DEVICE = "cuda"


def do_bench(fn, warmup: int = 10, rep: int = 100) -> float:
    """Median milliseconds: triton's do_bench on CUDA; a perf_counter median in --dry-run on CPU."""
    if DEVICE == "cuda":
        from triton.testing import do_bench as triton_bench

        return float(triton_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(numel: int = 2**30) -> float:
    """Device-to-device copy of a 2 GiB fp16 buffer, GB/s counting the read and the write."""
    import torch

    src = torch.empty(numel, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_case(dtype, k: int, d: int, bsz: int, impls: dict, copy_gbs: float) -> dict:
    """Forward and forward+backward of every implementation on one shape; GB/s and ratios for ours."""
    import torch

    a = torch.randn(bsz, k, d, device=DEVICE, dtype=dtype)
    b = torch.randn(bsz, k, d, device=DEVICE, dtype=dtype)
    alpha = torch.rand(k, device=DEVICE)
    weight = torch.rand(k, device=DEVICE)
    elt = a.element_size()
    in_bytes = 2 * bsz * k * d * elt
    out_bytes = 4 * bsz + 4 * bsz * k
    r_t, _ = impls["triton"](a, b, alpha, weight)
    r_e, _ = eager(a.float(), b.float(), alpha, weight)
    row = {"dtype": str(dtype).removeprefix("torch."), "K": k, "d": d, "B": bsz,
           "max_err": (r_t - r_e).abs().max().item()}  # fmt: skip
    with torch.no_grad():
        for label, fn in impls.items():
            row[f"fwd_{label}_ms"] = do_bench(lambda fn=fn: fn(a, b, alpha, weight), warmup=10, rep=100)
    leaves = [t.requires_grad_() for t in (a, b, alpha, weight)]
    for label, fn in impls.items():

        def step(fn=fn):
            r, _ = fn(*leaves)
            r.sum().backward()
            for t in leaves:
                t.grad = None

        row[f"fwdbwd_{label}_ms"] = do_bench(step, warmup=10, rep=100)
    # Forward+backward moves: fwd reads a, b; bwd re-reads them and writes their grads; small per-row terms.
    fb_bytes = 3 * in_bytes + out_bytes + 12 * bsz * k
    for phase, nbytes in (("fwd", in_bytes + out_bytes), ("fwdbwd", fb_bytes)):
        gbs = nbytes / row[f"{phase}_triton_ms"] / 1e6
        row[f"{phase}_gbs"] = gbs
        row[f"{phase}_pct_copy"] = 100 * gbs / copy_gbs
        row[f"{phase}_x_eager"] = row[f"{phase}_eager_ms"] / row[f"{phase}_triton_ms"]
        row[f"{phase}_x_compile"] = row[f"{phase}_compile_ms"] / row[f"{phase}_triton_ms"]
    return row


def gpu_bench(quick: bool, max_gb: float, dry_run: bool = False, out_dir: Path = RESULTS) -> int:
    import torch
    import torch._dynamo

    from rewardq.kernels.sim_exp import sim_exp_reward_triton

    name = torch.cuda.get_device_name(0) if not dry_run else "dry-run-cpu"
    copy_gbs = copy_bandwidth(2**30 if not dry_run else 2**20)
    print(f"{name}: device-to-device copy {copy_gbs:.0f} GB/s")
    torch._dynamo.config.cache_size_limit = 256  # one graph per dtype/K/d, never a silent fallback to eager
    # The dry run checks the script's logic, not inductor's CPU codegen: dynamo with the eager backend.
    compiled = torch.compile(eager, dynamic=True, backend="eager" if dry_run else "inductor")
    impls = {"triton": sim_exp_reward_triton, "eager": eager, "compile": compiled}
    sizes = [1 << 14, 1 << 20] if quick else [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22]
    dtypes, ks, ds = (torch.float16, torch.bfloat16, torch.float32), (1, 4), (384, 1024)
    if dry_run:
        sizes, dtypes, ds = [33], (torch.float16, torch.float32), (384,)
    rows = []
    for dtype in dtypes:
        for k in ks:
            for d in ds:
                for bsz in sizes:
                    if 4 * 2 * bsz * k * d * (torch.finfo(dtype).bits // 8) > max_gb * 1e9:
                        continue  # fwd+bwd holds a, b and their grads
                    row = bench_case(dtype, k, d, bsz, impls, copy_gbs)
                    rows.append(row)
                    if not dry_run:
                        torch.cuda.empty_cache()
                    print(f"{row['dtype']:8s} K={k} d={d:4d} B={bsz:8d}  fwd {row['fwd_triton_ms']:.3f} ms "
                          f"{row['fwd_gbs']:6.0f} GB/s {row['fwd_pct_copy']:5.1f}% copy  x{row['fwd_x_eager']:.1f} "
                          f"eager x{row['fwd_x_compile']:.2f} compile | fwd+bwd {row['fwdbwd_gbs']:6.0f} GB/s "
                          f"{row['fwdbwd_pct_copy']:5.1f}% copy  x{row['fwdbwd_x_eager']:.1f} eager "
                          f"x{row['fwdbwd_x_compile']:.2f} compile  err {row['max_err']:.1e}", flush=True)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = out_dir / f"sim_exp_{slug}.json"
    meta = {"gpu": name, "copy_gbs": copy_gbs, "torch": torch.__version__, "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two batch sizes only")
    p.add_argument("--max-gb", type=float, default=40.0, help="skip shapes whose fwd+bwd tensors exceed this")
    p.add_argument("--dry-run", action="store_true", help="run the GPU code path on CPU at toy sizes")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.dry_run:
        global DEVICE
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        return gpu_bench(quick=True, max_gb=args.max_gb, dry_run=True, out_dir=args.out_dir)
    import torch

    if not torch.cuda.is_available():
        return cpu_check()
    return gpu_bench(args.quick, args.max_gb, out_dir=args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
