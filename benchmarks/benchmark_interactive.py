"""Interactive-lane latency under bulk load, and what interactive traffic costs the bulk job.

A stack of real processes (Redis, SQLite, worker(s), the API). For each mode:
  1. idle: 16- and 256-pair requests to POST /v1/score, one at a time: p50 and p99 latency;
  2. bulk alone: a large bulk job (100,000 unique pairs by default) runs; its pairs/s over a window;
  3. bulk + interactive: the same job keeps running while an RLHF-like client sends a 16-pair request every
     --gap-16 seconds for half the window, then a 256-pair request every --gap-256 seconds: latency percentiles
     per size, bulk pairs/s, and bulk plus interactive pairs/s (the worker's total output).
Modes: ``priority`` (one worker serves every queue, interactive first: kombu's priority queue order) and
``reserved`` (a second worker process serves only the interactive queue). Targets (2-core machine): under
load, p99 <= one bulk batch's duration + 2 x the idle p50; bulk throughput loses at most 10 %.
Writes benchmarks/results/interactive.json.

    python benchmarks/benchmark_interactive.py [--modes priority,reserved] [--bulk 100000] [--window 120]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark_pipeline import Stack  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_s": _pct(values, 0.5), "p99_s": _pct(values, 0.99), "max_s": max(values)}


def _pairs(n: int, tag: str) -> list[dict[str, str]]:
    from rewardq.client.samples import load_bundled, load_sts

    base = load_sts("dev") or load_bundled()
    return [
        {"prompt": f"{base[i % len(base)]['prompt']} [{tag} {i}]", "response": base[i % len(base)]["response"]}
        for i in range(n)
    ]


def _timed(client, items: list[dict[str, str]]) -> float:
    t0 = time.perf_counter()
    out = client.score(items)
    assert len(out["results"]) == len(items) and all(r["score"] is not None for r in out["results"])
    return time.perf_counter() - t0


def idle(client, n16: int, n256: int) -> dict[str, dict[str, float]]:
    lat16 = [_timed(client, _pairs(16, uuid.uuid4().hex)) for _ in range(n16)]
    lat256 = [_timed(client, _pairs(256, uuid.uuid4().hex)) for _ in range(n256)]
    return {"16": _summary(lat16), "256": _summary(lat256)}


def _done(client, job_id: str) -> int:
    return int(client.job(job_id, summary=False)["progress"]["done"])


def bulk_rate(client, job_id: str, window: float) -> float:
    start, t0 = _done(client, job_id), time.monotonic()
    time.sleep(window)
    return (_done(client, job_id) - start) / (time.monotonic() - t0)


def loaded(client, job_id: str, window: float, gap16: float, gap256: float) -> dict[str, object]:
    """While the bulk job runs: 16-pair requests for half the window, then 256-pair requests for the other half (one
    size at a time, so each size's latency shows what bulk work costs it); latencies and both throughputs."""
    lat: dict[str, list[float]] = {"16": [], "256": []}
    pairs = 0
    start, t0 = _done(client, job_id), time.monotonic()
    for size, gap in ((16, gap16), (256, gap256)):
        stop = time.monotonic() + window / 2
        nxt = time.monotonic()
        while time.monotonic() < stop:
            lat[str(size)].append(_timed(client, _pairs(size, uuid.uuid4().hex)))
            pairs += size
            nxt += gap
            time.sleep(max(0.0, nxt - time.monotonic()))
    took = time.monotonic() - t0
    bulk = (_done(client, job_id) - start) / took
    return {
        "16": _summary(lat["16"]),
        "256": _summary(lat["256"]),
        "bulk_pairs_per_s": bulk,
        "interactive_pairs_per_s": pairs / took,
        "window_s": took,
    }


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, object]:
    from rewardq.client.client import Client

    with tempfile.TemporaryDirectory(prefix=f"rewardq-interactive-{mode}-") as tmp:
        stack = Stack(Path(tmp), reserved=mode == "reserved")
        try:
            with Client(f"http://127.0.0.1:{stack.port}", timeout=600) as c:
                _timed(c, _pairs(16, "warm-up"))  # the worker(s) load the model
                quiet = idle(c, args.n16, args.n256)
                print(
                    f"[{mode}] idle: 16 pairs p50 {quiet['16']['p50_s']:.3f}s p99 {quiet['16']['p99_s']:.3f}s | "
                    f"256 pairs p50 {quiet['256']['p50_s']:.3f}s p99 {quiet['256']['p99_s']:.3f}s",
                    flush=True,
                )
                job_id = c.submit(_pairs(args.bulk, uuid.uuid4().hex))
                time.sleep(5)  # past the first batches
                alone = bulk_rate(c, job_id, args.window)
                busy = loaded(c, job_id, args.window, args.gap_16, args.gap_256)
                again = bulk_rate(c, job_id, args.window / 2)  # the machine's drift: bulk alone once more
                c.cancel(job_id)
        finally:
            stack.close()
    alone_rate = statistics.mean([alone, again])
    batch_s = 256 / alone_rate
    row = {
        "mode": mode,
        "idle": quiet,
        "loaded": busy,
        "bulk_alone_pairs_per_s": [alone, again],
        "bulk_batch_s": batch_s,
        "p99_target_16_s": batch_s + 2 * quiet["16"]["p50_s"],
        "p99_target_256_s": batch_s + 2 * quiet["256"]["p50_s"],
        "bulk_kept": busy["bulk_pairs_per_s"] / alone_rate,
        "total_kept": (busy["bulk_pairs_per_s"] + busy["interactive_pairs_per_s"]) / alone_rate,
    }
    for size in ("16", "256"):
        p99 = busy[size]["p99_s"]
        print(
            f"[{mode}] under load: {size} pairs p50 {busy[size]['p50_s']:.2f}s p99 {p99:.2f}s "
            f"(target {row[f'p99_target_{size}_s']:.2f}s: {'met' if p99 <= row[f'p99_target_{size}_s'] else 'MISSED'})"
        )
    print(
        f"[{mode}] bulk alone {alone:.0f}/{again:.0f} pairs/s (one 256-pair batch {batch_s:.2f}s); with interactive "
        f"traffic {busy['bulk_pairs_per_s']:.0f} pairs/s bulk + {busy['interactive_pairs_per_s']:.0f} interactive: "
        f"bulk kept {row['bulk_kept']:.1%}, total kept {row['total_kept']:.1%}",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="priority,reserved")
    p.add_argument("--bulk", type=int, default=100_000, help="pairs in the bulk job (it is cancelled at the end)")
    p.add_argument("--window", type=float, default=120.0, help="seconds of each throughput window")
    p.add_argument("--n16", type=int, default=100, help="idle 16-pair requests")
    p.add_argument("--n256", type=int, default=30, help="idle 256-pair requests")
    p.add_argument("--gap-16", type=float, default=2.0, help="seconds between 16-pair requests under load")
    p.add_argument("--gap-256", type=float, default=30.0, help="seconds between 256-pair requests under load")
    p.add_argument("--out", type=Path, default=RESULTS / "interactive.json")
    args = p.parse_args()
    rows = [run_mode(m, args) for m in args.modes.split(",")]
    import torch

    meta = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
