"""Benchmark the chunked token log-prob kernel against eager (logits -> log_softmax -> gather) and torch.compile.

On CUDA: N = 16,384 response tokens, H = 4,096, V in {32k, 128k, 152k}, bf16 and fp32: peak memory
(torch.cuda.max_memory_allocated above the inputs) and median time (triton.testing.do_bench) of each; targets
at V = 128k: >= 4x less peak memory than eager and not slower.
On a CPU: the scorer's chunked path (what the likelihood kind runs there) against eager on a 32k-vocabulary
model, each in a fresh process for its peak RSS: the target is under a quarter of eager's at the same batch.
Writes benchmarks/results/logprob_<device>.json and prints a table.

    python benchmarks/benchmark_logprob.py [--quick]
    python benchmarks/benchmark_logprob.py --dry-run   # the GPU code path on CPU at toy sizes (tests use it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def eager(hidden, weight, targets):
    """What a user would write: the whole [N, V] logits, then log_softmax, then gather."""
    import torch

    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(1, targets[:, None].long())[:, 0]


# -- GPU --------------------------------------------------------------------------------------------


def gpu_case(n: int, h: int, v: int, dtype, device: str, impls: dict, dry_run: bool) -> dict:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    ref = eager(hidden.double(), weight.double(), targets)
    row: dict = {"N": n, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch.")}
    for label, fn in impls.items():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = fn(hidden, weight, targets)
        if device == "cuda":
            torch.cuda.synchronize()
            row[f"{label}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            from triton.testing import do_bench

            row[f"{label}_ms"] = float(do_bench(lambda fn=fn: fn(hidden, weight, targets), return_mode="median"))
        else:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn(hidden, weight, targets)
                times.append((time.perf_counter() - t0) * 1e3)
            row[f"{label}_ms"], row[f"{label}_peak_mb"] = statistics.median(times), 0.0
        row[f"{label}_max_err"] = (out.double() - ref).abs().max().item()
        del out
    row["mem_x_eager"] = row["eager_peak_mb"] / max(row["triton_peak_mb"], 1e-9) if not dry_run else 0.0
    row["speed_x_eager"] = row["eager_ms"] / row["triton_ms"]
    row["speed_x_compile"] = row["compile_ms"] / row["triton_ms"]
    return row


def gpu_bench(quick: bool, dry_run: bool, out_dir: Path) -> int:
    import torch

    from rewardq.kernels.logprob import token_logprobs_triton

    device = "cpu" if dry_run else "cuda"
    name = "dry-run-cpu" if dry_run else torch.cuda.get_device_name(0)
    compiled = torch.compile(eager, dynamic=True, backend="eager" if dry_run else "inductor")
    impls = {"triton": token_logprobs_triton, "eager": eager, "compile": compiled}
    cases = [(16384, 4096, v) for v in ((128256,) if quick else (32000, 128256, 151936))]
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    if dry_run:
        cases, dtypes = [(33, 32, 1000)], (torch.float32,)
    rows = []
    for dtype in dtypes:
        for n, h, v in cases:
            row = gpu_case(n, h, v, dtype, device, impls, dry_run)
            rows.append(row)
            print(
                f"{row['dtype']:9s} N={n} H={h} V={v:6d}  peak MB: ours {row['triton_peak_mb']:8.0f} eager "
                f"{row['eager_peak_mb']:8.0f} compile {row['compile_peak_mb']:8.0f} (x{row['mem_x_eager']:.1f} less)"
                f" | ms: ours {row['triton_ms']:.2f} eager {row['eager_ms']:.2f} compile {row['compile_ms']:.2f} "
                f"(x{row['speed_x_eager']:.2f} eager, x{row['speed_x_compile']:.2f} compile) | "
                f"err {row['triton_max_err']:.1e}",
                flush=True,
            )
            if not dry_run:
                torch.cuda.empty_cache()
    sweep = block_sweep(*cases[0], dtypes[0], device, dry_run)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    meta = {"device": name, "torch": torch.__version__, "block_sweep": sweep}
    return _write(out_dir / f"logprob_{slug}.json", meta, rows)


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) tried on CUDA (the first H200 loan chose kernels.logprob's
# default for 2-byte inputs, (128, 256, 64, 8, 3), from this list).
GPU_BLOCKS = [
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (256, 128, 64, 8, 3),
]


def block_sweep(n: int, h: int, v: int, dtype, device: str, dry_run: bool) -> list[dict]:
    """The kernel's median time and error at one shape for each candidate block shape (a config that fails to
    compile or launch is reported, not fatal), so the default is chosen by measurement."""
    import torch

    from rewardq.kernels.logprob import _blocks, token_logprobs_fwd

    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    ref = eager(hidden.float(), weight.float(), targets)  # fp32 products of the same rounded inputs
    configs = [_blocks(n, v, h, torch.device(device)), (16, 32, 16, 1, 1)] if dry_run else GPU_BLOCKS
    out = []
    for cfg in configs:
        row: dict = {"blocks": list(cfg), "N": n, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch.")}
        try:
            got = token_logprobs_fwd(hidden, weight, targets, blocks=cfg)[0]
            row["max_err"] = (got - ref).abs().max().item()
            if dry_run:
                row["ms"] = 0.0
            else:
                from triton.testing import do_bench

                row["ms"] = float(
                    do_bench(
                        lambda cfg=cfg: token_logprobs_fwd(hidden, weight, targets, blocks=cfg), return_mode="median"
                    )
                )
        except Exception as exc:  # out of shared memory or registers: this shape cannot run here
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(row)
        print(f"blocks {cfg}: " + (row.get("error") or f"{row['ms']:.2f} ms, err {row['max_err']:.1e}"), flush=True)
    return out


# -- CPU: the scorer's chunked path vs eager on a 32k-vocabulary model, peak RSS per fresh process ---------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_child(mode: str, model_dir: str, n_pairs: int, response_words: int) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # the 2 cores, unless told (the tests: 1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [f"Question {i}: tell me about topic {i % 17}." for i in range(n_pairs)]
    responses = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(response_words)) for i in range(n_pairs)]
    if mode == "chunked":
        from rewardq.workers.models.likelihood import LikelihoodModel

        model = LikelihoodModel("bench", model_dir, encode_batch_size=n_pairs, token_budget=10**9)
        model.score(prompts[:2], responses[:2])  # warm-up outside the measured region
        loaded = _peak_rss_mb()
        t0 = time.perf_counter()
        out = model.score(prompts, responses)
        assert not any(out.truncated), "pairs longer than the model's limit: eager would score other tokens"
        scores, tokens = out.reward, sum(n or 0 for n in out.n_tokens or [])
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        p_ids = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for p in prompts
        ]
        r_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        width = max(len(a) + len(b) for a, b in zip(p_ids, r_ids, strict=True))
        ids = torch.tensor([a + b + [0] * (width - len(a) - len(b)) for a, b in zip(p_ids, r_ids, strict=True)])
        mask = torch.tensor(
            [[1] * (len(a) + len(b)) + [0] * (width - len(a) - len(b)) for a, b in zip(p_ids, r_ids, strict=True)]
        )
        loaded = _peak_rss_mb()
        t0 = time.perf_counter()
        tokens = sum(len(b) for b in r_ids)
        with torch.inference_mode():
            logp = torch.log_softmax(net(input_ids=ids, attention_mask=mask).logits.float(), -1)
            scores = []
            for i, (a, b) in enumerate(zip(p_ids, r_ids, strict=True)):
                pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                scores.append(logp[i, pos].gather(1, ids[i, pos + 1, None])[:, 0].mean().item())
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "peak_rss_mb": _peak_rss_mb(),
                "rss_before_mb": loaded,
                "seconds": seconds,
                "scores": scores[:8],
                "response_tokens": tokens,
            }
        )
    )


def cpu_bench(quick: bool, out_dir: Path) -> int:
    from tests.tiny_models import save_llama_lm

    # ~400 tokens a pair (the tiny tokenizer spends several tokens a word): under the model's 512, so both score
    # the same tokens; 64 pairs make about 25k response tokens, 3.3 GB of fp32 logits for eager.
    n_pairs, words, vocab = (16, 40, 32000) if quick else (64, 80, 32000)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_llama_lm(Path(tmp) / "lm32k", vocab_size=vocab, hidden_size=256)
        rows = []
        for mode in ("eager", "chunked"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(model_dir), str(n_pairs), str(words)],
                capture_output=True,
                text=True,
                timeout=1200,
                env={**os.environ, "REWARDQ_KERNEL": "torch"},
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    eager_row, chunked = rows
    err = max(abs(a - b) for a, b in zip(eager_row["scores"], chunked["scores"], strict=True))
    if eager_row["response_tokens"] != chunked["response_tokens"]:
        print(
            f"eager and chunked scored different tokens: {eager_row['response_tokens']} vs {chunked['response_tokens']}"
        )
        return 1
    tokens = chunked["response_tokens"]
    summary = {
        "pairs": n_pairs,
        "response_tokens": tokens,
        "vocab": vocab,
        "eager_peak_rss_mb": eager_row["peak_rss_mb"],
        "chunked_peak_rss_mb": chunked["peak_rss_mb"],
        "eager_extra_mb": eager_row["peak_rss_mb"] - eager_row["rss_before_mb"],
        "chunked_extra_mb": chunked["peak_rss_mb"] - chunked["rss_before_mb"],
        "rss_ratio": chunked["peak_rss_mb"] / eager_row["peak_rss_mb"],
        "eager_s": eager_row["seconds"],
        "chunked_s": chunked["seconds"],
        "max_abs_diff": err,
    }
    print(
        f"CPU, {n_pairs} pairs, {tokens} response tokens, V={vocab}: peak RSS eager {summary['eager_peak_rss_mb']:.0f}"
        f" MB, chunked {summary['chunked_peak_rss_mb']:.0f} MB (ratio {summary['rss_ratio']:.3f}; target < 0.25); "
        f"time eager {summary['eager_s']:.2f}s, chunked {summary['chunked_s']:.2f}s; max |diff| {err:.1e}"
    )
    import torch

    return _write(
        out_dir / "logprob_cpu.json",
        {"device": platform.processor() or "cpu", "torch": torch.__version__, "cpus": os.cpu_count()},
        [summary],
    )


def _write(path: Path, meta: dict, rows: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**meta, "python": platform.python_version()}, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cpu_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes (GPU) or a smaller batch (CPU)")
    p.add_argument("--dry-run", action="store_true", help="run the GPU code path on CPU at toy sizes")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return gpu_bench(quick=True, dry_run=True, out_dir=args.out_dir)
    import torch

    if torch.cuda.is_available():
        return gpu_bench(args.quick, dry_run=False, out_dir=args.out_dir)
    print("no CUDA GPU found: measuring the CPU scorer's chunked path against eager instead")
    return cpu_bench(args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
