"""The batch ledger's queries for the feeder and the sweeper: which batches wait to be enqueued (shared among
tenants), which are in flight, which a worker took or lost, and the compare-and-set that enqueues a batch once."""

from __future__ import annotations

import heapq
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select, text, update
from sqlalchemy.orm import Session, aliased

from rewardq.storage.models import Batch, Job, JobStatus, now_sql

# A job still being worked on; a batch a worker took after it was last enqueued (a worker is on it, or died on it).
LIVE_JOB = Job.status.in_((JobStatus.queued.value, JobStatus.running.value))
TAKEN_SINCE_ENQUEUED = and_(
    Batch.started_at.is_not(None), Batch.enqueued_at.is_not(None), Batch.started_at >= Batch.enqueued_at
)
_UNQUEUED = and_(Batch.enqueued_at.is_(None), Batch.done.is_(False))  # in SQL only: never enqueued, not done


def small_scans(session: Session) -> None:
    """On PostgreSQL, no parallel workers for the rest of this transaction. The ledger's queries read a few dozen
    rows through its partial indexes, but the planner cannot see that ``enqueued_at`` and ``done`` are correlated:
    it expects a quarter of a big job's batches in flight and starts workers that cost more than the query (5 ms of
    a 6 ms scan at 400k batches)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


def in_flight_by_job(session: Session) -> dict[str, tuple[str, int]]:
    """Batches enqueued and not done (waiting in Redis or being scored) per live job: {job: (tenant, count)}. Reads
    the in-flight partial index: as many rows as the queue's high-water mark allows, whatever the jobs' sizes."""
    small_scans(session)
    q = (
        select(Batch.job_id, Job.tenant, func.count())
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.enqueued_at.is_not(None), Batch.done.is_(False), LIVE_JOB)
        .group_by(Batch.job_id, Job.tenant)
    )
    return {job: (tenant, int(n)) for job, tenant, n in session.execute(q).tuples()}


def in_flight_by_tenant(session: Session, by_job: dict[str, tuple[str, int]] | None = None) -> dict[str, int]:
    """Batches enqueued and not done, per tenant with a live job (``by_job``: in_flight_by_job, if counted)."""
    out: dict[str, int] = {}
    for tenant, n in (by_job if by_job is not None else in_flight_by_job(session)).values():
        out[tenant] = out.get(tenant, 0) + n
    return out


def _next_unqueued(session: Session, job_id: str, n: int) -> list[Batch]:
    """The job's first ``n`` batches never enqueued: a range of the unqueued partial index, O(n)."""
    q = select(Batch).where(Batch.job_id == job_id, _UNQUEUED).order_by(Batch.batch_no).limit(n)
    return list(session.scalars(q))


def unqueued_batches(
    session: Session,
    *,
    limit: int,
    flight: dict[str, int] | None = None,
    by_job: dict[str, tuple[str, int]] | None = None,
) -> list[tuple[Batch, str, str]]:
    """Up to ``limit`` batches of live jobs never enqueued, with their job's model version and tenant, in the order
    they should go out (fair share):

    - between tenants round robin: each pick goes to the tenant with the fewest batches in flight (ties: the one
      waiting longest), so a tenant's million-item job never keeps another tenant's small one waiting;
    - within a tenant, round robin between its own jobs the same way (fewest in flight, then oldest), so its small
      jobs do not wait behind its own big one either.

    Cost: one row per waiting live job, then an index range per job picked, so the same at 1k and 400k batches.
    ``flight``, ``by_job``: in_flight_by_tenant and in_flight_by_job, when the caller counted them already."""
    small_scans(session)
    by_job = by_job if by_job is not None else in_flight_by_job(session)
    flight = flight if flight is not None else in_flight_by_tenant(session, by_job)
    # Each live job's first unqueued batch, if any: a correlated LIMIT 1 on the unqueued index, one probe per job
    # (an EXISTS let PostgreSQL's planner read the whole index into a bitmap instead).
    next_unqueued = (
        select(Batch.batch_no)
        .where(Batch.job_id == Job.id, _UNQUEUED)
        .order_by(Batch.batch_no)
        .limit(1)
        .correlate(Job)
        .scalar_subquery()
    )
    waiting_q = select(Job.id, Job.tenant, Job.created_at, Job.model_version, next_unqueued).where(LIVE_JOB)
    jobs: dict[str, list[tuple[str, datetime, str]]] = {}
    rows = session.execute(waiting_q.order_by(Job.created_at, Job.id)).tuples()
    for job_id, tenant, created, version, next_batch in rows:
        if next_batch is not None:
            jobs.setdefault(tenant, []).append((job_id, created, version))
    if not jobs:
        return []
    versions = {j: v for entries in jobs.values() for j, _, v in entries}
    job_flight = {j: by_job.get(j, ("", 0))[1] for j in versions}
    tenant_flight = {t: flight.get(t, 0) for t in jobs}
    exhausted: set[str] = set()
    picked: list[tuple[Batch, str, str]] = []
    while len(picked) < limit:
        # Plan the picks on the counts alone, then read each job's share with one index range.
        heaps = {
            t: [(job_flight[j], created, j) for j, created, _ in entries if j not in exhausted]
            for t, entries in jobs.items()
        }
        for h in heaps.values():
            heapq.heapify(h)
        tenants = [(tenant_flight[t], jobs[t][0][1], t) for t, h in heaps.items() if h]
        heapq.heapify(tenants)
        plan: list[tuple[str, str]] = []
        while tenants and len(picked) + len(plan) < limit:
            n, first, tenant = heapq.heappop(tenants)
            jn, created, job_id = heapq.heappop(heaps[tenant])
            plan.append((tenant, job_id))
            heapq.heappush(heaps[tenant], (jn + 1, created, job_id))
            heapq.heappush(tenants, (n + 1, first, tenant))
        if not plan:
            break
        wanted: dict[str, int] = {}
        for _, job_id in plan:
            wanted[job_id] = wanted.get(job_id, 0) + 1
        fetched = {job_id: _next_unqueued(session, job_id, n)[::-1] for job_id, n in wanted.items()}
        short = False
        for tenant, job_id in plan:
            if not fetched[job_id]:  # the job had fewer left than planned: plan the rest again without it
                exhausted.add(job_id)
                short = True
                continue
            picked.append((fetched[job_id].pop(), versions[job_id], tenant))
            job_flight[job_id] += 1
            tenant_flight[tenant] += 1
        if not short:
            break
    return picked


