"""The sweeper: SQL, not Redis, says what is done, so batches whose worker is gone, or whose message was lost, are
enqueued again.

- A batch whose worker's heartbeat has expired (killed, frozen, cut off from Redis) goes back at once: within
  REWARDQ_HEARTBEAT_TTL_S plus one sweep interval of the worker's end. A healthy worker keeps beating, however long
  its batch takes.
- A batch queued REWARDQ_LOST_AFTER_S ago and never taken, while the queue is empty, was lost (a Redis restart).
- REWARDQ_BATCH_DEADLINE_S is the last resort for a worker that beats but never finishes (6 hours by default).
A re-enqueued batch that its first worker still finishes is harmless: results are upserted once per (job, item).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import redis

from storage import repository as repo
from storage.db import session_scope
from storage.settings import get_settings
from workers import liveness, metrics
from workers.feeder import enqueue_claimed, queue_depth

log = logging.getLogger(__name__)


def _queue_empty(url: str, queue: str) -> bool:
    try:
        return queue_depth(url, queue) == 0
    except (redis.RedisError, OSError):
        return False


def sweep(now: datetime | None = None) -> int:
    """Re-enqueue every batch whose worker is gone, or that is lost or overdue, once (a compare-and-set per batch);
    return how many."""
    settings = get_settings()
    now = now or datetime.now(timezone.utc)
    deadline = now - timedelta(seconds=settings.batch_deadline_s)
    fresh = now - timedelta(seconds=settings.heartbeat_ttl_s)  # a worker beat just before it claimed these
    lost_before = now - timedelta(seconds=min(settings.lost_after_s, settings.batch_deadline_s))
    with session_scope() as s:
        taken_rows = [
            (b.job_id, b.batch_no, b.start_idx, b.end_idx, b.enqueued_at, v, b.worker, _utc(b.started_at))
            for b, v in repo.taken_batches(s)
            if b.started_at is not None
        ]
        lost_rows = [
            (b.job_id, b.batch_no, b.start_idx, b.end_idx, b.enqueued_at, v)
            for b, v in repo.stale_batches(s, older_than=lost_before)
            if not _taken(b.started_at, b.enqueued_at)
        ]
    beating = liveness.alive(settings.redis_url, [row[6] for row in taken_rows if row[6]])
    orphaned = [row[:6] for row in taken_rows if row[6] and row[6] not in beating and row[7] < fresh]
    overdue = [row[:6] for row in taken_rows if (not row[6] or row[6] in beating) and row[7] < deadline]
    if lost_rows and not _queue_empty(settings.redis_url, settings.scoring_queue):
        lost_rows = []  # still queued behind a backlog, most likely: not a reason
    rows = orphaned + overdue + lost_rows
    requeued = enqueue_claimed(rows, now) if rows else 0
    if requeued:
        log.warning(
            "re-enqueued %d batch(es): %d whose worker is gone, %d past the deadline, %d lost",
            requeued,
            len(orphaned),
            len(overdue),
            len(lost_rows),
        )
        metrics.record(settings.redis_url, {"batches_requeued": requeued})
    return requeued


def _taken(started: datetime | None, enqueued: datetime | None) -> bool:
    """Was the batch taken by a worker after it was last enqueued?"""
    return started is not None and enqueued is not None and _utc(started) >= _utc(enqueued)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
