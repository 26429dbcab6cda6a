"""Repository functions over the tables: session first, keyword-only arguments, no commits inside."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardq.storage.db import AFTER_COMMIT
from rewardq.storage.ledger import LIVE_JOB, TAKEN_SINCE_ENQUEUED
from rewardq.storage.models import FINISHED, Batch, Item, ItemError, Job, JobProgress, JobStatus, Result, now_sql

_CHUNK = 5000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewItem:
    item_id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class BatchRef:
    batch_no: int
    start_idx: int
    end_idx: int


# -- jobs ---------------------------------------------------------------------------------------


def begin_job(
    session: Session,
    *,
    tenant: str,
    model_version: str,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """The job row, with no items yet; items are added in chunks, then finish_job() closes the ledger."""
    job = Job(id=uuid.uuid4().hex, tenant=tenant, model_version=model_version, n_items=0, meta=metadata or {},
              idempotency_key=idempotency_key)  # fmt: skip
    session.add(job)
    session.flush()
    return job


_ITEM_COLUMNS = ("job_id", "idx", "item_id", "prompt", "response")


def add_items(session: Session, *, job_id: str, start_idx: int, items: Sequence[NewItem]) -> None:
    """Insert a chunk of a job's items (COPY on PostgreSQL); a duplicate id raises IntegrityError."""
    if not items:
        return
    if session.get_bind().dialect.name == "postgresql":
        import psycopg

        raw = session.connection().connection.driver_connection
        assert raw is not None
        copy_sql = "COPY items (job_id, idx, item_id, prompt, response) FROM STDIN"
        try:
            with raw.cursor() as cur, cur.copy(copy_sql) as cp:
                for i, it in enumerate(items, start=start_idx):
                    cp.write_row((job_id, i, it.item_id, it.prompt, it.response))
        except psycopg.IntegrityError as exc:  # the driver's own error: COPY bypasses SQLAlchemy
            raise IntegrityError(copy_sql, None, exc) from exc
        return
    rows = [(job_id, i, it.item_id, it.prompt, it.response) for i, it in enumerate(items, start=start_idx)]
    if session.get_bind().dialect.name == "sqlite":
        # The driver's executemany: the ORM's bulk insert builds a parameter dict per row, 2.5x slower.
        session.connection().exec_driver_sql(
            "INSERT INTO items (job_id, idx, item_id, prompt, response) VALUES (?, ?, ?, ?, ?)", rows
        )
        return
    session.execute(insert(Item), [dict(zip(_ITEM_COLUMNS, r, strict=True)) for r in rows])


def first_duplicate_id(session: Session, *, job_id: str, item_ids: Sequence[str]) -> str | None:
    """Which of ``item_ids`` the job already holds (to name the item a unique violation was about)."""
    q = select(Item.item_id).where(Item.job_id == job_id, Item.item_id.in_(list(item_ids))).limit(1)
    return session.scalar(q)


def finish_job(session: Session, *, job: Job, n_items: int, batch_size: int, request_hash: str | None) -> None:
    """Write the batch ledger (nothing enqueued yet: the feeder does that) and the job's item count."""
    batch_rows = [{"job_id": job.id, "batch_no": n, "start_idx": lo, "end_idx": min(lo + batch_size, n_items)}
                  for n, lo in enumerate(range(0, n_items, batch_size))]  # fmt: skip
    for lo in range(0, len(batch_rows), _CHUNK):
        session.execute(insert(Batch), batch_rows[lo : lo + _CHUNK])
    job.n_items = n_items
    job.n_batches = len(batch_rows)
    job.request_hash = request_hash
    session.flush()


