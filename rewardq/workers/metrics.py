"""Counters the workers add to in Redis and the API's /metrics reads: one hash for all worker processes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import redis

log = logging.getLogger(__name__)

KEY = "rewardq:metrics"

# name -> (help, type) for what the workers count; /metrics renders them in Prometheus text format.
COUNTERS: dict[str, str] = {
    "items_scored": "result rows written",
    "items_failed": "items put in the error ledger",
    "batches": "queue messages scored",
    "encoder_batches": "encoder forward passes",
    "tokens": "real tokens encoded",
    "padded_tokens": "tokens encoded including padding",
    "encode_seconds": "time in the encoder",
    "kernel_seconds": "time in the reward kernel",
    "db_seconds": "time writing results and progress",
    "batches_requeued": "overdue batches the sweeper enqueued again",
    "runs_requeued": "training runs the sweeper enqueued again (their worker gone, or their message lost)",
    "embed_cache_hits": "texts whose embedding came from a cache (the worker's own or the shared one)",
    "embed_cache_misses": "texts the encoder had to run on",
    "embed_shared_hits": "texts whose embedding another worker had encoded (the Redis cache)",
    "truncated_texts": "texts cut to the version's token limit",
    "interactive_items": "pairs scored in the interactive lane (POST /v1/score, /get_reward, /score)",
    "interactive_batches": "interactive request parts scored",
    "batches_preempted": "bulk batches stopped for waiting interactive work and queued again",
    "batches_fenced": "batches a worker scored after another took them over (it froze past its heartbeat): dropped",
    "batches_kernel_triton": "batches (bulk and interactive) whose reward kernel ran compiled Triton",
    "batches_kernel_torch": "batches whose reward kernel ran the torch path (no GPU, forced, or a failed self-check)",
    "kernel_selfcheck_failures": "worker starts whose kernel self-check failed (that kernel then runs the torch path)",
}


@lru_cache(maxsize=8)
def client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL and process: a worker talks to Redis after every batch,
    so it must not open a connection each time. redis-py resets the pool in a forked child."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def record_into(pipe: Any, values: Mapping[str, float]) -> None:
    """record(), as commands queued on the caller's pipeline (one round trip with other work)."""
    for k, v in values.items():
        if v:
            pipe.hincrbyfloat(KEY, k, v)


def record(url: str, values: Mapping[str, float]) -> None:
    """Add to the shared counters; metrics never fail the work they describe."""
    try:
        pipe = client(url).pipeline()
        record_into(pipe, values)
        pipe.execute()
    except (redis.RedisError, OSError):
        log.debug("metrics not recorded: Redis unreachable")


def read(url: str) -> dict[str, float]:
    raw: dict[bytes, bytes] = client(url).hgetall(KEY)  # type: ignore[assignment]
    return {k.decode(): float(v) for k, v in raw.items()}


def queue_depths(url: str, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue, over all its priority steps (one round trip)."""
    from rewardq.workers.celery_app import queue_lists

    pipe = client(url).pipeline()
    for q in queues:
        for name in queue_lists(q):
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {q: sum(int(next(lengths)) for _ in queue_lists(q)) for q in queues}
