"""Deleting data: one job with everything it holds, a tenant's feedback, what REWARDQ_RETENTION_DAYS lets go, and
fine-tuned versions nothing uses (rejected candidates, versions past REWARDQ_KEEP_VERSIONS).

A job is removed, not tombstoned: its items, results, error ledger, batches and row go, so its id answers 404 as if
it never existed (and its Idempotency-Key may make a new job). Big deletions go in chunks, each its own short
transaction (SQLite's write lock is the whole database's), so unlike the repository modules these functions take
a database URL and commit as they go. Every step is idempotent: a deletion cut short (a crash, a timeout, a second
deleter such as another beat) is finished by running it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from rewardq.storage.clock import as_utc
from rewardq.storage.db import session_scope
from rewardq.storage.models import (
    FINISHED,
    ActiveVersion,
    Batch,
    EnsembleMember,
    Feedback,
    Item,
    ItemError,
    Job,
    JobStatus,
    ModelVersion,
    Result,
    RunStatus,
    TrainingRun,
    db_now,
    now_sql,
)
from rewardq.storage.repository import lock_job

CHUNK = 10_000  # rows per statement and transaction: a fraction of a second of locks
_CHILDREN: tuple[type[Result] | type[ItemError] | type[Item], ...] = (Result, ItemError, Item)


@dataclass
class JobDeletion:
    """What deleting one job removed: rows per table, and whether it was cancelled first."""

    job_id: str
    cancelled: bool = False
    items: int = 0
    results: int = 0
    item_errors: int = 0
    batches: int = 0
    complete: bool = False  # the job row is gone (False: a row budget stopped it; run it again to finish)
    batch_nos: list[int] = field(default_factory=list)  # for the broker's bookkeeping (workers.messages)

    def add(self, table: Any, n: int) -> None:
        name = {Result: "results", ItemError: "item_errors", Item: "items", Batch: "batches"}[table]
        setattr(self, name, getattr(self, name) + n)

    def rows(self) -> dict[str, int]:
        return {"items": self.items, "results": self.results, "item_errors": self.item_errors, "batches": self.batches}


def _delete_chunk(session: Session, table: Any, job_id: str, limit: int) -> int:
    """Up to ``limit`` of the job's rows of ``table``, lowest index first (on the (job_id, idx) primary key)."""
    first = select(table.idx).where(table.job_id == job_id).order_by(table.idx).limit(limit)
    res = session.execute(
        delete(table).where(table.job_id == job_id, table.idx.in_(first)),
        execution_options={"synchronize_session": False},
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def delete_job(
    url: str | None,
    *,
    job_id: str,
    tenant: str | None = None,
    where: ColumnElement[bool] | None = None,
    max_rows: int | None = None,
    chunk: int = CHUNK,
) -> JobDeletion | None:
    """Delete a job (``tenant``'s, when given) and every row it holds; None when there is no such job.

    1. A job still queued or running is cancelled (the compare-and-set of POST /cancel), so the feeder and the
       sweeper stop enqueuing its batches and workers skip the ones they take.
    2. Results, error ledger and items go ``chunk`` rows per transaction, each under the job's exclusive row lock
       (repository.lock_job, which waits for the writes in flight).
    3. One last transaction, under the lock, deletes what a worker that was mid-batch wrote meanwhile, the batches
       and the job row. A worker finishing a batch after that finds no job and drops the batch
       (repository.hold_job).
    ``max_rows`` bounds the rows deleted in steps 2 and 3 (beat's purge per tick): ``complete`` says if it got
    there; running it again resumes. ``where`` is checked on the job row at each step (the purge's age test)."""
    out = JobDeletion(job_id)
    with session_scope(url) as s:
        # Not under the exclusive lock: writers hold the job shared and keep arriving while it runs (PostgreSQL grants
        # a new shared holder before a waiting exclusive one), so the lock could wait for as long as the job runs.
        # Cancelled first, no new batch is taken, and the writes in flight (a batch or two per worker) let it go.
        conds = [c for c in (where, Job.tenant == tenant if tenant is not None else None) if c is not None]
        if s.scalar(select(Job.id).where(Job.id == job_id, *conds)) is None:
            return None
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.not_in(FINISHED), *conds)
            .values(status=JobStatus.cancelled.value, finished_at=now_sql(s)),
            execution_options={"synchronize_session": False},
        )
        out.cancelled = bool(res.rowcount)  # type: ignore[attr-defined]
    left = max_rows
    for table in _CHILDREN:
        while True:
            limit = chunk if left is None else min(chunk, left)
            if limit <= 0:
                return out  # the budget is spent: the next run resumes here
            with session_scope(url) as s:
                if not lock_job(s, job_id=job_id, where=where):
                    return out  # another deleter finished it
                n = _delete_chunk(s, table, job_id, limit)
            out.add(table, n)
            left = None if left is None else left - n
            if n < limit:
                break
    with session_scope(url) as s:
        if not lock_job(s, job_id=job_id, where=where):
            return out
        out.batch_nos = list(s.scalars(select(Batch.batch_no).where(Batch.job_id == job_id)))
        rest: tuple[Any, ...] = (*_CHILDREN, Batch)
        for kind in rest:  # what a worker wrote since its chunk was deleted (a batch's rows at most), and the ledger
            res = s.execute(delete(kind).where(kind.job_id == job_id), execution_options={"synchronize_session": False})
            out.add(kind, int(res.rowcount))  # type: ignore[attr-defined]
        s.execute(delete(Job).where(Job.id == job_id), execution_options={"synchronize_session": False})
    out.complete = True
    return out


