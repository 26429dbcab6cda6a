"""Repository functions for retraining: feedback, training runs and schedules (versions: storage.registry)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from rewardq.storage.clock import utcnow
from rewardq.storage.models import Feedback, RunStatus, Schedule, TrainingRun, now_sql

_CHUNK = 5000
FINISHED_RUNS = (RunStatus.succeeded.value, RunStatus.rejected.value, RunStatus.failed.value)


# -- feedback -------------------------------------------------------------------------------------


def add_feedback(session: Session, *, tenant: str, rows: Sequence[dict[str, Any]]) -> int:
    """Bulk-insert validated feedback rows (keys: kind, prompt, response, chosen, rejected, rating)."""
    now = utcnow()
    for lo in range(0, len(rows), _CHUNK):
        chunk = [{"tenant": tenant, "created_at": now, "response": None, "chosen": None, "rejected": None,
                  "rating": None, **r} for r in rows[lo : lo + _CHUNK]]  # fmt: skip
        session.execute(insert(Feedback), chunk)
    return len(rows)


def lock_feedback_quota(session: Session, *, tenant: str) -> None:
    """Serialise the tenant's feedback uploads until the transaction ends, so a quota checked is a quota kept: a
    transaction-scoped advisory lock on PostgreSQL; SQLite has one writer, and a transaction that read the count
    cannot write after another committed."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"feedback:{tenant}"})


def feedback_stats(session: Session, *, tenant: str) -> dict[str, int]:
    """{'total', 'preferences', 'ratings', 'max_id'} for a tenant."""
    out = {"total": 0, "preferences": 0, "ratings": 0, "max_id": 0}
    q = select(Feedback.kind, func.count(), func.max(Feedback.id)).where(Feedback.tenant == tenant)
    for kind, n, max_id in session.execute(q.group_by(Feedback.kind)):
        out["preferences" if kind == "preference" else "ratings"] = int(n)
        out["total"] += int(n)
        out["max_id"] = max(out["max_id"], int(max_id or 0))
    return out


def count_feedback_after(session: Session, *, tenant: str, after_id: int) -> int:
    q = select(func.count()).select_from(Feedback).where(Feedback.tenant == tenant, Feedback.id > after_id)
    return int(session.scalar(q) or 0)


def iter_feedback(
    session: Session, *, tenant: str, max_id: int, page: int = 10_000, min_id: int = 0
) -> Iterator[Feedback]:
    """A tenant's feedback from ``min_id`` up to ``max_id`` in id order, page by page."""
    last = min_id - 1
    while True:
        q = (
            select(Feedback)
            .where(Feedback.tenant == tenant, Feedback.id > last, Feedback.id <= max_id)
            .order_by(Feedback.id)
            .limit(page)
        )
        rows = list(session.scalars(q))
        yield from rows
        if len(rows) < page:
            return
        last = rows[-1].id


def window_start(session: Session, *, tenant: str, max_id: int, window: int) -> int:
    """The lowest id among the tenant's newest ``window`` feedback rows up to ``max_id`` (0: the window holds them
    all). One range of the (tenant, id) index, read backwards."""
    if window <= 0:
        return 0
    q = (
        select(Feedback.id)
        .where(Feedback.tenant == tenant, Feedback.id <= max_id)
        .order_by(Feedback.id.desc())
        .offset(window - 1)
        .limit(1)
    )
    return int(session.scalar(q) or 0)


def sample_before(session: Session, *, tenant: str, before_id: int, k: int, seed: int) -> list[Feedback]:
    """``k`` of the tenant's feedback rows older than ``before_id``, drawn uniformly with ``seed`` (all of them when
    there are fewer): their ids are read (the index alone), the draw is made here, the rows are read by id."""
    if k <= 0 or before_id <= 0:
        return []
    ids = list(session.scalars(select(Feedback.id).where(Feedback.tenant == tenant, Feedback.id < before_id)))
    picked = sorted(random.Random(seed).sample(ids, min(k, len(ids))))
    rows: list[Feedback] = []
    for i in range(0, len(picked), 1000):
        rows += session.scalars(select(Feedback).where(Feedback.id.in_(picked[i : i + 1000])).order_by(Feedback.id))
    return rows


# -- training runs --------------------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    tenant: str,
    params: dict[str, Any],
    schedule_id: str | None = None,
    scheduled_for: datetime | None = None,
) -> TrainingRun:
    run = TrainingRun(id=uuid.uuid4().hex, tenant=tenant, params=params, schedule_id=schedule_id,
                      scheduled_for=scheduled_for, progress={}, loss_curve=[], metrics={},
                      enqueued_at=now_sql(session))  # fmt: skip
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, *, run_id: str, tenant: str | None = None) -> TrainingRun | None:
    run = session.get(TrainingRun, run_id)
    if run is None or (tenant is not None and run.tenant != tenant):
        return None
    return run


