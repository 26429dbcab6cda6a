"""Typed task payloads and the enqueue helper: all that the API needs from the workers (no torch here)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from pydantic import BaseModel
from sqlalchemy.orm import Session

from rewardq.storage import repository as repo
from rewardq.workers import metrics
from rewardq.workers.celery_app import SCORE_BATCH, SCORE_INTERACTIVE, TRAIN, app

log = logging.getLogger(__name__)


class ScoreBatch(BaseModel):
    """One queued message: a contiguous range of a job's items and their texts."""

    job_id: str
    batch_no: int
    start_idx: int
    model_version: str
    prompts: list[str]
    responses: list[str]
    tenant: str = ""  # whose texts: the embedding cache's scope (workers.engine.cache_scope)


class InteractiveBatch(BaseModel):
    """One part of an interactive request (POST /v1/score): its texts; the reply goes to the request's list."""

    request_id: str
    part: int
    model_version: str
    prompts: list[str]
    responses: list[str]
    tenant: str = ""


def enqueue_interactive(messages: Sequence[InteractiveBatch], queue: str, expires_s: float) -> None:
    """Publish the parts of an interactive request; a part no worker took within ``expires_s`` is dropped."""
    with app.producer_or_acquire() as producer:
        for msg in messages:
            app.send_task(
                SCORE_INTERACTIVE,
                kwargs={"payload": msg.model_dump()},
                queue=queue,
                producer=producer,
                expires=expires_s,
            )


# Which batches have a message waiting in a queue ("job:batch"): published here, removed by the worker that takes
# one. The sweeper tells a lost message from one waiting behind a backlog by it (a Redis restart loses both).
QUEUED_BATCHES = "rewardq:queued-batches"


def batch_key(job_id: str, batch_no: int) -> str:
    return f"{job_id}:{batch_no}"


def forget_batches(url: str, job_id: str, batch_nos: Sequence[int]) -> None:
    """A deleted job's batches are waiting nowhere any more (a message of one still in a queue is skipped when a
    worker takes it). Best effort: a member left behind by a Redis outage names a batch that no longer exists."""
    keys = [batch_key(job_id, n) for n in batch_nos]
    try:
        for lo in range(0, len(keys), 1000):
            metrics.client(url).srem(QUEUED_BATCHES, *keys[lo : lo + 1000])
    except redis.RedisError:
        log.warning("could not forget the queued batches of deleted job %s", job_id)


def run_key(run_id: str) -> str:
    """A training run as a worker's heartbeat names it (workers.liveness)."""
    return f"run:{run_id}"


def fair_priority(in_flight: int, served_last: bool) -> int:
    """The priority step of a tenant's next bulk batch. A tenant with no batch in flight (waiting in Redis or being
    scored) goes ahead of everything queued (step 0), so a small job is taken within a batch time or two, unless no
    other tenant's batch was finished since its own last one (``served_last``). Every other batch joins the queue in
    order (step 9), and the feeder's round robin shares the queue between tenants with work. So a tenant that
    submits batch after batch, or a stream of small jobs, jumps at most every other batch: it can never starve a
    large job's queued backlog (tests/test_fair_share.py)."""
    return 0 if in_flight < 1 and not served_last else 9


SERVED = "rewardq:tenant-served"  # tenant -> the SERVED_SEQ value when a worker last finished one of its batches
SERVED_SEQ = "rewardq:served-seq"  # batches finished, all tenants


# The next SERVED_SEQ value, stored as the tenant's: one command, so it can share a pipeline with other work.
_NOTE_SERVED = "redis.call('HSET', KEYS[1], ARGV[1], redis.call('INCR', KEYS[2]))"


def note_served_into(pipe: Any, tenant: str) -> None:
    """note_served(), as a command queued on the caller's pipeline."""
    if tenant:
        pipe.eval(_NOTE_SERVED, 2, SERVED, SERVED_SEQ, tenant)


def note_served(url: str, tenant: str) -> None:
    """A worker finished a batch of ``tenant`` (read by the feeder's fair_priority); best effort."""
    pipe = metrics.client(url).pipeline(transaction=False)
    note_served_into(pipe, tenant)
    pipe.execute()


def served_last(url: str, tenants: Sequence[str]) -> set[str]:
    """The tenants among ``tenants`` whose batch was the last one any worker finished (no other since)."""
    if not tenants:
        return set()
    pipe = metrics.client(url).pipeline()
    pipe.get(SERVED_SEQ)
    pipe.hmget(SERVED, list(tenants))
    seq, seen = pipe.execute()
    return {t for t, v in zip(tenants, seen, strict=True) if v is not None and seq is not None and int(v) >= int(seq)}


def enqueue_score_batches(messages: Sequence[ScoreBatch], queue: str, priorities: Sequence[int] | None = None) -> None:
    """Publish the batches to ``queue`` over one broker connection (noting each as waiting first), each at its
    priority step (default 0: served first)."""
    if not messages:
        return
    metrics.client(app.conf.broker_url).sadd(QUEUED_BATCHES, *[batch_key(m.job_id, m.batch_no) for m in messages])
    steps = list(priorities) if priorities is not None else [0] * len(messages)
    with app.producer_or_acquire() as producer:
        for msg, step in zip(messages, steps, strict=True):
            app.send_task(
                SCORE_BATCH, kwargs={"payload": msg.model_dump()}, queue=queue, producer=producer, priority=step
            )


def enqueue_training_run(run_id: str, queue: str) -> None:
    app.send_task(TRAIN, kwargs={"run_id": run_id}, queue=queue)


def build_messages(
    session: Session, *, job_id: str, model_version: str, batches: Sequence[repo.BatchRef]
) -> list[ScoreBatch]:
    """Messages for ledger batches, their texts read back from SQL (for splits and re-enqueues)."""
    out = []
    tenant = repo.job_tenant(session, job_id=job_id) or ""
    for b in batches:
        items = repo.batch_texts(session, job_id=job_id, start_idx=b.start_idx, end_idx=b.end_idx)
        out.append(ScoreBatch(job_id=job_id, batch_no=b.batch_no, start_idx=b.start_idx,
                              model_version=model_version, prompts=[p for p, _ in items],
                              responses=[r for _, r in items], tenant=tenant))  # fmt: skip
    return out