def untaken_batches(session: Session, *, older_than: datetime, limit: int = 500) -> list[tuple[Batch, str]]:
    """Unfinished batches of live jobs last enqueued before ``older_than`` that no worker took since, with their
    job's model version."""
    small_scans(session)
    q = (
        select(Batch, Job.model_version)
        .join(Job, Job.id == Batch.job_id)
        .where(
            Batch.done.is_(False),
            Batch.enqueued_at < older_than,
            ~TAKEN_SINCE_ENQUEUED,
            LIVE_JOB,
        )  # fmt: skip
        .order_by(Batch.enqueued_at)
        .limit(limit)
    )
    return [(b, v) for b, v in session.execute(q).tuples()]


def taken_batches(session: Session, *, limit: int = 2000) -> list[tuple[Batch, str]]:
    """Unfinished batches of live jobs that a worker took after they were last enqueued (so a worker is on them, or
    was until it died), with their job's model version."""
    small_scans(session)
    q = (
        select(Batch, Job.model_version)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.done.is_(False), TAKEN_SINCE_ENQUEUED, LIVE_JOB)
        .order_by(Batch.started_at)
        .limit(limit)
    )
    return [(b, v) for b, v in session.execute(q).tuples()]


def claim_requeue(
    session: Session,
    *,
    job_id: str,
    batch_no: int,
    seen: datetime | None,
    taken: datetime | None = None,
    died: bool = False,
) -> bool:
    """Compare-and-set on the batch's enqueue time and its take time, as the caller read them (``seen``,
    ``taken``), so two feeders or sweepers enqueue a batch once, and a batch a worker took since it was read (a
    slow message, a redelivery) is not queued a second time. ``died``: it goes back because its worker died on it
    (counted)."""

    def claimable(b: Any) -> ColumnElement[bool]:
        seen_cond = b.enqueued_at.is_(None) if seen is None else b.enqueued_at == seen
        taken_cond = b.started_at.is_(None) if taken is None else b.started_at == taken
        return and_(b.job_id == job_id, b.batch_no == batch_no, b.done.is_(False), seen_cond, taken_cond)

    cond = claimable(Batch)
    if session.get_bind().dialect.name == "postgresql":
        # A batch whose row another transaction holds is left to it: another feeder claiming it (every worker feeds
        # after its writes, and two read the same next batches), the sweeper, or its worker taking or writing it.
        # Waiting for it would only find the row changed, and the compare-and-set failed: 4 % of two workers' busy
        # time on one job was that wait (benchmark_orchestration.py's lock samples). SQLite has one writer anyway.
        row = aliased(Batch)
        locked = select(row.batch_no).where(claimable(row)).with_for_update(skip_locked=True).scalar_subquery()
        cond = and_(Batch.job_id == job_id, Batch.batch_no == locked)
    res = session.execute(
        update(Batch)
        .where(cond)
        .values(enqueued_at=now_sql(session), attempts=Batch.attempts + 1, deaths=Batch.deaths + int(died))
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]
