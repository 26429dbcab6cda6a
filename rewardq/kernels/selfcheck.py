"""Prove the compiled kernels before trusting them: run each Triton kernel a worker will use on seeded batches of odd
shapes and strided inputs, in every dtype the configuration uses, against the torch reference in float64, at the
tolerances of the tests (tests/test_sim_exp.py, tests/test_logprob.py).

A worker on CUDA runs this before it takes work (``rewardq worker``, in a child process so that CUDA is never
initialised in the process that forks the pool): a kernel that fails falls back to the torch path for that worker,
or, with REWARDQ_KERNEL=triton, the worker refuses to start. On a CPU it runs under the Triton interpreter
(TRITON_INTERPRET=1), which is how the tests exercise it. REWARDQ_SELFCHECK_INJECT=sim_exp (or logprob) is a testing
aid: that kernel's results are made wrong, so the failure path can be seen without a broken GPU.

    python -m kernels.selfcheck [--dtypes float32,bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

KERNELS = ("sim_exp", "logprob")
# Forward results against float64 on the same rounded inputs (both kernels accumulate in fp32 whatever the input).
TOLERANCE = {"sim_exp": (1e-5, 1e-5), "logprob": (2e-5, 1e-5)}  # (atol, rtol); sim_exp's atol scales with |R|
INJECTED_ERROR = 1e-2


@dataclass
class Check:
    kernel: str
    case: str
    dtype: str
    shape: list[int]
    strided: bool
    max_abs_err: float
    tolerance: float
    ok: bool
    error: str = ""


def _sim_exp_cases(device: torch.device, dtype: torch.dtype) -> list[tuple[str, list[int], bool, Any]]:
    """(name, shape, strided, inputs): odd sizes, d past one block, K up to 16, and views with gaps in memory."""
    out = []
    for n, (bsz, k, d) in enumerate([(1, 1, 7), (37, 3, 385), (130, 16, 129), (5, 1, 1031)]):
        g = torch.Generator().manual_seed(100 + n)
        strided = n % 2 == 1
        width = 2 * d if strided else d
        a = torch.randn(bsz, k, width, generator=g, dtype=torch.float64)
        b = torch.randn(bsz, k, width, generator=g, dtype=torch.float64)
        b[0] = 0.8 * a[0] + 0.2 * b[0]  # one strongly similar pair
        alpha = torch.randn(k, generator=g, dtype=torch.float64).float()
        weight = torch.randn(k, generator=g, dtype=torch.float64).float()
        a, b = a.to(dtype).to(device), b.to(dtype).to(device)
        if strided:  # every other feature: a view whose last stride is 2
            a, b = a[..., ::2], b[..., ::2]
        out.append((f"B{bsz}xK{k}xd{d}", [bsz, k, d], strided, (a, b, alpha.to(device), weight.to(device))))
    return out


def _logprob_cases(device: torch.device, dtype: torch.dtype) -> list[tuple[str, list[int], bool, Any]]:
    """(name, shape, strided, inputs): vocabularies that are no multiple of a block, rows with gaps in memory."""
    out = []
    for n, (tokens, h, v) in enumerate([(1, 16, 3), (37, 64, 1000), (130, 48, 4099)]):
        g = torch.Generator().manual_seed(200 + n)
        strided = n % 2 == 1
        hidden = torch.randn(tokens * (2 if strided else 1), h, generator=g, dtype=torch.float64)
        weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3
        targets = torch.randint(0, v, (tokens,), generator=g)
        hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
        if strided:  # every other row
            hidden = hidden[::2]
        out.append((f"N{tokens}xH{h}xV{v}", [tokens, h, v], strided, (hidden, weight, targets.to(device))))
    return out


def _run_sim_exp(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from rewardq.kernels.reference import sim_exp_reward_torch
    from rewardq.kernels.sim_exp import sim_exp_reward_triton

    a, b, alpha, weight = inputs
    got, _ = sim_exp_reward_triton(a, b, alpha, weight)
    want, _ = sim_exp_reward_torch(a.cpu().double(), b.cpu().double(), alpha.cpu().double(), weight.cpu().double())
    return got.detach().cpu().double(), want.detach()


def _run_logprob(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from rewardq.kernels.logprob import token_logprobs_triton

    hidden, weight, targets = inputs
    got = token_logprobs_triton(hidden, weight, targets)
    logits = hidden.cpu().double() @ weight.cpu().double().T
    want = torch.log_softmax(logits, -1).gather(1, targets.cpu()[:, None])[:, 0]
    return got.cpu().double(), want


def run_checks(device: str | torch.device, dtypes: list[str], kernels: tuple[str, ...] = KERNELS) -> list[Check]:
    """Every check of every kernel in every dtype; a kernel that raises is a failed check too (a launch error)."""
    dev = torch.device(device)
    inject = os.environ.get("REWARDQ_SELFCHECK_INJECT", "")
    out: list[Check] = []
    for name in kernels:
        cases, run = (_sim_exp_cases, _run_sim_exp) if name == "sim_exp" else (_logprob_cases, _run_logprob)
        atol, rtol = TOLERANCE[name]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for case, shape, strided, inputs in cases(dev, dtype):
                try:
                    got, want = run(inputs)
                    if inject == name:
                        got = got + INJECTED_ERROR
                    scale = float(want.abs().max().clamp_min(1.0)) if name == "sim_exp" else 1.0
                    err = (got - want).abs()
                    allowed = atol * scale + rtol * want.abs()
                    ok = bool(torch.isfinite(got).all() and (err <= allowed).all())
                    out.append(
                        Check(name, case, dtype_name, shape, strided, float(err.max()), float(allowed.max()), ok)
                    )
                except Exception as exc:  # a launch or compile error: this kernel cannot be trusted here
                    out.append(
                        Check(
                            name,
                            case,
                            dtype_name,
                            shape,
                            strided,
                            float("nan"),
                            0.0,
                            False,
                            f"{type(exc).__name__}: {exc}"[:500],
                        )
                    )
    return out


CHILD = "the self-check process"  # the case of the checks reported when the child itself died


def run_in_child(device: str, dtypes: list[str], timeout_s: float = 600) -> list[Check]:
    """``run_checks`` in a fresh process (``python -m kernels.selfcheck --json``): CUDA is initialised there, never in
    the caller (a worker about to fork its pool), and a kernel that crashes or hangs takes only the child down. On a
    CPU the child runs under the Triton interpreter. A child that dies counts as every kernel failing."""
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if device == "cpu" else {})}
    argv = [
        sys.executable,
        "-m",
        "rewardq.kernels.selfcheck",
        "--json",
        "--device",
        device,
        "--dtypes",
        ",".join(dtypes),
    ]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stderr = ""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root)
        stderr = done.stderr
        return [Check(**c) for c in json.loads(done.stdout.strip().splitlines()[-1])["checks"]]
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError, TypeError) as exc:
        why = (stderr.strip().splitlines() or [f"{type(exc).__name__}: {exc}"])[-1][-500:]
        return [Check(k, CHILD, "-", [], False, float("nan"), 0.0, False, why) for k in KERNELS]


def failed_kernels(checks: list[Check]) -> list[str]:
    return sorted({c.kernel for c in checks if not c.ok})


def describe_failures(checks: list[Check]) -> str:
    """One message naming every failed check: kernel, dtype, shape, layout and the error against the tolerance."""
    bad = [c for c in checks if not c.ok]
    parts = [
        f"{c.kernel} {c.dtype} {c.case}{' strided' if c.strided else ''}: "
        + (c.error or f"max |error| {c.max_abs_err:.3g} > tolerance {c.tolerance:.3g}")
        for c in bad
    ]
    return f"{len(bad)} of {len(checks)} kernel checks failed: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32", help="comma-separated torch dtypes (float32, bfloat16, float16)")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--device", default="", help="default: cuda when available, else cpu (needs TRITON_INTERPRET=1)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("the kernels on a CPU run only under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    checks = run_checks(device, [d for d in args.dtypes.split(",") if d], tuple(args.kernels.split(",")))
    failed = failed_kernels(checks)
    if args.json:
        print(json.dumps({"device": device, "checks": [asdict(c) for c in checks], "failed": failed}))
    else:
        for c in checks:
            flag = "ok  " if c.ok else "FAIL"
            print(
                f"{flag} {c.kernel:8s} {c.dtype:9s} {c.case:18s} {'strided' if c.strided else '       '} "
                f"max|err| {c.max_abs_err:.2e} (tolerance {c.tolerance:.2e}) {c.error}"
            )
        if failed:
            print(describe_failures(checks))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