def create_job(
    session: Session,
    *,
    tenant: str,
    items: Sequence[NewItem],
    model_version: str,
    batch_size: int,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    """A job from items already in memory; the caller commits, then feeds the queue."""
    job = begin_job(session, tenant=tenant, model_version=model_version, metadata=metadata,
                    idempotency_key=idempotency_key)  # fmt: skip
    for lo in range(0, len(items), _CHUNK):
        add_items(session, job_id=job.id, start_idx=lo, items=items[lo : lo + _CHUNK])
    finish_job(session, job=job, n_items=len(items), batch_size=batch_size, request_hash=request_hash)
    return job


def job_batches(session: Session, *, job_id: str) -> list[Batch]:
    return list(session.scalars(select(Batch).where(Batch.job_id == job_id).order_by(Batch.batch_no)))


SHORT_ID_MIN = 8  # a job or run id may be given by its first 8 or more characters


def matching_ids(session: Session, table: Any, *, prefix: str, tenant: str, limit: int = 2) -> list[str]:
    """Ids of the tenant's rows of ``table`` (jobs or training runs) that start with ``prefix``: a short id
    resolves when exactly one matches."""
    if not SHORT_ID_MIN <= len(prefix) < 32 or not all(c in "0123456789abcdef" for c in prefix):
        return []
    q = select(table.id).where(table.tenant == tenant, table.id.startswith(prefix)).order_by(table.id).limit(limit)
    return list(session.scalars(q))


def get_job(session: Session, *, job_id: str, tenant: str | None = None) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


def find_job_by_idempotency_key(session: Session, *, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


def list_jobs(session: Session, *, tenant: str | None, limit: int = 50, status: str | None = None) -> list[Job]:
    q = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if tenant is not None:
        q = q.where(Job.tenant == tenant)
    if status is not None:
        q = q.where(Job.status == status)
    return list(session.scalars(q))


def batch_texts(session: Session, *, job_id: str, start_idx: int, end_idx: int) -> list[tuple[str, str]]:
    """The (prompt, response) of a range of a job's items, in order: plain rows, not ORM objects (the feeder reads
    a few thousand per feed; building an Item for each cost more than the query)."""
    q = (
        select(Item.prompt, Item.response)
        .where(Item.job_id == job_id, Item.idx >= start_idx, Item.idx < end_idx)
        .order_by(Item.idx)
    )
    return [(p, r) for p, r in session.execute(q).tuples()]


def cancel_job(session: Session, *, job: Job) -> Job:
    """Cancel a job that has not ended: a compare-and-set on its status in SQL, so a job whose last batch a worker
    committed after ``job`` was read stays succeeded (or failed). Returns the job as it now stands."""
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.not_in(FINISHED))
        .values(status=JobStatus.cancelled.value, finished_at=now_sql(session)),
        execution_options={"synchronize_session": False},
    )
    session.refresh(job)
    return job


def mark_failed(session: Session, *, job_id: str, error: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(FINISHED))
        .values(status=JobStatus.failed.value, error=error, finished_at=now_sql(session))
    )


def job_status(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def scored_with(session: Session, *, job_id: str) -> dict[str, int]:
    """How the job's finished batches were scored ("sim_exp kernel=triton precision=off": batches)."""
    q = (
        select(Batch.scored_with, func.count())
        .where(Batch.job_id == job_id, Batch.scored_with.is_not(None))
        .group_by(Batch.scored_with)
    )
    return {str(how): int(n) for how, n in session.execute(q).tuples()}


def job_tenant(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.tenant).where(Job.id == job_id))


class Take(NamedTuple):
    """A worker's take of a batch: how many workers died on it before, and the take's fencing token."""

    deaths: int
    lease: int


def start_batch(
    session: Session, *, job_id: str, batch_no: int, worker: str | None = None, live_job: bool = False
) -> Take | None:
    """Note that ``worker`` took the batch; returns how many workers have died on it so far and the take's lease (its
    fencing token: every write for the batch then names it, fence_batch), or None when it is already done (a
    redelivery or a superseded split), or (``live_job``) its job has ended or is gone. A batch taken again without
    being enqueued again since its last take (the broker redelivered it: its worker died) counts one more death."""
    retake = case((TAKEN_SINCE_ENQUEUED, Batch.deaths + 1), else_=Batch.deaths)
    live = exists().where(Job.id == job_id, LIVE_JOB) if live_job else true()
    row = session.execute(
        update(Batch)
        .where(Batch.job_id == job_id, Batch.batch_no == batch_no, Batch.done.is_(False), live)
        .values(started_at=now_sql(session), worker=worker, deaths=retake, lease=Batch.lease + 1)
        .returning(Batch.deaths, Batch.lease)
    ).one_or_none()
    return None if row is None else Take(int(row[0]), int(row[1]))