def list_runs(session: Session, *, tenant: str, limit: int = 50) -> list[TrainingRun]:
    q = select(TrainingRun).where(TrainingRun.tenant == tenant)
    return list(session.scalars(q.order_by(TrainingRun.created_at.desc(), TrainingRun.id).limit(limit)))


class LeaseLost(Exception):
    """The run is no longer this worker's (the sweeper gave it back and another worker claimed it, or it ended): the
    worker must stop and write nothing more about it."""


def start_run(
    session: Session,
    *,
    run_id: str,
    base_version: str,
    n_feedback: int,
    max_feedback_id: int,
    worker: str | None = None,
    start_version: str | None = None,
) -> int | None:
    """Claim a queued run for ``worker``: a compare-and-set on ``queued``, so a redelivered message (a visibility
    timeout, a duplicate from the sweeper) finds it running and does nothing. Returns the claim's fencing token (one
    more than the last claim's), or None when someone else has it."""
    return session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.queued.value)
        .values(
            status=RunStatus.running.value,
            started_at=now_sql(session),
            base_version=base_version,
            start_version=start_version,
            n_feedback=n_feedback,
            max_feedback_id=max_feedback_id,
            worker=worker,
            lease=TrainingRun.lease + 1,
        )
        .returning(TrainingRun.lease)
    ).scalar_one_or_none()


def _held(run_id: str, lease: int) -> Any:
    return (TrainingRun.id == run_id) & (TrainingRun.status == RunStatus.running.value) & (TrainingRun.lease == lease)


def fence(session: Session, *, run_id: str, lease: int) -> None:
    """Raise LeaseLost unless the run is running under ``lease``; otherwise lock its row until the transaction ends
    (a write, so SQLite takes its write lock too): the sweeper cannot give it back, nor another claim take it, before
    this transaction's other writes (a version, a promotion) commit with it."""
    held = session.execute(
        update(TrainingRun).where(_held(run_id, lease)).values(lease=TrainingRun.lease).returning(TrainingRun.id)
    ).all()
    if not held:
        raise LeaseLost(f"training run {run_id} is no longer held under lease {lease}")


def release_runs_of(
    session: Session,
    *,
    run_ids: Sequence[str],
    workers: Sequence[str],
    died: Sequence[bool] | None = None,
    max_deaths: int | None = None,
) -> tuple[list[str], list[str]]:
    """Put back to ``queued`` the running runs whose worker is gone (each still held by the worker the caller saw
    dead: a compare-and-set), for another worker to take over. A run whose worker died (``died``) counts a death; at
    ``max_deaths`` it fails with the reason instead (it kills its workers: out of memory, a native crash, the hard
    time limit), freeing the tenant's slot. Returns (ids released, ids failed)."""
    released, failed = [], []
    flags = list(died) if died is not None else [True] * len(run_ids)
    for run_id, worker, dead in zip(run_ids, workers, flags, strict=True):
        deaths = session.execute(
            update(TrainingRun)
            .where(
                TrainingRun.id == run_id,
                TrainingRun.status == RunStatus.running.value,
                TrainingRun.worker == worker,
            )
            .values(
                status=RunStatus.queued.value,
                worker=None,
                enqueued_at=now_sql(session),
                deaths=TrainingRun.deaths + int(dead),
            )  # fmt: skip
            .returning(TrainingRun.deaths)
        ).scalar_one_or_none()
        if deaths is None:
            continue
        if max_deaths is not None and dead and deaths >= max_deaths:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(
                    status=RunStatus.failed.value,
                    finished_at=now_sql(session),
                    error=f"its worker died {deaths} times running it (out of memory, a native crash or the hard "
                    "time limit): use a smaller batch_size or max_length, or a worker with more memory",
                )
            )
            failed.append(run_id)
        else:
            released.append(run_id)
    return released, failed


def running_runs(session: Session, *, limit: int = 500) -> list[tuple[str, str | None, datetime | None]]:
    """(run id, worker, when it was claimed) of every running run."""
    q = select(TrainingRun.id, TrainingRun.worker, TrainingRun.started_at).where(
        TrainingRun.status == RunStatus.running.value
    )
    return [(r, w, t) for r, w, t in session.execute(q.limit(limit)).tuples()]


def queued_runs_before(session: Session, *, before: datetime, limit: int = 500) -> list[tuple[str, datetime | None]]:
    """(run id, last enqueue time) of queued runs last enqueued before ``before`` (or never)."""
    q = select(TrainingRun.id, TrainingRun.enqueued_at).where(
        TrainingRun.status == RunStatus.queued.value,
        (TrainingRun.enqueued_at < before) | TrainingRun.enqueued_at.is_(None),
    )
    return [(r, t) for r, t in session.execute(q.limit(limit)).tuples()]


