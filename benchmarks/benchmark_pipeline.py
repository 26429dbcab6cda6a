"""Pipeline throughput against the in-process limit and against the script a user would write instead.

Two workloads: all-unique pairs (STS-B dev, 1,500) and RLHF-shaped (100 prompts x 20 responses). For each:
  (a) raw in-process encoder + kernel, same model and batching as a worker (the limit);
  (b) what a user would write: sentence-transformers `encode` of both sides, cosine, exp;
  (c) the full pipeline: submit through the API -> a worker -> every result read back through the API.
Each repetition runs a, b and c back to back on texts no cache has seen, in a rotating order;
pairs/s are medians over the repetitions and each ratio is the median of the per-repetition ratios.
Plus ingestion: N items POSTed as ndjson, items/s and the API process's peak RSS.
Writes benchmarks/results/pipeline.json (every repetition's figures too) and prints a table.

    python benchmarks/benchmark_pipeline.py [--ingest-items 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def workloads() -> dict[str, list[dict[str, str]]]:
    from api.samples import load_bundled, load_sts

    dev = load_sts("dev") or load_bundled()
    unique = [{"id": str(i), "prompt": x["prompt"], "response": x["response"]} for i, x in enumerate(dev)]
    sentences = list(dict.fromkeys([x["response"] for x in dev]))
    prompts = [x["prompt"] for x in dev[:100]]
    rlhf = [{"id": f"{p}-{r}", "prompt": prompts[p], "response": sentences[(p * 20 + r) % len(sentences)]}
            for p in range(len(prompts)) for r in range(20)]  # fmt: skip
    return {"unique (STS-B dev)": unique, "RLHF-shaped (100 x 20)": rlhf}


def in_process(items: list[dict[str, str]], batch_size: int) -> float:
    from workers.models.sim_exp import SimExpModel
    from workers.registry import default_encoder_path

    model = _cached("model", lambda: SimExpModel("bench", default_encoder_path()))
    t0 = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        model.score([x["prompt"] for x in chunk], [x["response"] for x in chunk])
    return len(items) / (time.perf_counter() - t0)


def user_script(items: list[dict[str, str]]) -> float:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from workers.registry import default_encoder_path

    st = _cached("st", lambda: SentenceTransformer(default_encoder_path(), device="cpu"))
    t0 = time.perf_counter()
    a = st.encode([x["prompt"] for x in items], batch_size=64, convert_to_numpy=True)
    b = st.encode([x["response"] for x in items], batch_size=64, convert_to_numpy=True)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.exp(-cos)
    return len(items) / (time.perf_counter() - t0)


def _variant(items: list[dict[str, str]], k: str) -> list[dict[str, str]]:
    return [{"id": x["id"], "prompt": f"{x['prompt']} ({k})", "response": f"{x['response']} ({k})"} for x in items]


def _sized(items: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The first ``n`` pairs (0: all); past the workload's size, more copies of it, each with its own texts and ids."""
    if not n:
        return items
    out = list(items[:n])
    copy = 0
    while len(out) < n:
        copy += 1
        more = [{**x, "id": f"{x['id']}.{copy}"} for x in _variant(items, f"copy {copy}")]
        out += more[: n - len(out)]
    return out


_CACHE: dict[str, object] = {}


def _cached(name, make):
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


class Stack:
    """Redis (the running one or a private one), a SQLite database, one worker and the API, as processes."""

    def __init__(self, tmp: Path, db_url: str | None = None, worker: bool = True, reserved: bool = False):
        """``reserved``: a second worker process that serves only the interactive queue (the first one takes
        bulk and training work); otherwise one worker serves every queue, interactive first."""
        from api.procs import free_port, redis_answers, start_api, start_redis, start_worker
        from storage.migrate import upgrade
        from workers.registry import register_base_version

        self.procs = []
        redis_url = os.environ.get("REWARDQ_REDIS_URL", "redis://127.0.0.1:6379/0")
        if not redis_answers(redis_url):
            port = free_port()
            self.procs.append(start_redis(port, tmp / "redis.log"))
            redis_url = f"redis://127.0.0.1:{port}/0"
        self.db_url = db_url or f"sqlite:///{tmp / 'bench.db'}"
        self.env = {**os.environ, "REWARDQ_DATABASE_URL": self.db_url,
                    "REWARDQ_REDIS_URL": redis_url, "REWARDQ_SCORING_QUEUE": f"bench-{os.getpid()}",
                    "REWARDQ_INTERACTIVE_QUEUE": f"bench-{os.getpid()}-interactive",
                    "REWARDQ_TRAINING_QUEUE": f"bench-{os.getpid()}-training", "PYTHONPATH": str(ROOT),
                    # A loopback API for the benchmark's own clients: no keys, and no limit on what they measure.
                    "REWARDQ_ALLOW_ANONYMOUS": "1", "REWARDQ_RATE_LIMIT_PER_MINUTE": "0"}  # fmt: skip
        os.environ.update({k: self.env[k] for k in ("REWARDQ_DATABASE_URL", "REWARDQ_REDIS_URL")})
        from storage.settings import get_settings

        get_settings.cache_clear()
        upgrade()
        register_base_version()
        if worker and reserved:
            bulk = ",".join(self.env[f"REWARDQ_{q}_QUEUE"] for q in ("SCORING", "TRAINING"))
            self.procs.append(start_worker(self.env, tmp / "worker.log", queues=bulk))
            self.procs.append(start_worker(self.env, tmp / "worker-interactive.log",
                                           queues=self.env["REWARDQ_INTERACTIVE_QUEUE"]))  # fmt: skip
        elif worker:
            self.procs.append(start_worker(self.env, tmp / "worker.log"))
        self.port = free_port()
        self.procs.append(start_api(self.env, tmp / "api.log", self.port))
        self.api_pid = self.procs[-1].pid

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def pipeline(stack: Stack, items: list[dict[str, str]]) -> float:
    from api.client import Client

    with Client(f"http://127.0.0.1:{stack.port}") as c:
        t0 = time.perf_counter()
        job_id = c.submit(items)
        c.wait(job_id, progress=False, timeout=1800)  # long polls: the end is seen at once
        n = sum(1 for _ in c.results(job_id, page=10_000))
        took = time.perf_counter() - t0
    assert n == len(items), (n, len(items))
    return len(items) / took


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(num, den, strict=True))


