"""The batch ledger's queries for the feeder and the sweeper: which batches wait to be enqueued (shared among
tenants), which are in flight, which a worker took or lost, and the compare-and-set that enqueues a batch once."""

from __future__ import annotations

import heapq
from datetime import datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from rewardq.storage.models import Batch, Job, JobStatus, now_sql

# A job still being worked on; a batch a worker took after it was last enqueued (a worker is on it, or died on it).
LIVE_JOB = Job.status.in_((JobStatus.queued.value, JobStatus.running.value))
TAKEN_SINCE_ENQUEUED = and_(
    Batch.started_at.is_not(None), Batch.enqueued_at.is_not(None), Batch.started_at >= Batch.enqueued_at
)
_UNQUEUED = and_(Batch.enqueued_at.is_(None), Batch.done.is_(False))  # in SQL only: never enqueued, not done


def in_flight_by_tenant(session: Session) -> dict[str, int]:
    """Batches enqueued and not done (waiting in Redis or being scored), per tenant with a live job."""
    q = (
        select(Job.tenant, func.count())
        .select_from(Batch)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.enqueued_at.is_not(None), Batch.done.is_(False), LIVE_JOB)
        .group_by(Job.tenant)
    )
    return {tenant: int(n) for tenant, n in session.execute(q).tuples()}


def unqueued_batches(
    session: Session, *, limit: int, flight: dict[str, int] | None = None
) -> list[tuple[Batch, str, str]]:
    """Up to ``limit`` batches of live jobs never enqueued, with their job's model version and tenant, shared among
    the tenants round robin (fair share): each pick goes to the tenant with the fewest batches in flight, and within a
    tenant to its oldest job. A tenant's million-item job so never keeps another tenant's small one waiting.
    ``flight``: in_flight_by_tenant, when the caller counted it already."""
    waiting = (
        select(Job.tenant, func.min(Job.created_at))
        .where(
            LIVE_JOB,
            select(Batch.job_id).where(Batch.job_id == Job.id, _UNQUEUED).exists(),
        )
        .group_by(Job.tenant)
    )
    tenants = {tenant: first for tenant, first in session.execute(waiting).tuples()}
    if not tenants:
        return []
    flight = flight if flight is not None else in_flight_by_tenant(session)
    # At most ``limit`` picks: only the ``limit`` least busy tenants can get one.
    chosen = sorted(tenants, key=lambda t: (flight.get(t, 0), tenants[t]))[:limit]
    queues: dict[str, list[tuple[Batch, str]]] = {}
    for tenant in chosen:
        q = (
            select(Batch, Job.model_version)
            .join(Job, Job.id == Batch.job_id)
            .where(Job.tenant == tenant, _UNQUEUED, LIVE_JOB)
            .order_by(Job.created_at, Batch.job_id, Batch.batch_no)
            .limit(limit)
        )
        queues[tenant] = [(b, v) for b, v in session.execute(q).tuples()][::-1]
    picked: list[tuple[Batch, str, str]] = []
    heap = [(flight.get(t, 0), tenants[t], t) for t in chosen if queues[t]]
    heapq.heapify(heap)
    while heap and len(picked) < limit:
        n, first, tenant = heapq.heappop(heap)
        batch, version = queues[tenant].pop()
        picked.append((batch, version, tenant))
        if queues[tenant]:
            heapq.heappush(heap, (n + 1, first, tenant))
    return picked


def untaken_batches(session: Session, *, older_than: datetime, limit: int = 500) -> list[tuple[Batch, str]]:
    """Unfinished batches of live jobs last enqueued before ``older_than`` that no worker took since, with their
    job's model version."""
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
    q = (
        select(Batch, Job.model_version)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.done.is_(False), TAKEN_SINCE_ENQUEUED, LIVE_JOB)
        .order_by(Batch.started_at)
        .limit(limit)
    )
    return [(b, v) for b, v in session.execute(q).tuples()]


def claim_requeue(session: Session, *, job_id: str, batch_no: int, seen: datetime | None, died: bool = False) -> bool:
    """Compare-and-set on the batch's enqueue time, so two feeders or sweepers enqueue a batch once. ``died``: it
    goes back because its worker died on it (counted)."""
    seen_cond = Batch.enqueued_at.is_(None) if seen is None else Batch.enqueued_at == seen
    res = session.execute(
        update(Batch)
        .where(Batch.job_id == job_id, Batch.batch_no == batch_no, Batch.done.is_(False), seen_cond)
        .values(enqueued_at=now_sql(session), attempts=Batch.attempts + 1, deaths=Batch.deaths + int(died))
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]