def delete_feedback(
    url: str | None,
    *,
    tenant: str | None,
    before: datetime | None = None,
    max_rows: int | None = None,
    chunk: int = CHUNK,
) -> tuple[int, bool]:
    """Delete ``tenant``'s feedback (every tenant's when None), only rows created before ``before`` when given, in
    chunks of ``chunk`` rows, lowest id first; returns (rows deleted, whether none are left to delete)."""
    conds: list[ColumnElement[bool]] = []
    if tenant is not None:
        conds.append(Feedback.tenant == tenant)
    if before is not None:
        conds.append(Feedback.created_at < as_utc(before))
    deleted = 0
    while max_rows is None or deleted < max_rows:
        limit = chunk if max_rows is None else min(chunk, max_rows - deleted)
        # Rows locked in id order (FOR UPDATE; SQLite has one writer anyway): two deleters of the same rows (the API
        # and beat, or two beats) wait for one another instead of deadlocking, and the second deletes what is left.
        first = select(Feedback.id).where(*conds).order_by(Feedback.id).limit(limit).with_for_update()
        with session_scope(url) as s:
            res = s.execute(
                delete(Feedback).where(Feedback.id.in_(first)), execution_options={"synchronize_session": False}
            )
        n = int(res.rowcount)  # type: ignore[attr-defined]
        deleted += n
        if n < limit:
            return deleted, True
    return deleted, False


def expired_jobs(session: Session, *, cutoff: datetime, limit: int = 100) -> list[str]:
    """Ids of jobs that ended (succeeded, failed or cancelled) before ``cutoff``, oldest first."""
    q = select(Job.id).where(finished_before(cutoff)).order_by(Job.finished_at, Job.id)
    return list(session.scalars(q.limit(limit)))


def retention_cutoff(url: str | None, days: float) -> datetime:
    """Now minus ``days``, by the database's clock (the one finish times are written with)."""
    with session_scope(url) as s:
        return db_now(s) - timedelta(days=days)


def finished_before(cutoff: datetime) -> ColumnElement[bool]:
    """The purge's test on a job row, checked again under its lock."""
    return Job.status.in_(FINISHED) & (Job.finished_at < cutoff)


def _unused(mv: Any) -> ColumnElement[bool]:
    """A version nothing uses: active in no scope, named by no job (a job keeps the version it was scored with), and a
    member of no ensemble."""
    return (
        ~exists().where(ActiveVersion.version == mv.version)
        & ~exists().where(Job.model_version == mv.version)
        & ~exists().where(EnsembleMember.member == mv.version)
    )


def collectable_versions(
    session: Session, *, rejected_before: datetime | None, keep_newest: int, limit: int = 100
) -> list[tuple[str, str | None]]:
    """(version, path) of fine-tuned versions that may go: a candidate its run's gate rejected, made before
    ``rejected_before`` (None: none of these), and, when ``keep_newest`` > 0, any of a tenant's fine-tuned versions
    past its newest ``keep_newest``; in both cases only one nothing uses (_unused). Imported and base versions stay."""
    mv = aliased(ModelVersion)
    picks: list[tuple[str, str | None]] = []
    if rejected_before is not None:
        q = (
            select(mv.version, mv.path)
            .join(TrainingRun, and_(TrainingRun.id == mv.run_id, TrainingRun.result_version == mv.version))
            .where(TrainingRun.status == RunStatus.rejected.value, mv.created_at < rejected_before, _unused(mv))
            .order_by(mv.created_at)
            .limit(limit)
        )
        picks += [(v, p) for v, p in session.execute(q).tuples()]
    if keep_newest > 0:
        rank = (
            func.row_number()
            .over(partition_by=ModelVersion.owner, order_by=(ModelVersion.created_at.desc(), ModelVersion.version))
            .label("rank")
        )
        ranked = (
            select(ModelVersion.version.label("version"), rank)
            .where(ModelVersion.run_id.is_not(None), ModelVersion.owner.is_not(None))
            .subquery()
        )
        q = (
            select(mv.version, mv.path)
            .join(ranked, ranked.c.version == mv.version)
            .where(ranked.c.rank > keep_newest, _unused(mv))
            .order_by(mv.created_at)
            .limit(limit)
        )
        seen = {v for v, _ in picks}
        picks += [(v, p) for v, p in session.execute(q).tuples() if v not in seen]
    return picks


def delete_version(session: Session, *, version: str) -> bool:
    """Delete one version's row if nothing uses it now, checked in the same statement; False if something took it
    up meanwhile (an activation, a job: the foreign key refuses the delete) or it is gone. Its files are the
    caller's to remove after the commit."""
    try:
        with session.begin_nested():
            res = session.execute(
                delete(ModelVersion).where(ModelVersion.version == version, _unused(ModelVersion)),
                execution_options={"synchronize_session": False},
            )
    except IntegrityError:  # a job or an activation that committed between the check and the delete
        return False
    return bool(res.rowcount)  # type: ignore[attr-defined]
