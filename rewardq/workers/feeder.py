"""Backpressure: batches go to Redis only while the scoring queue is below its high-water mark.

SQL holds every batch; the feeder moves the next ones (tenants round robin, and each tenant's own jobs round robin)
into the queue whenever a job is created, a worker finishes a batch, or beat ticks, so Redis never holds a whole
large job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from rewardq.storage import ledger
from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.settings import Settings, get_settings
from rewardq.workers import metrics
from rewardq.workers.messages import ScoreBatch, build_messages, enqueue_score_batches, fair_priority, served_last

log = logging.getLogger(__name__)


def queue_depth(url: str, queue: str) -> int:
    """Messages waiting in ``queue``, over all its priority steps."""
    return metrics.queue_depths(url, [queue])[queue]


def enqueue_claimed(
    rows: Sequence[tuple[Any, ...]],
    settings: Settings | None = None,
    died: bool = False,
    flight: dict[str, int] | None = None,
) -> int:
    """Claim each (job, batch, start, end, seen enqueue time, version, seen take time) by compare-and-set and
    publish the ones won, each at its tenant's fair-share priority; a publish that fails leaves them to the sweeper.
    ``died``: their worker died on them (counted). ``flight``: each tenant's batches in flight before these claims,
    when the caller counted them already. Returns how many were published."""
    settings = settings or get_settings()
    messages: list[ScoreBatch] = []
    with session_scope(settings.database_url) as s:
        if flight is None:  # before these claims: a tenant's first batch in flight goes first
            flight = ledger.in_flight_by_tenant(s)
        for job_id, batch_no, start, end, seen, version, taken in rows:
            if ledger.claim_requeue(s, job_id=job_id, batch_no=batch_no, seen=seen, taken=taken, died=died):
                messages += build_messages(s, job_id=job_id, model_version=version,
                                           batches=[repo.BatchRef(batch_no, start, end)])  # fmt: skip
    try:
        last = served_last(settings.redis_url, sorted({m.tenant for m in messages}))
    except redis.RedisError:  # then no tenant jumps the queue: the publish below says whether Redis is back
        last = {m.tenant for m in messages}
    priorities = []
    for msg in messages:
        priorities.append(fair_priority(flight.get(msg.tenant, 0), msg.tenant in last))
        flight[msg.tenant] = flight.get(msg.tenant, 0) + 1
    if messages:
        enqueue_score_batches(messages, queue=settings.scoring_queue, priorities=priorities)
    return len(messages)


def refill_room(settings: Settings) -> int:
    """How much room a worker waits for before it feeds: a quarter of REWARDQ_QUEUE_HIGH_WATER (8 of 32). Feeding
    after every batch cost a fifth of a worker's time with every text cached (two transactions and a read of the
    ledger per message); this way each feed moves several batches. A new job's first batches wait at most that many
    batches, or one beat tick (the API feeds at submission and beat at each tick, with any room)."""
    return max(1, settings.queue_high_water // 4)


def feed(settings: Settings | None = None, min_room: int = 1) -> int:
    """Top the scoring queue up to REWARDQ_QUEUE_HIGH_WATER messages, tenants served round robin; return how many
    were added. ``min_room``: do nothing (one LLEN) unless at least that many messages fit."""
    settings = settings or get_settings()
    room = settings.queue_high_water - queue_depth(settings.redis_url, settings.scoring_queue)
    if room < max(1, min_room):
        return 0
    with session_scope(settings.database_url) as s:
        by_job = ledger.in_flight_by_job(s)  # once: the round robin and the priorities both read it
        flight = ledger.in_flight_by_tenant(s, by_job)
        rows = [(b.job_id, b.batch_no, b.start_idx, b.end_idx, None, version, b.started_at)
                for b, version, _ in ledger.unqueued_batches(s, limit=room, flight=flight, by_job=by_job)]  # fmt: skip
    return enqueue_claimed(rows, settings, flight=flight) if rows else 0


def feed_quietly(min_room: int = 1) -> None:
    """feed(), for callers whose own work must not fail because of it (the next feed catches up)."""
    try:
        feed(min_room=min_room)
    except Exception:
        log.exception("could not feed the scoring queue")