def _cache_hits(stack: Stack) -> float:
    """Embedding cache hits the worker has counted: texts it did not have to encode."""
    from workers import metrics

    return metrics.read(stack.env["REWARDQ_REDIS_URL"]).get("embed_cache_hits", 0.0)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ingestion(stack: Stack, n: int) -> dict[str, float]:
    import httpx

    line = b'{"prompt": "How do I bake bread at home?", "response": "Mix flour, water, salt and yeast, then bake."}\n'
    body = line * n
    t0 = time.perf_counter()
    resp = httpx.post(f"http://127.0.0.1:{stack.port}/v1/jobs", content=body, timeout=1800,
                      headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    took = time.perf_counter() - t0
    assert resp.status_code == 202, resp.text[:500]
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}") as c:
        c.post(f"/v1/jobs/{resp.json()['job_id']}/cancel")  # measured the intake; no need to score it
    return {"items": n, "items_per_s": n / took, "seconds": took, "api_peak_rss_mb": peak_rss_mb(stack.api_pid)}


@contextmanager
def throwaway_database(admin_url: str, name: str) -> Iterator[str]:
    """A PostgreSQL database made for one measurement and dropped after it; yields its SQLAlchemy URL."""
    import psycopg

    from storage.db import get_engine

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_ingestion(admin_url: str, tmp: Path, n: int) -> dict[str, float]:
    with throwaway_database(admin_url, f"rewardq_bench_{os.getpid()}") as url:
        stack = Stack(tmp, db_url=url, worker=False)
        try:
            return ingestion(stack, n)
        finally:
            stack.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    p.add_argument("--ingest-items", type=int, default=1_000_000)
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="N pairs of each workload: the first N, or more copies of it with their own texts past its size",
    )
    p.add_argument(
        "--pg-admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="where to create a throwaway database for the PostgreSQL ingestion run ('' to skip)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline.json")
    args = p.parse_args()
    from storage.settings import get_settings

    batch_size = get_settings().batch_size
    tmp = Path(tempfile.mkdtemp(prefix="rewardq-bench-"))
    nonce = uuid.uuid4().hex[:8]
    stack = Stack(tmp)
    rows = []
    try:
        for w, (name, items) in enumerate(workloads().items()):
            items = _sized(items, args.pairs)
            warm = _variant(items[:64], f"{nonce}.{w}.warm")  # model loads and first-call costs, not measured
            pipeline(stack, warm)
            in_process(warm, batch_size)
            user_script(warm)
            # Each repetition gets texts no cache has seen (the worker's LRU and the shared Redis cache
            # outlive a run, and the nonce keeps an earlier invocation's entries out). The three ways run
            # back to back on the same texts, in a rotating order, so a drift in the speed of a shared
            # machine lands on all three alike; each ratio is the median of the per-repetition ratios.
            took: dict[str, list[float]] = {"a": [], "b": [], "c": []}
            ways = {"a": lambda v: in_process(v, batch_size), "b": user_script, "c": lambda v: pipeline(stack, v)}
            hits = []  # per repetition: texts the worker did not have to encode (a prompt repeated in the job)
            for k in range(args.repeat):
                v = _variant(items, f"{nonce}.{w}.{k}")
                for way in "abc"[k % 3 :] + "abc"[: k % 3]:
                    hits0 = _cache_hits(stack)
                    took[way].append(ways[way](v))
                    if way == "c":
                        hits.append(_cache_hits(stack) - hits0)
            a, b, c = (statistics.median(took[way]) for way in "abc")
            rows.append({"workload": name, "pairs": len(items), "a_in_process": a, "b_user_script": b,
                         "c_pipeline": c, "c_over_a": _median_ratio(took["c"], took["a"]),
                         "c_over_b": _median_ratio(took["c"], took["b"]), "runs": took,
                         "pipeline_cache_hits": hits})  # fmt: skip
        ingest = {"SQLite": ingestion(stack, args.ingest_items)} if args.ingest_items else {}
    finally:
        stack.close()
    if args.pg_admin_url and args.ingest_items:
        ingest["PostgreSQL"] = pg_ingestion(args.pg_admin_url, tmp, args.ingest_items)
    print("| workload | pairs | (a) in-process pairs/s | (b) user script pairs/s | (c) pipeline pairs/s | c/a | c/b |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['pairs']} | {r['a_in_process']:.0f} | {r['b_user_script']:.0f} | "
              f"{r['c_pipeline']:.0f} | {r['c_over_a']:.2f} | {r['c_over_b']:.2f} |")  # fmt: skip
    print("| ingestion (ndjson POST) | items | items/s | API peak RSS |")
    print("|---|---|---|---|")
    for db, r in ingest.items():
        print(f"| {db} | {r['items']:,} | {r['items_per_s']:,.0f} | {r['api_peak_rss_mb']:.0f} MB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "repeat": args.repeat, "batch_size": batch_size, "nonce": nonce}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "ingestion": ingest}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
