"""``rewardq demo``: the whole pipeline on one machine, started and stopped in one command."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from rewardq.api.procs import Proc, free_port, redis_answers, start_api, start_redis, start_worker
from rewardq.client.client import Client
from rewardq.client.samples import demo_items

DEMO_DIR = Path("demo-run")


def _histogram(scores: list[float], bins: int = 10, width: int = 40) -> list[str]:
    lo, hi = min(scores), max(scores)
    step = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / step), bins - 1)] += 1
    top = max(counts) or 1
    return [f"  {lo + i * step:7.4f} .. {lo + (i + 1) * step:7.4f} | {'#' * round(c / top * width):<{width}} {c}"
            for i, c in enumerate(counts)]  # fmt: skip


def summarize(job: dict[str, Any], results: list[dict[str, Any]], ratings: dict[str, float]) -> list[str]:
    scores = [r["score"] for r in results]
    s = job["summary"] or {}
    lines = [
        f"scored {len(results)} pairs with model {job['model_version']} in {job['elapsed_s'] or 0:.1f}s "
        f"({job['pairs_per_s'] or 0:.0f} pairs/s), status {job['status']}",
        f"score: mean {s.get('mean', 0):.4f}  std {s.get('std', 0):.4f}  min {s.get('min', 0):.4f}  "
        f"p10 {s.get('p10', 0):.4f}  p50 {s.get('p50', 0):.4f}  p90 {s.get('p90', 0):.4f}  max {s.get('max', 0):.4f}",
        "distribution:",
        *_histogram(scores),
    ]
    rated = [(r["score"], ratings[r["id"]]) for r in results if r["id"] in ratings]
    if len(rated) > 2:
        from scipy.stats import spearmanr

        rho = spearmanr([a for a, _ in rated], [b for _, b in rated]).statistic
        lines.append(f"Spearman(score, human rating) over {len(rated)} rated pairs: {rho:+.3f}"
                     "  (the untrained seed reward falls as similarity rises; fine-tuning reverses it)")  # fmt: skip
    ranked = sorted(results, key=lambda r: r["score"])
    for title, rows in (("highest reward", ranked[::-1][:3]), ("lowest reward", ranked[:3])):
        lines.append(f"{title}:")
        for r in rows:
            lines.append(f"  {r['score']:.4f}  {r['prompt'][:60]!r} -> {r['response'][:60]!r}")
    return lines


def run_demo(keep: bool = False, limit: int | None = None, api_port: int | None = None) -> int:
    from rewardq.storage.migrate import upgrade
    from rewardq.workers.registry import register_base_version

    if DEMO_DIR.exists() and not keep:
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("REWARDQ_ALLOW_ANONYMOUS", "1")  # its API listens on 127.0.0.1 only, for the demo's own client
    env["REWARDQ_DATABASE_URL"] = f"sqlite:///{(DEMO_DIR / 'rewardq.db').resolve()}"
    env.setdefault("REWARDQ_REDIS_URL", "redis://127.0.0.1:6379/0")
    procs: list[Proc] = []
    try:
        if not redis_answers(env["REWARDQ_REDIS_URL"]):
            port = free_port()
            redis_proc = start_redis(port, DEMO_DIR / "redis.log")
            if redis_proc is None:
                click.echo(
                    f"No Redis answers at {env['REWARDQ_REDIS_URL']} and redis-server is not installed.\n"
                    "Install one (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis),\n"
                    "or point REWARDQ_REDIS_URL at a running Redis, then run 'make demo' again.",
                    err=True,
                )
                return 2
            procs.append(redis_proc)
            env["REWARDQ_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            click.echo(f"started redis-server on port {port} (no persistence)")
        else:
            click.echo(f"using Redis at {env['REWARDQ_REDIS_URL']}")
        os.environ.update({k: env[k] for k in ("REWARDQ_DATABASE_URL", "REWARDQ_REDIS_URL")})
        from rewardq.storage.settings import get_settings

        get_settings.cache_clear()
        upgrade(env["REWARDQ_DATABASE_URL"])
        version = register_base_version()
        click.echo(f"migrated {env['REWARDQ_DATABASE_URL']}; active model version {version}")

        # Private queues so the demo never feeds (or is fed by) other workers on a shared Redis.
        for lane in ("SCORING", "INTERACTIVE", "TRAINING"):
            env[f"REWARDQ_{lane}_QUEUE"] = f"demo-{os.getpid()}-{lane.lower()}"
        procs.append(start_worker(env, DEMO_DIR / "worker.log"))
        port = api_port or free_port()
        procs.append(start_api(env, DEMO_DIR / "api.log", port))
        click.echo(f"started a worker (pid {procs[-2].pid}) and the API on http://127.0.0.1:{port}")

        source, items = demo_items(limit)
        ratings = {it["id"]: float(it["rating"]) for it in items if "rating" in it}
        click.echo(f"submitting {len(items)} pairs from {source}")
        with Client(f"http://127.0.0.1:{port}") as client:
            t0 = time.monotonic()
            job_id = client.submit([{k: it[k] for k in ("id", "prompt", "response")} for it in items],
                                   metadata={"source": source})  # fmt: skip
            job = client.wait(job_id, progress=True, timeout=900)
            results = list(client.results(job_id))
            wall = time.monotonic() - t0
        click.echo("")
        for line in summarize(job, results, ratings):
            click.echo(line)
        click.echo(f"end to end (submit -> every result read back): {wall:.1f}s, {len(results) / wall:.0f} pairs/s")
        ok = job["status"] == "succeeded" and len(results) == len(items)
        click.echo("demo OK" if ok else f"demo FAILED: status {job['status']}, {len(results)}/{len(items)} results")
        return 0 if ok else 1
    except Exception as exc:
        click.echo(f"demo failed: {exc}", err=True)
        for p in procs:
            click.echo(f"--- last lines of {p.name} log ({p.log_path}) ---\n{p.tail()}", err=True)
        return 1
    finally:
        for p in reversed(procs):
            p.stop()
        click.echo(f"stopped {len(procs)} process(es) the demo started" + ("" if keep else "; removed demo-run/"))
        if not keep:
            shutil.rmtree(DEMO_DIR, ignore_errors=True)