def fence_batch(session: Session, *, job_id: str, batch_no: int, lease: int | None) -> bool:
    """The first statement of a transaction that writes for a batch: the job's row held (hold_job: shared among the
    job's writers, so workers on one job do not wait on each other; only its deleter waits for them), then the
    batch's row, locked, on the condition that it still carries ``lease``. False, and the caller writes nothing, when
    the job is gone or another worker took the batch since (the sweeper gave it back after this worker froze past its
    heartbeat, or the broker redelivered it): a stale worker never finishes, fails, splits or hands back a batch that
    is someone else's. ``lease`` None: the batch's row is locked, with no take to check (tests' writers, which
    model copies of a batch under one batch number; a worker always names its take).

    The lease and the batch's row lock are what keep one outcome per item: a worker writes an item's outcome only
    under the lock of the batch it took, with that take's lease, and a split closes its batch under that lock
    before its halves exist (a closed batch cannot be taken, and the split's taker writes nothing more for it); the
    writers of one batch go one at a time and each skips items that have the other outcome, and the
    ``(job_id, idx)`` keys refuse a second row in each ledger. (Two lease-less writers of one item under different
    batch numbers would not meet on a lock: no code writes so.)"""
    if not hold_job(session, job_id=job_id):
        return False
    res = session.execute(
        update(Batch)
        .where(
            Batch.job_id == job_id, Batch.batch_no == batch_no, Batch.lease == lease if lease is not None else true()
        )
        .values(lease=Batch.lease),
        execution_options={"synchronize_session": False},
    )
    return lease is None or bool(res.rowcount)  # type: ignore[attr-defined]


def hand_back_batch(session: Session, *, job_id: str, batch_no: int, lease: int | None = None) -> bool:
    """A batch its worker stopped (interactive work came first, or a brief outage) goes back to the queue: its
    deadline starts again. False when it is done already (a redelivery finished it), or another worker took it
    since ``lease`` (then it is that worker's), so nothing is queued again."""
    res = session.execute(
        update(Batch)
        .where(
            Batch.job_id == job_id,
            Batch.batch_no == batch_no,
            Batch.done.is_(False),
            Batch.lease == lease if lease is not None else true(),
        )
        .values(enqueued_at=now_sql(session))
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def mark_running(session: Session, *, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.running.value, started_at=now_sql(session))
    )


