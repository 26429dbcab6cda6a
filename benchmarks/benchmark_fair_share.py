"""Fair share among tenants, end to end: tenant A's large job is running when tenant B submits a small one. Reports
B's time to finish alone (the baseline, measured in the same run) and behind A's job, in seconds and in batch
times (A's own batch time while it ran), and how much of A's job was left when B finished: B must not wait for A.

    python benchmarks/benchmark_fair_share.py                      # A: 200,000 items, B: 200, PostgreSQL
    python benchmarks/benchmark_fair_share.py --big 20000 --db sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardq.api.procs import free_port, start_api, start_redis, start_worker, wait_for  # noqa: E402

PG_ADMIN = os.environ.get("REWARDQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY_A, KEY_B = "bench-a-" + uuid.uuid4().hex, "bench-b-" + uuid.uuid4().hex


def _items(tag: str, n: int) -> list[dict[str, str]]:
    """Distinct pairs (nothing served from the embedding cache), a sentence or two each."""
    return [
        {"prompt": f"{tag} question {i}: how would you describe item {i * 7 % 1013}?",
         "response": f"{tag} answer {i}: it is the {i}th of its kind, and {i % 17} others look alike."}
        for i in range(n)
    ]  # fmt: skip


def _submit(c: httpx.Client, items: list[dict[str, str]]) -> str:
    body = "\n".join(json.dumps(x) for x in items).encode()
    resp = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/x-ndjson"}, timeout=600)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["job_id"])


def _finish(c: httpx.Client, job_id: str, limit_s: float) -> dict[str, object]:
    end = time.monotonic() + limit_s
    while True:
        job = c.get(f"/v1/jobs/{job_id}", params={"wait": 5, "summary": "false"}, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > end:
            return dict(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=200_000, help="tenant A's job (items)")
    parser.add_argument("--small", type=int, default=200, help="tenant B's job (items)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fair_share.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rewardq-fair-"))
    redis_port = free_port()
    redis_proc = start_redis(redis_port, tmp / "redis.log")
    assert redis_proc is not None, "redis-server is not installed"
    admin = None
    if args.db == "postgresql":
        import psycopg

        name = f"rewardq_fair_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        db = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    else:
        db = f"sqlite:///{tmp / 'fair.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REWARDQ_")},
        "REWARDQ_DATABASE_URL": db,
        "REWARDQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "REWARDQ_API_KEYS": f"tenant-a:{KEY_A},tenant-b:{KEY_B}",
        "REWARDQ_RATE_LIMIT_PER_MINUTE": "0",
        "REWARDQ_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "PYTHONPATH": str(ROOT),
    }
    procs = []
    try:
        subprocess.run([sys.executable, "-m", "rewardq", "db", "upgrade"], env=env, check=True, capture_output=True)
        port = free_port()
        procs.append(start_api(env, tmp / "api.log", port))
        procs.append(start_worker(env, tmp / "worker.log", concurrency=args.concurrency))
        url = f"http://127.0.0.1:{port}"
        a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"})
        b = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_B}"})
        # Warm-up (model loads in every worker process), then B alone: the baseline.
        warm = _finish(b, _submit(b, _items("warm", 64)), 600)
        assert warm["status"] == "succeeded", warm
        t0 = time.monotonic()
        alone = _finish(b, _submit(b, _items("alone", args.small)), 600)
        alone_s = time.monotonic() - t0
        assert alone["status"] == "succeeded", alone

        t_sub = time.monotonic()
        big_id = _submit(a, _items("big", args.big))
        submit_s = time.monotonic() - t_sub

        def progress() -> int:
            job = a.get(f"/v1/jobs/{big_id}", params={"summary": "false"}).json()
            return int(job["progress"]["done"])

        wait_for(lambda: progress() >= 4 * 256, 600, "A's job under way")
        t_a, done_a = time.monotonic(), progress()
        time.sleep(10)
        rate = (progress() - done_a) / (time.monotonic() - t_a)  # A's pairs/s while it runs alone
        batch_s = 256 / rate * args.concurrency  # one batch on one worker process
        done_at_submit = progress()
        t1 = time.monotonic()
        behind = _finish(b, _submit(b, _items("behind", args.small)), 3600)
        behind_s = time.monotonic() - t1
        assert behind["status"] == "succeeded", behind
        done_at_finish = progress()
        a.post(f"/v1/jobs/{big_id}/cancel")
    finally:
        for p in reversed(procs):
            p.stop()
        redis_proc.stop()
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
    left = args.big - done_at_finish
    report = {
        "db": args.db,
        "cpus": os.cpu_count(),
        "worker_processes": args.concurrency,
        "big_items": args.big,
        "small_items": args.small,
        "big_submit_s": round(submit_s, 1),
        "big_pairs_per_s": round(rate, 1),
        "batch_s": round(batch_s, 2),
        "small_alone_s": round(alone_s, 2),
        "small_behind_big_s": round(behind_s, 2),
        "ratio_behind_to_alone": round(behind_s / alone_s, 2),
        "small_behind_big_in_batch_times": round(behind_s / batch_s, 2),
        "big_done_when_small_submitted": done_at_submit,
        "big_done_when_small_finished": done_at_finish,
        "big_items_left_when_small_finished": left,
        "oldest_first_would_wait_s_at_least": round(
            (args.big - done_at_submit) / rate, 0
        ),  # the old feeder: every batch of A first
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
