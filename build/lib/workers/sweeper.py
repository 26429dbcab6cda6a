"""The sweeper: SQL, not Redis, says what is done, so batches overdue in SQL are enqueued again.

It covers a worker killed mid-batch, a message lost with a Redis restart, anything that leaves a
batch undone past REWARDQ_BATCH_DEADLINE_S. A re-enqueued batch that its first worker still
finishes is harmless: results are upserted once per (job, item).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import redis

from storage import repository as repo
from storage.db import session_scope
from storage.settings import get_settings
from workers import metrics
from workers.feeder import enqueue_claimed, queue_depth

log = logging.getLogger(__name__)


def _queue_empty(url: str, queue: str) -> bool:
    try:
        return queue_depth(url, queue) == 0
    except (redis.RedisError, OSError):
        return False


def sweep(now: datetime | None = None) -> int:
    """Re-enqueue every overdue batch once (a compare-and-set per batch); return how many.

    Overdue: a worker took it more than the deadline ago and never finished it (the worker died),
    or it was enqueued more than the deadline ago, never taken, and the queue is empty (the
    message was lost). A long backlog alone is not a reason: those batches are still queued.
    """
    settings = get_settings()
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(seconds=settings.batch_deadline_s)
    with session_scope() as s:
        stale = repo.stale_batches(s, older_than=cutoff)
        overdue = [(b.job_id, b.batch_no, b.start_idx, b.end_idx, b.enqueued_at, version, _taken(b.started_at,
                    b.enqueued_at)) for b, version in stale]  # fmt: skip
    if any(not taken for *_, taken in overdue) and not _queue_empty(settings.redis_url, settings.scoring_queue):
        overdue = [row for row in overdue if row[-1]]
    requeued = enqueue_claimed([row[:-1] for row in overdue], now) if overdue else 0
    if requeued:
        log.warning("re-enqueued %d overdue batch(es)", requeued)
        metrics.record(settings.redis_url, {"batches_requeued": requeued})
    return requeued


def _taken(started: datetime | None, enqueued: datetime | None) -> bool:
    """Was the batch taken by a worker after it was last enqueued?"""
    return started is not None and enqueued is not None and _utc(started) >= _utc(enqueued)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
