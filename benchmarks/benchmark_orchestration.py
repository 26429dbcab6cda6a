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

(a) ``--pipeline``: pairs/s of one worker process through API -> Redis -> worker -> SQL, with the encoder out of
the way: the timed job's texts (100 prompts, 1,000 responses by default) were all scored by a first job, so every
one is in the embedding cache. Timed from the upload to the last result, on a fresh database of each backend.

    python benchmarks/benchmark_orchestration.py --pipeline --pairs 100000

With ``--device-ms 10,25`` each message's scoring also waits that long with the GIL released, as on a GPU: what
the write stage (REWARDQ_WRITE_BEHIND, ``--write-behind both`` measures it off and on, back to back) overlaps.
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


REDIS = os.environ.get("REWARDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _wait_job(c: Any, job_id: str, timeout: float, every: float = 0.25) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}", params={"summary": "false"}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {job['progress']}")
        time.sleep(every)


# Loaded by the worker's interpreter at start (it is first on its PYTHONPATH): each message's scoring ends with a
# sleep of REWARDQ_BENCH_DEVICE_MS, which releases the GIL as a wait on a GPU does. Benchmarks only.
_EMULATED_DEVICE = """
import os, time

_ms = float(os.environ.get("REWARDQ_BENCH_DEVICE_MS") or 0)
if _ms > 0:
    from rewardq.workers.models.sim_exp import SimExpModel

    _score = SimExpModel.score

    def score(self, prompts, responses):
        out = _score(self, prompts, responses)
        time.sleep(_ms / 1000)
        return out

    SimExpModel.score = score
"""


class _LockWaits:
    """Samples pg_stat_activity every 10 ms (item 4c): of the samples of the database's backends that were busy in a
    statement or its transaction (the benchmark's own sampling connection left out), the share waiting on a lock."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.busy, self.waiting = url, 0, 0
        self.what: dict[str, int] = {}
        self.pairs: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _LockWaits:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        # A waiting backend's statement and the statement of the first backend it waits for (its blocker's last
        # one, when the blocker is idle in its transaction), each cut to its first words: what waits on what.
        q = text(
            "SELECT a.wait_event_type, a.wait_event, left(a.query, 48),"
            " (SELECT left(b.query, 48) FROM pg_stat_activity b WHERE b.pid = (pg_blocking_pids(a.pid))[1])"
            " FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.pid <> pg_backend_pid() AND a.state IN ('active', 'idle in transaction')"
        )
        with engine.connect() as c:
            while not self._stop.wait(0.01):
                for kind, event, query, blocker in c.execute(q):
                    self.busy += 1
                    if kind == "Lock":
                        self.waiting += 1
                        self.what[str(event)] = self.what.get(str(event), 0) + 1
                        pair = f"{' '.join(str(query).split())} <- {' '.join(str(blocker).split())}"
                        self.pairs[pair] = self.pairs.get(pair, 0) + 1
        engine.dispose()

    def report(self) -> dict[str, Any]:
        share = self.waiting / self.busy if self.busy else 0.0
        top = dict(sorted(self.pairs.items(), key=lambda kv: -kv[1])[:5])
        return {"busy_backend_samples": self.busy, "lock_wait_share": round(share, 4), "lock_waits_on": self.what,
                "waiting_on_blocker": top}  # fmt: skip


def run_pipeline(
    backends: list[str],
    pairs: int,
    n_prompts: int,
    n_responses: int,
    device_ms: float = 0.0,
    write_behind: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """(a): one worker process through API -> Redis -> worker -> SQL with every text in the embedding cache (a first
    job of the same texts warms it), so what is timed is the orchestration around the encoder: the upload, the
    ledger, the queue, the cache lookups, the kernel and the result writes.

    ``device_ms``: each message's scoring also waits this long with the GIL released, as a worker waits on its GPU
    (an emulated device: what the host's stages can overlap with); ``write_behind``: REWARDQ_WRITE_BEHIND;
    ``workers``: worker processes on the one job (on PostgreSQL the share of its busy backends' samples that waited
    on a lock is reported, item 4c)."""
    import httpx
    import redis

    from rewardq.api.procs import free_port, start_api, start_worker, wait_for
    from rewardq.storage.migrate import upgrade

    prompts = [f"Benchmark question {i}: what is the answer to this one?" for i in range(n_prompts)]
    responses = [f"An answer of a few words, number {j}, to one of the questions." for j in range(n_responses)]
    warm = [{"prompt": prompts[j % n_prompts], "response": responses[j]} for j in range(n_responses)]
    main = [{"prompt": prompts[i % n_prompts], "response": responses[(i * 7) % n_responses]} for i in range(pairs)]
    body = "".join(json.dumps(it) + "\n" for it in main).encode()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            url, drop = _fresh_database(backend, Path(tmp))
            tag = uuid.uuid4().hex[:8]
            queues = {"scoring": f"bench-{tag}", "interactive": f"bench-{tag}-interactive"}
            env = {
                **os.environ,
                "REWARDQ_DATABASE_URL": url,
                "REWARDQ_REDIS_URL": REDIS,
                "REWARDQ_SCORING_QUEUE": queues["scoring"],
                "REWARDQ_INTERACTIVE_QUEUE": queues["interactive"],
                "REWARDQ_TRAINING_QUEUE": f"bench-{tag}-training",
                "REWARDQ_ALLOW_ANONYMOUS": "1",  # on 127.0.0.1, for this script only
                "REWARDQ_ARTIFACTS_DIR": str(Path(tmp) / "artifacts"),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
            }
            env["REWARDQ_WRITE_BEHIND"] = "on" if write_behind else "off"
            worker_env = dict(env)
            if device_ms:
                site = Path(tmp) / "emulated-device"
                site.mkdir(exist_ok=True)
                (site / "sitecustomize.py").write_text(_EMULATED_DEVICE)
                worker_env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
                worker_env["REWARDQ_BENCH_DEVICE_MS"] = str(device_ms)
            procs: list[Any] = []
            try:
                upgrade(url)
                for n in range(workers):
                    worker = start_worker(worker_env, Path(tmp) / f"worker{n}-{backend}.log",
                                          queues=f"{queues['interactive']},{queues['scoring']}")  # fmt: skip
                    procs.append(worker)
                    wait_for(lambda w=worker: "consuming" in w.tail(80), 300, "the worker", worker.popen)
                port = free_port()
                api = start_api(env, Path(tmp) / f"api-{backend}.log", port)
                procs.append(api)
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
                    first = c.post("/v1/jobs", json={"items": warm}).json()["job_id"]
                    assert _wait_job(c, first, 600)["status"] == "succeeded"
                    waits = _LockWaits(url) if backend == "postgresql" else None
                    t0 = time.perf_counter()
                    resp = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"})
                    ingest_s = time.perf_counter() - t0
                    assert resp.status_code == 202, resp.text
                    if waits is not None:  # from the upload's end: the workers' share only
                        waits.__enter__()
                    try:
                        job = _wait_job(c, resp.json()["job_id"], 1800)
                    finally:
                        if waits is not None:
                            waits.__exit__()
                    total_s = time.perf_counter() - t0
                assert job["status"] == "succeeded", job
                row = {
                    "pairs": pairs,
                    "device_ms_per_message": device_ms,
                    "workers": workers,
                    "write_behind": write_behind,
                    "seconds_submit_to_last_result": round(total_s, 2),
                    "seconds_ingest": round(ingest_s, 2),
                    "pairs_per_s": round(pairs / total_s),
                    "host_us_per_pair": round(total_s / pairs * 1e6, 1),
                    "embed_cache_misses": job["embed_cache_misses"],
                    "embed_cache_hits": job["embed_cache_hits"],
                    **(waits.report() if waits is not None else {}),
                }
                out[backend] = row
                locks = f", lock waits {row['lock_wait_share']:.1%} of busy samples" if waits is not None else ""
                wb = "on" if write_behind else "off"
                print(f"{backend:10s} {pairs} pairs, {workers} worker(s), device {device_ms:g} ms/message, "
                      f"write-behind {wb}: {row['pairs_per_s']} pairs/s ({total_s:.1f} s, ingest {ingest_s:.1f} s, "
                      f"{row['embed_cache_misses']} misses{locks})", flush=True)  # fmt: skip
            finally:
                for proc in reversed(procs):
                    proc.stop()
                drop()
                r = redis.Redis.from_url(REDIS)
                for name in r.scan_iter(f"bench-{tag}*"):
                    r.delete(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", action="store_true", help="(b): the ledger's queries as it grows")
    parser.add_argument("--pipeline", action="store_true", help="(a): pairs/s of one worker, every text cached")
    parser.add_argument("--pairs", type=int, default=100_000, help="--pipeline: pairs in the timed job")
    parser.add_argument("--texts", default="100,1000", help="--pipeline: distinct prompts,responses (all cached)")
    parser.add_argument("--device-ms", default="0", help="--pipeline: emulated device ms per message, a list")
    parser.add_argument("--write-behind", choices=["on", "off", "both"], default="on", help="--pipeline")
    parser.add_argument("--workers", default="1", help="--pipeline: worker processes on the job, a list (4c)")
    parser.add_argument("--sizes", default="1000,10000,100000,400000")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--label", default="", help="what was measured (a commit, 'before', 'after')")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (args.ledger or args.pipeline):
        parser.error("say what to measure: --ledger, --pipeline or both")
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    result: dict[str, Any] = {"benchmark": "orchestration", "label": args.label, "cpu": _cpu(), "cores": os.cpu_count()}
    if args.pipeline:
        n_prompts, n_responses = (int(x) for x in args.texts.split(","))
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.write_behind]
        runs = [
            {
                "device_ms": ms,
                "write_behind": wb,
                "workers": nw,
                **run_pipeline(backends, args.pairs, n_prompts, n_responses, ms, wb, nw),
            }
            for nw in (int(x) for x in args.workers.split(","))
            for ms in (float(x) for x in args.device_ms.split(","))
            for wb in modes
        ]
        result["pipeline"] = runs[0] if len(runs) == 1 else runs
    if args.ledger:
        sizes = [int(x) for x in args.sizes.split(",")]
        result["repeats"] = args.repeats
        result["ledger"] = run_ledger(backends, sizes, args.repeats)
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