def claim_run_requeue(session: Session, *, run_id: str, seen: datetime | None) -> bool:
    """Compare-and-set on a queued run's enqueue time, so two sweepers publish it once."""
    seen_cond = TrainingRun.enqueued_at.is_(None) if seen is None else TrainingRun.enqueued_at == seen
    res = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.queued.value, seen_cond)
        .values(enqueued_at=now_sql(session))
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def set_run_progress(
    session: Session, *, run_id: str, lease: int, progress: dict[str, Any], loss_curve: list[Any]
) -> None:
    """Record the run's progress; LeaseLost when the run is no longer held under ``lease``."""
    held = session.execute(
        update(TrainingRun)
        .where(_held(run_id, lease))
        .values(progress=progress, loss_curve=loss_curve)
        .returning(TrainingRun.id)
    ).all()
    if not held:
        raise LeaseLost(f"training run {run_id} is no longer held under lease {lease}")


def finish_run(
    session: Session,
    *,
    run_id: str,
    status: RunStatus,
    metrics: dict[str, Any] | None = None,
    result_version: str | None = None,
    error: str | None = None,
    lease: int | None = None,
) -> bool:
    """End the run; with ``lease``, only while it is still held under that lease (a run taken over is the new
    worker's). True when this call ended it."""
    values: dict[str, Any] = {"status": status.value, "finished_at": now_sql(session), "result_version": result_version,
                              "error": error}  # fmt: skip
    if metrics is not None:
        values["metrics"] = metrics
    q = update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.status.not_in(FINISHED_RUNS))
    if lease is not None:
        q = q.where(_held(run_id, lease))
    return bool(session.execute(q.values(**values).returning(TrainingRun.id)).all())


def last_run_feedback_id(session: Session, *, tenant: str) -> int:
    """The feedback high-water mark of the tenant's last run that trained and was gated (succeeded or rejected): a
    run that failed, or has not ended, consumes no feedback, so a schedule's next slot still counts it as new."""
    q = select(func.max(TrainingRun.max_feedback_id)).where(
        TrainingRun.tenant == tenant,
        TrainingRun.status.in_((RunStatus.succeeded.value, RunStatus.rejected.value)),
    )
    return int(session.scalar(q) or 0)


def open_run_of_schedule(session: Session, *, schedule_id: str) -> str | None:
    """A run of the schedule that is queued or running, if any (a schedule never stacks runs)."""
    q = select(TrainingRun.id).where(
        TrainingRun.schedule_id == schedule_id,
        TrainingRun.status.in_((RunStatus.queued.value, RunStatus.running.value)),
    )
    return session.scalars(q.limit(1)).first()


def open_run_of_tenant(session: Session, *, tenant: str) -> str | None:
    """The tenant's queued or running run, if any: a tenant has one at a time (a unique index holds it)."""
    q = select(TrainingRun.id).where(
        TrainingRun.tenant == tenant,
        TrainingRun.status.in_((RunStatus.queued.value, RunStatus.running.value)),
    )
    return session.scalars(q.limit(1)).first()


def count_schedules(session: Session, *, tenant: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Schedule).where(Schedule.tenant == tenant)) or 0)


# -- schedules ------------------------------------------------------------------------------------


def create_schedule(
    session: Session, *, tenant: str, cron: str, min_new_feedback: int, params: dict[str, Any], next_run_at: datetime
) -> Schedule:
    sched = Schedule(id=uuid.uuid4().hex, tenant=tenant, cron=cron, min_new_feedback=min_new_feedback,
                     params=params, next_run_at=next_run_at)  # fmt: skip
    session.add(sched)
    session.flush()
    return sched


def list_schedules(session: Session, *, tenant: str | None) -> list[Schedule]:
    q = select(Schedule).order_by(Schedule.created_at, Schedule.id)
    if tenant is not None:
        q = q.where(Schedule.tenant == tenant)
    return list(session.scalars(q))


def delete_schedule(session: Session, *, tenant: str, schedule_id: str) -> bool:
    sched = session.get(Schedule, schedule_id)
    if sched is None or sched.tenant != tenant:
        return False
    session.delete(sched)
    return True


def due_schedules(session: Session, *, now: datetime) -> list[Schedule]:
    return list(session.scalars(select(Schedule).where(Schedule.next_run_at <= now)))


def claim_slot(session: Session, *, schedule_id: str, due: datetime, next_run_at: datetime) -> bool:
    """Move a schedule past ``due`` if no one else has: a compare-and-set, so of several beat
    processes exactly one wins each slot."""
    res = session.execute(
        update(Schedule)
        .where(Schedule.id == schedule_id, Schedule.next_run_at == due)
        .values(next_run_at=next_run_at, last_fired_at=now_sql(session))
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]