def save_results(
    session: Session,
    *,
    job_id: str,
    batch_no: int,
    start_idx: int,
    scores: Sequence[float],
    cos: Sequence[Sequence[float]],
    model_version: str,
    truncated: Sequence[bool] | None = None,
    n_tokens: Sequence[int | None] | None = None,
    components: Sequence[Sequence[float]] | None = None,
    skip: frozenset[int] = frozenset(),
    cache_hits: int = 0,
    cache_misses: int = 0,
    scored_with: str | None = None,
    lease: int | None = None,
    advance: bool = True,
    fenced: bool = False,
) -> int:
    """Upsert one batch's results and advance the job's progress in the caller's transaction (``advance=False``: the
    caller counts them, in its transaction's one advance_job, with the failures it recorded; ``fenced``: the caller
    called fence_batch for this batch and lease in this transaction already, and it passed).

    Idempotent: a redelivered batch inserts nothing new and counts nothing twice. Offsets in
    ``skip``, and items already in the error ledger, are not stored: an item is scored or failed,
    never both (the batch's row lock orders this against record_item_failure: fence_batch). Returns the number of
    rows actually inserted: 0 when the job was deleted meanwhile, or another worker took the batch since ``lease``
    (fence_batch): the batch is dropped, nothing is written.
    """
    if not fenced and not fence_batch(session, job_id=job_id, batch_no=batch_no, lease=lease):
        return 0
    errors = session.scalars(
        select(ItemError.idx).where(
            ItemError.job_id == job_id, ItemError.idx >= start_idx, ItemError.idx < start_idx + len(scores)
        )
    )
    skip = skip | {idx - start_idx for idx in errors}  # failed meanwhile (a split copy): an item has one outcome
    now = now_sql(session)
    flags = truncated or [False] * len(scores)
    counts = n_tokens or [None] * len(scores)
    parts: Sequence[Sequence[float] | None] = components or [None] * len(scores)
    rows = [
        {"job_id": job_id, "idx": start_idx + i, "score": s, "cos": list(c), "model_version": model_version,
         "truncated": t, "n_tokens": n, "components": None if m is None else list(m)}
        for i, (s, c, t, n, m) in enumerate(zip(scores, cos, flags, counts, parts, strict=True)) if i not in skip
    ]  # fmt: skip
    inserted = _insert_new(session, Result, rows)
    session.execute(
        update(Batch)
        .where(Batch.job_id == job_id, Batch.batch_no == batch_no)
        .values(done=True, done_at=now, **({"scored_with": scored_with[:128]} if scored_with else {}))
    )
    if advance:
        advance_job(
            session, job_id=job_id, batch_no=batch_no, done=inserted, cache_hits=cache_hits, cache_misses=cache_misses
        )
    return inserted


