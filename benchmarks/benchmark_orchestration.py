"""The orchestration's own cost, with the encoder out of the way (issue #36, item 4).

(b) ``--ledger``: the batch ledger's queries as the ledger grows. One live job of N batches, 60 % done, 64 in flight
(enqueued, 8 of them taken by a worker), the rest never enqueued, on a fresh database of each backend. Timed, as
medians of repeated calls:

- ``feed``: what the feeder runs after every batch: batches in flight per tenant, the next unqueued batch, and
  the compare-and-set that claims it (rolled back, so every repeat sees the same ledger);
- ``sweep``: the sweeper's two scans (batches a worker took; batches enqueued long ago and never taken).

The goal is flat: within 1.3x from 1k to 400k batches. Run it on the commit to compare with ``--label``, e.g.
from a worktree of the older commit: ``PYTHONPATH=/tmp/before python benchmarks/benchmark_orchestration.py``.

    python benchmarks/benchmark_orchestration.py --ledger                         # 1k, 10k, 100k, 400k batches
    python benchmarks/benchmark_orchestration.py --ledger --sizes 1000,10000 --db sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, insert, text  # noqa: E402

PG_ADMIN = os.environ.get("REWARDQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm: the plan, the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _fresh_database(backend: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    if backend == "sqlite":
        return f"sqlite:///{tmp / f'ledger-{uuid.uuid4().hex[:6]}.db'}", lambda: None
    name = f"rewardq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        from rewardq.storage.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def _ledger(url: str, n: int) -> str:
    """A running job of ``n`` batches: 60 % done, 64 in flight (8 of them taken), the rest never enqueued."""
    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from rewardq.storage.models import Batch, Job

    now = datetime.now(timezone.utc)
    done, flight = int(n * 0.6), 64
    job_id = uuid.uuid4().hex
    with session_scope(url) as s:
        registry.register(s, version="v", kind="sim_exp", base_model="bench", path=None, config={})
        s.add(Job(id=job_id, tenant="bench", model_version="v", n_items=n * 256, n_batches=n, status="running",
                  meta={}))  # fmt: skip
        s.flush()
        rows = []
        for b in range(n):
            row: dict[str, Any] = {"job_id": job_id, "batch_no": b, "start_idx": b * 256, "end_idx": (b + 1) * 256}
            if b < done:
                row.update(done=True, enqueued_at=now, started_at=now, done_at=now, attempts=1)
            elif b < done + flight:
                taken = b < done + 8
                row.update(done=False, enqueued_at=now, started_at=now if taken else None,
                           worker="w" if taken else None)  # fmt: skip
            else:
                row.update(done=False)
            rows.append(row)
            if len(rows) == 10_000:
                s.execute(insert(Batch), rows)
                rows = []
        if rows:
            s.execute(insert(Batch), rows)
    with session_scope(url) as s:
        s.execute(text("ANALYZE"))  # the planner's statistics, as a database that has been running would have
    return job_id


def _measure(url: str, repeats: int) -> dict[str, float]:
    from rewardq.storage import ledger
    from rewardq.storage.db import get_sessionmaker

    maker = get_sessionmaker(url)
    old = datetime.now(timezone.utc) + timedelta(seconds=1)

    def feed() -> None:
        with maker() as s:
            flight = ledger.in_flight_by_tenant(s)
            picked = ledger.unqueued_batches(s, limit=1, flight=flight)
            assert picked, "no unqueued batch found"
            b = picked[0][0]
            assert ledger.claim_requeue(s, job_id=b.job_id, batch_no=b.batch_no, seen=None)
            s.rollback()

    def sweep() -> None:
        with maker() as s:
            assert len(ledger.taken_batches(s)) == 8
            ledger.untaken_batches(s, older_than=old)
            s.rollback()

    return {"feed_ms": _median_ms(feed, repeats), "sweep_ms": _median_ms(sweep, repeats)}


def run_ledger(backends: list[str], sizes: list[int], repeats: int) -> dict[str, Any]:
    from rewardq.storage.migrate import upgrade

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            rows = []
            for n in sizes:
                url, drop = _fresh_database(backend, Path(tmp))
                try:
                    upgrade(url)
                    t0 = time.perf_counter()
                    _ledger(url, n)
                    build_s = time.perf_counter() - t0
                    row = {"batches": n, **_measure(url, repeats), "build_s": round(build_s, 1)}
                finally:
                    drop()
                rows.append(row)
                print(f"{backend:10s} {n:>7d} batches: feed {row['feed_ms']:7.2f} ms  sweep {row['sweep_ms']:7.2f} ms",
                      flush=True)  # fmt: skip
            first, last = rows[0], rows[-1]
            out[backend] = {
                "rows": rows,
                "feed_ratio_largest_to_smallest": round(last["feed_ms"] / first["feed_ms"], 2),
                "sweep_ratio_largest_to_smallest": round(last["sweep_ms"] / first["sweep_ms"], 2),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", action="store_true", help="(b): the ledger's queries as it grows")
    parser.add_argument("--sizes", default="1000,10000,100000,400000")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--label", default="", help="what was measured (a commit, 'before', 'after')")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.ledger:
        parser.error("say what to measure: --ledger")
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    sizes = [int(x) for x in args.sizes.split(",")]
    result = {
        "benchmark": "orchestration: ledger queries as the ledger grows",
        "label": args.label,
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "repeats": args.repeats,
        "ledger": run_ledger(backends, sizes, args.repeats),
    }
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
