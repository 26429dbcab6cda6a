"""What a job's dashboard page costs on a 1,000,000-item job, against the same page on a 1,000-item job.

For each database (SQLite, PostgreSQL): two finished jobs are written straight to SQL (synthetic
scores; scoring a million pairs on this CPU would take hours and is not what is measured), the
API runs as a process, and we time
  - the four requests the job page makes (job + summary, histogram, best 5, worst 5), with the bytes
    they return, median of --repeat;
  - the page in headless Chromium, from navigation to the histogram drawn, median of --repeat.
The ratio large/small says whether the page scales with the job (it should stay near 1 in bytes and
grow only with the SQL aggregates in time). Writes benchmarks/results/dashboard.json.

    python benchmarks/benchmark_dashboard.py [--items 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark_pipeline import Stack, throwaway_database  # noqa: E402
from tests.support import CHROMIUM, CHROMIUM_ARGS, seed_scored_job, wait_js  # noqa: E402


def page_requests(base: str, job_id: str, repeat: int) -> dict[str, float]:
    import httpx

    paths = {"job_summary": f"/v1/jobs/{job_id}", "histogram": f"/v1/jobs/{job_id}/histogram?bins=40",
             "best5": f"/v1/jobs/{job_id}/results?sort=-score&limit=5",
             "worst5": f"/v1/jobs/{job_id}/results?sort=score&limit=5"}  # fmt: skip
    times: list[float] = []
    per: dict[str, list[float]] = {k: [] for k in paths}
    size = 0
    with httpx.Client(base_url=base, timeout=600) as c:
        c.get(paths["job_summary"])  # connection and first-query costs outside the measurement
        for _ in range(repeat):
            t0 = time.perf_counter()
            size = 0
            for name, p in paths.items():
                t1 = time.perf_counter()
                r = c.get(p)
                r.raise_for_status()
                per[name].append(time.perf_counter() - t1)
                size += len(r.content)
            times.append(time.perf_counter() - t0)
    out = {"requests_s": statistics.median(times), "bytes": float(size)}
    out.update({f"{k}_s": statistics.median(v) for k, v in per.items()})
    return out


def browser_load(browser: Any, base: str, job_id: str, n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        ctx = browser.new_context()
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(f"{base}/ui/jobs/{job_id}")
        wait_js(page, f"document.querySelector('#histogram')?.dataset.total === '{n}'", timeout=600_000)
        times.append(time.perf_counter() - t0)
        ctx.close()
    return statistics.median(times)


def measure(stack: Stack, sizes: list[int], repeat: int, browser: Any) -> list[dict[str, Any]]:
    from rewardq.storage.db import get_sessionmaker
    from rewardq.storage.registry import default_version

    with get_sessionmaker(stack.db_url)() as s:
        version = default_version(s)
        assert version is not None
    rows = []
    base = f"http://127.0.0.1:{stack.port}"
    for n in sizes:
        t0 = time.perf_counter()
        job_id = seed_scored_job(stack.db_url, tenant="default", n=n, model_version=version)
        seeded = time.perf_counter() - t0
        row: dict[str, Any] = {"items": n, "seed_s": seeded, **page_requests(base, job_id, repeat)}
        if browser is not None:
            row["browser_s"] = browser_load(browser, base, job_id, n, repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="'' to skip")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dashboard.json")
    args = p.parse_args()

    results: dict[str, Any] = {"items": args.items, "small": args.small, "repeat": args.repeat, "backends": {}}
    with contextlib.ExitStack() as cleanup:
        browser = None
        if os.path.exists(CHROMIUM):
            from playwright.sync_api import sync_playwright

            pw = sync_playwright().start()
            cleanup.callback(pw.stop)
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            cleanup.callback(browser.close)
        backends: list[tuple[str, str | None]] = [("sqlite", None)]
        if args.pg_admin_url:
            db = cleanup.enter_context(throwaway_database(args.pg_admin_url, f"rewardq_bench_ui_{os.getpid()}"))
            backends.append(("postgresql", db))
        for name, url in backends:
            tmp = Path(tempfile.mkdtemp(prefix=f"rewardq-bench-ui-{name}-"))
            stack = Stack(tmp, db_url=url, worker=False)
            try:
                small, large = measure(stack, [args.small, args.items], args.repeat, browser)
            finally:
                stack.close()
            ratio = {k: large[k] / small[k] for k in ("requests_s", "bytes", "browser_s") if k in small and small[k]}
            results["backends"][name] = {"small": small, "large": large, "large_over_small": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\njob page on {args.small:,} vs {args.items:,} items (median of {args.repeat}):")
    print(f"{'database':<11} {'items':>10} {'requests s':>11} {'KB':>7} {'browser s':>10}")
    for name, r in results["backends"].items():
        for row in (r["small"], r["large"]):
            print(f"{name:<11} {row['items']:>10,} {row['requests_s']:>11.3f} {row['bytes'] / 1024:>7.1f} "
                  f"{row.get('browser_s', float('nan')):>10.3f}")  # fmt: skip
        q = r["large_over_small"]
        print(f"{'':<11} {'ratio':>10} {q.get('requests_s', 0):>11.2f} {q.get('bytes', 0):>7.2f} "
              f"{q.get('browser_s', 0):>10.2f}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
