"""A crowd of long polls on one API process: N requests wait on a job that never ends (GET /v1/jobs/{id}?wait=S,
tenant A) while tenant B lists its jobs (GET /v1/jobs) one request after another. Reports B's latency with no
waiter (the baseline, measured in the same run) and with the crowd waiting, their ratio, and what the waiters got.

    python benchmarks/benchmark_longpoll.py                 # 500 waiters, PostgreSQL (a throwaway database)
    python benchmarks/benchmark_longpoll.py --waiters 50 --wait 10 --db sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardq.api.procs import free_port, start_api, start_redis  # noqa: E402

PG_ADMIN = os.environ.get("REWARDQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY_A, KEY_B = "bench-a-" + uuid.uuid4().hex, "bench-b-" + uuid.uuid4().hex


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _probe(url: str, n: int) -> list[float]:
    """Tenant B's GET /v1/jobs, one after another: seconds each."""
    out = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await c.get("/v1/jobs", params={"limit": 20})
            out.append(time.perf_counter() - t0)
            assert resp.status_code == 200, resp.text
    return out


async def _run(url: str, job_id: str, waiters: int, wait: float, probes: int) -> dict[str, object]:
    baseline = await _probe(url, probes)
    limits = httpx.Limits(max_connections=waiters + 10, max_keepalive_connections=waiters + 10)
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=wait + 60, limits=limits) as crowd:

        async def one() -> int:
            resp = await crowd.get(f"/v1/jobs/{job_id}", params={"wait": wait, "summary": "false"})
            return resp.status_code

        t0 = time.monotonic()
        tasks = [asyncio.create_task(one()) for _ in range(waiters)]
        await asyncio.sleep(min(5.0, wait / 3))  # the crowd is in and waiting
        loaded = await _probe(url, probes)
        probe_done = time.monotonic() - t0
        codes = await asyncio.gather(*tasks)
    return {
        "baseline_p50_ms": statistics.median(baseline) * 1000,
        "baseline_p99_ms": _pct(baseline, 0.99) * 1000,
        "loaded_p50_ms": statistics.median(loaded) * 1000,
        "loaded_p99_ms": _pct(loaded, 0.99) * 1000,
        "p99_ratio": _pct(loaded, 0.99) / _pct(baseline, 0.99),
        "probes_finished_while_waiting": probe_done < wait,
        "waiter_status_codes": {str(k): codes.count(k) for k in sorted(set(codes))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiters", type=int, default=500)
    parser.add_argument("--wait", type=float, default=30.0, help="each waiter's ?wait= (seconds)")
    parser.add_argument("--probes", type=int, default=200, help="tenant B's requests, in each phase")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "longpoll.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rewardq-longpoll-"))
    redis_port = free_port()
    redis_proc = start_redis(redis_port, tmp / "redis.log")
    assert redis_proc is not None, "redis-server is not installed"
    admin = None
    if args.db == "postgresql":
        import psycopg

        name = f"rewardq_longpoll_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        db = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    else:
        db = f"sqlite:///{tmp / 'longpoll.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REWARDQ_")},
        "REWARDQ_DATABASE_URL": db,
        "REWARDQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "REWARDQ_SCORING_QUEUE": "longpoll-nobody",  # no worker: the job never ends
        "REWARDQ_API_KEYS": f"tenant-a:{KEY_A},tenant-b:{KEY_B}",
        "REWARDQ_RATE_LIMIT_PER_MINUTE": "0",  # the benchmark's own clients, measured, not limited
        "PYTHONPATH": str(ROOT),
    }
    api = None
    try:
        import subprocess

        subprocess.run([sys.executable, "-m", "rewardq", "db", "upgrade"], env=env, check=True, capture_output=True)
        port = free_port()
        api = start_api(env, tmp / "api.log", port)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
            job_id = c.post("/v1/jobs", json={"items": [{"prompt": "p", "response": "r"}]}).json()["job_id"]
        result = asyncio.run(_run(url, job_id, args.waiters, args.wait, args.probes))
    finally:
        if api is not None:
            api.stop()
        redis_proc.stop()
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
    report = {"waiters": args.waiters, "wait_s": args.wait, "db": args.db, "cpus": os.cpu_count(), **result}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