def lock_job(session: Session, *, job_id: str, where: ColumnElement[bool] | None = None) -> bool:
    """Take the job's row lock, exclusive: it waits for every writer that holds the job (hold_job) and keeps new ones
    out until the transaction ends; always job before batch. On PostgreSQL ``SELECT ... FOR UPDATE``; on SQLite a
    no-op update, which takes the database's write lock before any read. The first statement of its transaction.
    False when the job is gone (storage.lifecycle deleted it, under this same lock) or does not match ``where``."""
    cond = and_(Job.id == job_id, where if where is not None else true())
    if _dialect(session) == "postgresql":
        return session.scalar(select(Job.id).where(cond).with_for_update()) is not None
    res = session.execute(
        update(Job).where(cond).values(n_done=Job.n_done), execution_options={"synchronize_session": False}
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def hold_job(session: Session, *, job_id: str) -> bool:
    """The job's row held for a writer of its items' outcomes, until its transaction ends: on PostgreSQL
    ``FOR KEY SHARE``, which writers share with each other (and with the job's closing, close_if_complete) and only
    lock_job's exclusive lock excludes, so workers on one job write in parallel (each counts in its batch's progress
    row, advance_job); on SQLite, which has one writer at a time, the write lock (lock_job). False when the job is
    gone."""
    if _dialect(session) == "postgresql":
        q = select(Job.id).where(Job.id == job_id).with_for_update(read=True, key_share=True)
        return session.scalar(q) is not None
    return lock_job(session, job_id=job_id)


# Progress rows per job: two writers of one job meet on a row only when their batch numbers do, modulo this.
PROGRESS_STRIPES = 16
CLOSED = "rewardq.closed"  # session.info: {job id: status} of the jobs the session's writes closed


class Counts(NamedTuple):
    done: int
    failed: int
    cache_hits: int
    cache_misses: int


# The counters a job's row and its progress rows both hold, in Counts' order.
COUNTERS = ("n_done", "n_failed", "cache_hits", "cache_misses")


def _totals() -> list[Any]:
    """Each counter's total for the job's row of the enclosing statement: its row's plus its progress rows' sum."""
    return [getattr(Job, c) + _stripes(getattr(JobProgress, c)) for c in COUNTERS]


def advance_job(
    session: Session,
    *,
    job_id: str,
    batch_no: int = 0,
    done: int = 0,
    failed: int = 0,
    cache_hits: int = 0,
    cache_misses: int = 0,
) -> str | None:
    """Count a write's outcomes into the job's progress, in the progress row of ``batch_no``'s stripe (JobProgress):
    workers writing other batches of the job update other rows, so none waits on another's commit (issue #36, item
    3). Then the job is closed when every item has an outcome (close_if_complete): on SQLite here, where writers go
    one at a time and the sums are exact; on PostgreSQL after the commit (db.session_scope runs it), because two
    writes in flight do not see each other's counts, and the later of the two to commit then sees both. Returns the
    status this call closed the job with, else None (not complete; closed by another write; or closing after the
    commit, whose outcome session.info[CLOSED] holds then).

    Cache lookups count only with results: a redelivery inserts nothing and counts nothing, but still checks that the
    job is closed (its first write may have stopped between its commit and the closing)."""
    if done or failed:
        row = {"job_id": job_id, "stripe": batch_no % PROGRESS_STRIPES, "n_done": done, "n_failed": failed,
               "cache_hits": cache_hits if done else 0, "cache_misses": cache_misses if done else 0}  # fmt: skip
        session.connection().execute(_count_stmt(_dialect(session)), row)
    if _dialect(session) == "postgresql":
        steps = session.info.setdefault(AFTER_COMMIT, {})
        steps[("close", job_id)] = lambda s: close_if_complete(s, job_id=job_id)
        return None
    return close_if_complete(session, job_id=job_id)


def _stripes(column: Any) -> Any:
    """The sum of a progress column over a job's stripes, correlated with the job's row of the enclosing statement."""
    return (
        select(func.coalesce(func.sum(column), 0)).where(JobProgress.job_id == Job.id).correlate(Job).scalar_subquery()
    )


@lru_cache(maxsize=4)
def _count_stmt(dialect: str) -> Any:
    """The upsert that adds a write's counts to its progress row; built once per dialect (building it costs more
    than running it)."""
    table = cast(Table, JobProgress.__table__)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    return ins.on_conflict_do_update(
        index_elements=["job_id", "stripe"], set_={c: getattr(table.c, c) + getattr(ins.excluded, c) for c in COUNTERS}
    )


@lru_cache(maxsize=8)
def _close_stmt(dialect: str, one: bool) -> Any:
    """close_if_complete's compare-and-set, for the job named by the ``job_id`` parameter (``one``) or for every live
    job; built once per dialect (it runs after every write on PostgreSQL, and building it took 1 ms, twice what
    running it takes). The time is the database's on PostgreSQL, the ``now`` parameter on SQLite (models.now_sql)."""
    done, failed, hits, misses = _totals()
    now = func.statement_timestamp() if dialect == "postgresql" else bindparam("now")
    cond = and_(LIVE_JOB, done + failed >= Job.n_items, Job.id == bindparam("job_id") if one else true())
    return (
        update(Job)
        .where(cond)
        .values(
            status=case((done > 0, JobStatus.succeeded.value), else_=JobStatus.failed.value),
            error=case((done <= 0, "no item could be scored; see the job's failed items"), else_=Job.error),
            finished_at=now,
            started_at=func.coalesce(Job.started_at, now),
            n_done=done,
            n_failed=failed,
            cache_hits=hits,
            cache_misses=misses,
        )
        .returning(Job.id, Job.status, *(_stripes(getattr(JobProgress, c)) for c in COUNTERS))
    )


def close_if_complete(session: Session, *, job_id: str | None = None) -> str | None:
    """Close the job (every live job when ``job_id`` is None: the sweeper's pass, for a writer that stopped between
    its commit and this) if every item has an outcome: succeeded, or failed when nothing could be scored, its counts
    folded from its progress rows into its own row. One compare-and-set on the job's row, so a job closes once; its
    row is locked only if it closes (PostgreSQL skips a row that does not match without locking it). Returns the
    status the job closed with (the last one's when ``job_id`` is None), else None."""
    dialect = _dialect(session)
    params: dict[str, Any] = {} if job_id is None else {"job_id": job_id}
    if dialect != "postgresql":
        params["now"] = now_sql(session)
    conn = session.connection()  # Core: no ORM bookkeeping to do
    rows = conn.execute(_close_stmt(dialect, job_id is not None), params).tuples().all()
    if not rows:
        return None
    closed: dict[str, str] = {str(r[0]): str(r[1]) for r in rows}
    folded = {r[0]: tuple(int(x) for x in r[2:]) for r in rows}  # the progress rows' sums the closing read
    # Their rows go, and what the deletion found is checked against what was folded. No outcome can be counted after
    # the last (each item has one, by the ledgers' keys and the batches' locks), so they agree; should a count have
    # landed in between, it is added to the job's row rather than lost with its progress row.
    gone: dict[str, list[int]] = {j: [0, 0, 0, 0] for j in closed}
    counted = [getattr(JobProgress, c) for c in COUNTERS]
    deleted = delete(JobProgress).where(JobProgress.job_id.in_(list(closed))).returning(JobProgress.job_id, *counted)
    for job, *counts in conn.execute(deleted):
        gone[job] = [a + int(b) for a, b in zip(gone[job], counts, strict=True)]
    for job, counts in gone.items():
        late = [a - b for a, b in zip(counts, folded[job], strict=True)]
        if any(late):
            log.warning("job %s: %s counted while it closed; added to its row", job, late)
            added = {c: getattr(Job, c) + d for c, d in zip(COUNTERS, late, strict=True)}
            conn.execute(update(Job).where(Job.id == job).values(added))
    session.info.setdefault(CLOSED, {}).update(closed)
    return next(reversed(closed.values()))


def job_counts(session: Session, *, job_ids: Sequence[str]) -> dict[str, Counts]:
    """Each job's counts: its row's plus its progress rows' (a closed job's are all in its row). Jobs not found are
    left out."""
    if not job_ids:
        return {}
    q = select(Job.id, *_totals()).where(Job.id.in_(list(job_ids)))
    return {r[0]: Counts(*(int(x or 0) for x in r[1:])) for r in session.execute(q)}


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _insert_new(session: Session, table: type[Result] | type[ItemError], rows: list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT (job_id, idx) DO NOTHING; how many rows were new (the idempotent upsert). Every row is
    stamped ``created_at`` now (now_sql: on PostgreSQL the database's clock, an SQL expression).

    The rows go as parameter sets of one cached statement, which SQLAlchemy sends in multi-row batches: a statement
    built around the rows' values is compiled anew for every batch (7x slower on SQLite, 3x on PostgreSQL, for
    256 results)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql" and table is Result:
        return _insert_results_pg(session, rows)
    # Core, not the ORM's bulk insert: a None stays NULL, and rows are not regrouped by which keys they set.
    columns = cast(Table, table.__table__)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(columns).values(created_at=now_sql(session))
    stmt = ins.on_conflict_do_nothing(index_elements=["job_id", "idx"]).returning(columns.c.idx)
    return len(session.execute(stmt, rows).all())


# One batch's results on PostgreSQL: each column as one array parameter, unnested by the server. The statement's
# text is the same for every batch, so psycopg's query cache and the server's plan serve it; the multi-row VALUES
# statement that SQLAlchemy builds instead carries 8 parameters per row, and psycopg parsed its 2,000-placeholder
# text anew for every batch (not cached: too long), a third of a worker's write in a profile.
_RESULTS_PG = text(
    """
    INSERT INTO results (job_id, idx, score, cos, model_version, truncated, n_tokens, components, created_at)
    SELECT :job_id, u.idx, u.score, CAST(u.cos AS json), :model_version, u.truncated, u.n_tokens,
           CAST(u.components AS json), statement_timestamp()
    FROM unnest(CAST(:idx AS integer[]), CAST(:score AS double precision[]), CAST(:cos AS text[]),
                CAST(:truncated AS boolean[]), CAST(:n_tokens AS integer[]), CAST(:components AS text[]))
         AS u(idx, score, cos, truncated, n_tokens, components)
    ON CONFLICT (job_id, idx) DO NOTHING
    RETURNING idx
    """
)


def _insert_results_pg(session: Session, rows: list[dict[str, Any]]) -> int:
    by_job: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_job.setdefault((r["job_id"], r["model_version"]), []).append(r)
    new = 0
    for (job_id, version), group in by_job.items():
        params = {
            "job_id": job_id,
            "model_version": version,
            "idx": [r["idx"] for r in group],
            "score": [float(r["score"]) for r in group],  # one element type per array (psycopg refuses a mix)
            "cos": [json.dumps(r["cos"]) for r in group],
            "truncated": [bool(r["truncated"]) for r in group],
            "n_tokens": [None if r["n_tokens"] is None else int(r["n_tokens"]) for r in group],
            "components": [None if r["components"] is None else json.dumps(r["components"]) for r in group],
        }
        new += len(session.execute(_RESULTS_PG, params).all())
    return new


def record_item_failure(
    session: Session,
    *,
    job_id: str,
    batch_no: int,
    idx: int,
    code: str,
    message: str,
    lease: int | None = None,
    advance: bool = True,
    fenced: bool = False,
) -> bool:
    """Put one item in the error ledger (once), count it failed, close its batch; True if newly recorded. An item
    that another copy of its batch scored meanwhile stays scored (an item has one outcome). False, writing nothing,
    when the job was deleted meanwhile, or another worker took the batch since ``lease`` (fence_batch).
    ``advance=False``: the caller counts it, in its transaction's one advance_job; ``fenced``: the caller called
    fence_batch for this batch and lease in this transaction already, and it passed."""
    if not fenced and not fence_batch(session, job_id=job_id, batch_no=batch_no, lease=lease):
        return False
    scored = session.scalar(select(Result.idx).where(Result.job_id == job_id, Result.idx == idx))
    row = {"job_id": job_id, "idx": idx, "code": code, "message": message[:2000]}
    new = scored is None and bool(_insert_new(session, ItemError, [row]))
    session.execute(
        update(Batch)
        .where(Batch.job_id == job_id, Batch.batch_no == batch_no)
        .values(done=True, done_at=now_sql(session))
    )
    if advance:
        advance_job(session, job_id=job_id, batch_no=batch_no, failed=int(new))
    return new


def split_batch(session: Session, *, job_id: str, batch_no: int, lease: int | None = None) -> list[BatchRef]:
    """Replace a failing batch by its two halves (new ledger rows); [] if someone already handled it, the job was
    deleted, or another worker took the batch since ``lease`` (fence_batch)."""
    if not fence_batch(session, job_id=job_id, batch_no=batch_no, lease=lease):
        return []
    parent = session.get(Batch, (job_id, batch_no), with_for_update=True)
    if parent is None or parent.done or parent.end_idx - parent.start_idx < 2:
        return []
    parent.done = True  # superseded by its halves
    parent.done_at = now_sql(session)
    first = (
        session.execute(
            update(Job).where(Job.id == job_id).values(n_batches=Job.n_batches + 2).returning(Job.n_batches)
        ).scalar_one()
        - 2
    )
    mid = (parent.start_idx + parent.end_idx) // 2
    halves = [BatchRef(first, parent.start_idx, mid), BatchRef(first + 1, mid, parent.end_idx)]
    now = now_sql(session)
    # One multi-row VALUES (not executemany): ``now`` is the database's clock, an SQL expression, not a parameter.
    rows = [
        dict(job_id=job_id, batch_no=h.batch_no, start_idx=h.start_idx, end_idx=h.end_idx, enqueued_at=now)
        for h in halves
    ]
    session.execute(insert(Batch).values(rows))
    return halves
