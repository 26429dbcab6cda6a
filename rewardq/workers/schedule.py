"""Retraining schedules (and the sweeper, and the retention purge) for Celery beat: read from SQL on every tick, so
adding or deleting one needs no restart; each due slot is claimed by compare-and-set, so two beat processes fire it
once."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from celery import beat
from sqlalchemy.exc import IntegrityError

from rewardq.storage import cron
from rewardq.storage import training_repository as trepo
from rewardq.storage.clock import as_utc
from rewardq.storage.db import session_scope
from rewardq.storage.models import db_now
from rewardq.storage.settings import get_settings
from rewardq.workers.feeder import feed_quietly
from rewardq.workers.messages import enqueue_training_run
from rewardq.workers.retention import purge_tick
from rewardq.workers.sweeper import sweep, sweep_runs

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
MIN_FEEDBACK = 3


def fire_due_schedules(now: datetime | None = None) -> list[str]:
    """Create and enqueue a training run for every schedule slot that is due; return the new run ids."""
    with session_scope() as s:
        now = now or db_now(s)
        due = [(d.id, d.tenant, d.cron, d.next_run_at, d.min_new_feedback, dict(d.params))
               for d in trepo.due_schedules(s, now=now)]  # fmt: skip
    started = []
    gap = timedelta(seconds=get_settings().min_schedule_interval_s)
    for sched_id, tenant, expr, slot, min_new, params in due:
        try:
            run_id = _fire(sched_id, tenant, expr, slot, min_new, params, now, gap)
        except IntegrityError:  # the tenant's own run won the race for its one open run: the slot fires next tick
            log.info("schedule %s: the tenant started a run meanwhile; slot %s tried again", sched_id, slot)
            continue
        if run_id is None:
            continue
        enqueue_training_run(run_id, queue=get_settings().training_queue)
        log.info("schedule %s fired run %s for slot %s", sched_id, run_id, slot.isoformat())
        started.append(run_id)
    return started


def _fire(
    sched_id: str,
    tenant: str,
    expr: str,
    slot: datetime,
    min_new: int,
    params: dict[str, Any],
    now: datetime,
    gap: timedelta,
) -> str | None:
    """Claim the slot and create its run (None: another beat took it, or there is nothing to do)."""
    with session_scope() as s:
        # Slots missed while no beat ran are skipped, not replayed: the next one is after now, and at least
        # REWARDQ_MIN_SCHEDULE_INTERVAL_S after this one (a schedule made before that limit existed keeps it too).
        after = max(as_utc(now), as_utc(slot) + gap - timedelta(microseconds=1))
        if not trepo.claim_slot(s, schedule_id=sched_id, due=slot, next_run_at=cron.next_fire(expr, after)):
            return None  # another beat process took this slot
        # Training outlasts the period, or the tenant started a run of its own: skip the slot rather than pile
        # runs up (a tenant has one queued or running run at a time).
        open_run = trepo.open_run_of_tenant(s, tenant=tenant)
        if open_run is not None:
            log.info("schedule %s: run %s has not ended, slot %s skipped", sched_id, open_run, slot.isoformat())
            return None
        new = trepo.count_feedback_after(s, tenant=tenant, after_id=trepo.last_run_feedback_id(s, tenant=tenant))
        total = trepo.feedback_stats(s, tenant=tenant)["total"]
        if new < min_new or total < MIN_FEEDBACK:
            log.info("schedule %s: %d new feedback rows (%d needed), %d in all: not retraining",
                     sched_id, new, min_new, total)  # fmt: skip
            return None
        return str(trepo.create_run(s, tenant=tenant, params=params, schedule_id=sched_id, scheduled_for=slot).id)


class SqlScheduler(beat.Scheduler):  # type: ignore[misc]
    """Celery beat scheduler whose entries are the rows of the schedules table; it also runs the sweeper and the
    retention purge (workers.retention)."""

    _last_sweep = 0.0
    _next_purge = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            fire_due_schedules()
        except Exception:  # a database hiccup must not stop the clock
            log.exception("could not check retraining schedules")
        if time.monotonic() - self._last_sweep >= get_settings().sweep_interval_s:
            self._last_sweep = time.monotonic()
            try:
                sweep()
                sweep_runs()
            except Exception:  # the database or Redis is out: try again at the next tick, not an interval later
                log.exception("sweeper failed")
                self._last_sweep = 0.0
            feed_quietly()
        if time.monotonic() >= self._next_purge:  # REWARDQ_RETENTION_DAYS: hourly, sooner while a backlog lasts
            self._next_purge = time.monotonic() + purge_tick()
        return min(float(super().tick(*args, **kwargs)), POLL_SECONDS)
