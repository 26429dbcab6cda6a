"""The sweeper: SQL, not Redis, says what is done, so batches whose worker is gone, or whose message was lost, are
enqueued again.

- A batch whose worker's heartbeat has expired (killed, frozen, cut off from Redis) goes back at once: within
  REWARDQ_HEARTBEAT_TTL_S plus one sweep interval of the worker's end. A healthy worker keeps beating, however long
  its batch takes. It counts as a death on the batch unless the worker's last words say it was writing the batch's
  results then (workers.writer), not scoring it.
- A batch queued REWARDQ_LOST_AFTER_S ago, never taken, whose message is not waiting in a queue, was lost (a Redis
  restart): found under any load, without waiting for the queue to drain.
- REWARDQ_BATCH_DEADLINE_S is the last resort for a worker that beats but never finishes (6 hours by default).
- A job whose every item has an outcome but that is still open is closed: on PostgreSQL a write closes its job after
  its commit (repository.advance_job), and its worker may have stopped in between.
A re-enqueued batch that its first worker still finishes is harmless: results are upserted once per (job, item).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from rewardq.storage import ledger
from rewardq.storage import repository as repo
from rewardq.storage import training_repository as trepo
from rewardq.storage.clock import as_utc
from rewardq.storage.db import session_scope
from rewardq.storage.models import db_now
from rewardq.storage.settings import get_settings
from rewardq.workers import events, liveness, metrics
from rewardq.workers.celery_app import queue_lists
from rewardq.workers.errors import RETRY_BACKOFF_MAX_S
from rewardq.workers.feeder import enqueue_claimed
from rewardq.workers.messages import QUEUED_BATCHES, batch_key, enqueue_training_run, run_key

log = logging.getLogger(__name__)


def sweep(now: datetime | None = None) -> int:
    """Re-enqueue every batch whose worker is gone, or that is lost or overdue, once (a compare-and-set per batch);
    return how many. Jobs left open with every item done are closed first (close_complete_jobs)."""
    settings = get_settings()
    try:
        close_complete_jobs()
    except Exception:  # the batches below must not wait for it
        log.exception("could not close the jobs left open")
    with session_scope() as s:
        now = now or db_now(s)  # the clock the times compared here were written with, whichever host wrote them
    deadline = now - timedelta(seconds=settings.batch_deadline_s)
    fresh = now - timedelta(seconds=settings.heartbeat_ttl_s)  # a worker beat just before it claimed these
    # A batch its live worker left may have a retry waiting up to a minute (workers.tasks): give it that first.
    retries_done = fresh - timedelta(seconds=RETRY_BACKOFF_MAX_S)
    lost_before = now - timedelta(seconds=min(settings.lost_after_s, settings.batch_deadline_s))
    with session_scope() as s:
        taken_rows = [
            (
                b.job_id,
                b.batch_no,
                b.start_idx,
                b.end_idx,
                b.enqueued_at,
                v,
                b.started_at,
                b.worker,
                as_utc(b.started_at),
            )  # fmt: skip
            for b, v in ledger.taken_batches(s)
            if b.started_at is not None
        ]
        lost_rows = [
            (b.job_id, b.batch_no, b.start_idx, b.end_idx, b.enqueued_at, v, b.started_at)
            for b, v in ledger.untaken_batches(s, older_than=lost_before)
        ]
    if liveness.trusted(settings.redis_url, settings.heartbeat_ttl_s):
        beats = liveness.doing(settings.redis_url, [row[7] for row in taken_rows if row[7]])
    else:  # Redis has just restarted: every worker looks dead until it beats again
        beats = {row[7]: "1" for row in taken_rows if row[7]}
    gone = [row for row in taken_rows if row[7] and row[7] not in beats and row[8] < fresh]
    # Its worker died while writing its results (workers.writer), not scoring it: the batch did not kill it (the
    # next one may have), so no death is counted, or an innocent batch would be quarantined beside a killer.
    words = liveness.last_words(settings.redis_url, [str(row[7]) for row in gone]) if gone else {}
    written: list[tuple[Any, ...]] = []
    orphaned: list[tuple[Any, ...]] = []
    for row in gone:
        died_writing = liveness.died_writing(words.get(str(row[7])), batch_key(row[0], row[1]))
        (written if died_writing else orphaned).append(row[:7])
    # A live worker that no longer works on a batch it took (a retry waiting in its memory, lost with a Redis
    # restart) left it: no death, but no reason to wait for the deadline either.
    left = [
        row[:7]
        for row in taken_rows
        if row[7] and liveness.abandoned(beats.get(row[7]), batch_key(row[0], row[1])) and row[8] < retries_done
    ]
    left_keys = {row[:2] for row in left}
    overdue = [
        row[:7]
        for row in taken_rows
        if (not row[7] or row[7] in beats) and row[8] < deadline and row[:2] not in left_keys
    ]
    if lost_rows:  # lost, unless its message still waits behind a backlog (checked directly, not by an empty queue)
        client = metrics.client(settings.redis_url)
        waiting = client.smembers(QUEUED_BATCHES)
        # Noted as waiting, but a worker that prefetched its message may have died before taking it (the broker
        # gives such a message back only after its 1-hour visibility timeout): look for it in the queues themselves
        # (kept short by the feeder's high-water mark).
        messages = [
            m
            for queue in (settings.scoring_queue, settings.interactive_queue)
            for name in queue_lists(queue)
            for m in client.lrange(name, 0, -1)
        ]
        queued = b"\n".join(m if isinstance(m, bytes) else str(m).encode() for m in messages)
        lost_rows = [
            row
            for row in lost_rows
            if batch_key(row[0], row[1]).encode() not in waiting
            or f"'job_id': '{row[0]}', 'batch_no': {row[1]},".encode() not in queued
        ]
    requeued = enqueue_claimed(orphaned, died=True) if orphaned else 0
    rows = written + left + overdue + lost_rows
    requeued += enqueue_claimed(rows) if rows else 0
    if requeued:
        log.warning(
            "re-enqueued %d batch(es): %d whose worker is gone (%d of them while writing), %d it left, %d past the "
            "deadline, %d lost",
            requeued,
            len(orphaned) + len(written),
            len(written),
            len(left),
            len(overdue),
            len(lost_rows),
        )
        metrics.record(settings.redis_url, {"batches_requeued": requeued})
    return requeued


def close_complete_jobs() -> list[str]:
    """Close the live jobs whose every item has an outcome and wake their waiters; return their ids. On PostgreSQL a
    write closes its job after its commit, in a transaction of its own (repository.advance_job): a worker stopped in
    between (killed, cut off) left it open. On SQLite a write closes its job in its own transaction: nothing to do."""
    with session_scope() as s:
        if s.get_bind().dialect.name != "postgresql":
            return []
        repo.close_if_complete(s)
        closed = list(s.info.get(repo.CLOSED, {}))
    if closed:
        log.warning("closed job(s) %s: every item had an outcome, and their last writer did not close them", closed)
        for job_id in closed:
            events.publish_finished(get_settings().redis_url, job_id)
    return closed


def sweep_runs(now: datetime | None = None) -> list[str]:
    """Training runs cannot be lost: a running run whose worker's heartbeat expired, or whose live worker no longer
    works on it, goes back to ``queued`` (a compare-and-set on that worker) and is enqueued again for another worker,
    until REWARDQ_MAX_WORKER_DEATHS workers have died on it: then it fails with that reason; a queued run enqueued
    REWARDQ_LOST_AFTER_S ago whose message is not in the training queue (a beat killed between its commit and its
    publish, a Redis restart) is enqueued again. A duplicate message is harmless: a run is claimed once. Returns
    the ids enqueued."""
    settings = get_settings()
    with session_scope() as s:
        now = now or db_now(s)
        running = trepo.running_runs(s)
    if not liveness.trusted(settings.redis_url, settings.heartbeat_ttl_s):
        running = []  # Redis has just restarted: every worker looks dead until it beats again
    beats = liveness.doing(settings.redis_url, [w for _, w, _ in running if w])
    fresh = now - timedelta(seconds=settings.heartbeat_ttl_s)  # it names the run in its heartbeat once claimed
    # Its worker is gone (a death: killed, out of memory, frozen past its heartbeat), or alive but no longer on it.
    dead = [
        (r, w, w not in beats)
        for r, w, started in running
        if w
        and (
            w not in beats
            or (liveness.abandoned(beats[w], run_key(r)) and (started is None or as_utc(started) < fresh))
        )
    ]
    released: list[str] = []
    if dead:
        with session_scope() as s:
            released, failed = trepo.release_runs_of(
                s,
                run_ids=[r for r, _, _ in dead],
                workers=[w for _, w, _ in dead],
                died=[d for _, _, d in dead],
                max_deaths=settings.max_worker_deaths,
            )
        if failed:
            log.warning("training runs %s failed: their workers died %d times", failed, settings.max_worker_deaths)
    with session_scope() as s:
        stale = trepo.queued_runs_before(s, before=now - timedelta(seconds=settings.lost_after_s))
    lost: list[str] = []
    if stale:
        waiting = metrics.client(settings.redis_url).lrange(settings.training_queue, 0, -1)
        with session_scope() as s:
            lost = [
                r
                for r, seen in stale
                if not any(r.encode() in m for m in waiting) and trepo.claim_run_requeue(s, run_id=r, seen=seen)
            ]
    for run_id in released + lost:
        enqueue_training_run(run_id, queue=settings.training_queue)
    if released or lost:
        log.warning("re-enqueued training runs: %s whose worker is gone, %s lost", released, lost)
        metrics.record(settings.redis_url, {"runs_requeued": float(len(released) + len(lost))})
    return released + lost
