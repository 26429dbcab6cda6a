"""SQLAlchemy 2 typed tables: model versions and which one each tenant uses, jobs, their items and batches, results."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rewardq.storage.clock import as_utc, utcnow


def now_sql(session: Session) -> Any:
    """Now, as a value to write in SQL: by the database's clock where several hosts share the database
    (PostgreSQL's statement time), so times written by a worker, the API and beat on different hosts compare.
    SQLite is a file on one host, whose clock every process on it shares."""
    if session.get_bind().dialect.name == "postgresql":
        return func.statement_timestamp()
    return utcnow()


def db_now(session: Session) -> datetime:
    """Now by the clock that now_sql() writes with: what the sweeper and beat compare those times against."""
    if session.get_bind().dialect.name == "postgresql":
        value: datetime | None = session.scalar(select(func.statement_timestamp()))
        assert value is not None
        return as_utc(value)
    return utcnow()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value)


DEFAULT_SCOPE = "*"  # the operator's default in active_versions; tenant names never contain '*'


class ModelVersion(Base):
    """A scorable model: its kind, where its files are, and who may use it (owner None: every tenant)."""

    __tablename__ = "model_versions"
    # A name stands for its version within its owner's (a tenant's, or every shared version's: '*'): unique there.
    __table_args__ = (
        Index(
            "ux_model_versions_owner_name",
            func.coalesce(text("owner"), "*"),
            "name",
            unique=True,
            sqlite_where=text("name IS NOT NULL"),
            postgresql_where=text("name IS NOT NULL"),
        ),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="sim_exp", server_default="sim_exp")
    name: Mapped[str | None] = mapped_column(String(256))
    owner: Mapped[str | None] = mapped_column(String(128), index=True)  # the tenant whose run made it; None: shared
    base_model: Mapped[str] = mapped_column(String(512))
    path: Mapped[str | None] = mapped_column(String(1024))  # under REWARDQ_ARTIFACTS_DIR; None = the untrained base
    n_heads: Mapped[int] = mapped_column(Integer, default=1)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Its scores' distribution on known pairs (held-out feedback, or the reference sample): storage.score_stats.
    score_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(32))  # the training run that made it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnsembleMember(Base):
    """A version an ensemble sums (its weight is in the ensemble's config): a member cannot be deleted while an
    ensemble names it (the foreign key refuses; storage.lifecycle's collection skips it)."""

    __tablename__ = "ensemble_members"

    ensemble: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"), primary_key=True)
    member: Mapped[str] = mapped_column(ForeignKey("model_versions.version"), primary_key=True, index=True)


class ActiveVersion(Base):
    """The version new jobs use: one row per tenant that chose one, and DEFAULT_SCOPE for everyone else.

    The primary key makes "exactly one active version per scope" a constraint, and every change is a
    single-row upsert or compare-and-set, so activations cannot deadlock.
    """

    __tablename__ = "active_versions"

    scope: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ux_jobs_tenant_idem", "tenant", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), default="default")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"))
    n_items: Mapped[int] = mapped_column(Integer)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_batches: Mapped[int] = mapped_column(Integer, default=0)
    # Texts whose embedding a worker already had (a repeated prompt, a text of an earlier job) vs encoded.
    cache_hits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_misses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # A succeeded job's score summary, stored the first time it is read: no result changes after that.
    summary: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class JobProgress(Base):
    """A job's progress, counted in a few rows per job (issue #36, item 3): each write of a batch's outcomes adds its
    counts to the row of its batch number modulo PROGRESS_STRIPES, so workers writing other batches of one job update
    other rows, and no writer waits on a hot row for its commit. A job's counts are its row's (what was counted
    before these rows existed, and the totals folded in when it closed) plus these rows' sums
    (repository.job_counts); the job is closed when they reach its items (repository.close_if_complete)."""

    __tablename__ = "job_progress"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    stripe: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_done: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    cache_hits: Mapped[int] = mapped_column(Integer, default=0)
    cache_misses: Mapped[int] = mapped_column(Integer, default=0)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ux_items_job_item", "job_id", "item_id", unique=True),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[str] = mapped_column(String(256))
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)


# The ledger's partial indexes hold only the batches the feeder and the sweeper look for, so their queries cost the
# same at 1k and 400k batches (issue #36): their predicates are written as SQLAlchemy renders the queries' own terms
# (``done IS 0`` on SQLite, ``done IS false`` on PostgreSQL), which each planner must match to use them.
UNQUEUED_BATCH = {"sqlite": "enqueued_at IS NULL AND done IS 0", "postgresql": "enqueued_at IS NULL AND done IS false"}
IN_FLIGHT_BATCH = {
    "sqlite": "enqueued_at IS NOT NULL AND done IS 0",
    "postgresql": "enqueued_at IS NOT NULL AND done IS false",
}


class Batch(Base):
    """A contiguous range of a job's items sent as one queue message; SQL, not Redis, says what is done."""

    __tablename__ = "batches"
    __table_args__ = (
        # Never enqueued, not done: the feeder's next batches, per job in order.
        Index(
            "ix_batches_unqueued",
            "job_id",
            "batch_no",
            sqlite_where=text(UNQUEUED_BATCH["sqlite"]),
            postgresql_where=text(UNQUEUED_BATCH["postgresql"]),
        ),
        # Enqueued, not done: in flight (waiting in Redis or being scored), what the sweeper checks.
        Index(
            "ix_batches_in_flight",
            "job_id",
            "batch_no",
            sqlite_where=text(IN_FLIGHT_BATCH["sqlite"]),
            postgresql_where=text(IN_FLIGHT_BATCH["postgresql"]),
        ),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    batch_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_idx: Mapped[int] = mapped_column(Integer)
    end_idx: Mapped[int] = mapped_column(Integer)  # exclusive
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()  # a worker took it (last time)
    worker: Mapped[str | None] = mapped_column(String(255))  # which worker process took it last (workers.liveness)
    deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # workers that died on it
    # The fencing token: one more at each take. A worker writes the batch's results, its failures, its split and its
    # hand-back only while the batch still carries the token it took it with (repository.fence_batch).
    lease: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    scored_with: Mapped[str | None] = mapped_column(String(128))  # "sim_exp kernel=triton precision=bf16 passes=packed"
    done_at: Mapped[datetime | None] = mapped_column()


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (Index("ix_results_job_score", "job_id", "score", "idx"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    cos: Mapped[list[Any]] = mapped_column()
    model_version: Mapped[str] = mapped_column(String(64))
    truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    n_tokens: Mapped[int | None] = mapped_column(Integer)  # likelihood: the response tokens scored
    # An ensemble's: the member scores in the order of its members (score is their weighted sum); else None.
    components: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Feedback(Base):
    """One preference (prompt, chosen, rejected) or one rating (prompt, response, rating)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_tenant_id", "tenant", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # 'preference' | 'rating'
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    chosen: Mapped[str | None] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


OPEN_RUN = "status IN ('queued', 'running')"


class RunStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"  # a new version was created and promoted
    rejected = "rejected"  # a new version was created; the gate kept the active one
    failed = "failed"


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        Index("ix_runs_tenant_created", "tenant", "created_at"),
        Index("ux_runs_schedule_slot", "schedule_id", "scheduled_for", unique=True),
        # One queued or running run per tenant: a tenant cannot occupy every training worker.
        Index(
            "ux_runs_one_open_per_tenant",
            "tenant",
            unique=True,
            postgresql_where=text(OPEN_RUN),
            sqlite_where=text(OPEN_RUN),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.queued.value)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    loss_curve: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    base_version: Mapped[str | None] = mapped_column(String(64))  # the active version when the run started: the gate's
    # opponent; start_version: the version whose weights it trained from (the base encoder's version for a new one)
    start_version: Mapped[str | None] = mapped_column(String(64))
    result_version: Mapped[str | None] = mapped_column(String(64))
    n_feedback: Mapped[int] = mapped_column(Integer, default=0)
    max_feedback_id: Mapped[int] = mapped_column(Integer, default=0)
    schedule_id: Mapped[str | None] = mapped_column(String(32))
    scheduled_for: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    worker: Mapped[str | None] = mapped_column(String(255))  # the worker process that claimed it (workers.liveness)
    enqueued_at: Mapped[datetime | None] = mapped_column()  # its message was last published then
    # The fencing token: one more at each claim. A worker writes progress, its version, a promotion and the run's end
    # only while the run still carries the token it claimed it with (training_repository.fence).
    lease: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # workers that died running it


class Schedule(Base):
    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    cron: Mapped[str] = mapped_column(String(128))
    min_new_feedback: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    next_run_at: Mapped[datetime] = mapped_column(index=True)
    last_fired_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ItemError(Base):
    """The error ledger: an item that could not be scored, isolated from its batch, with a reason code."""

    __tablename__ = "item_errors"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """Keys made with `rewardq keys create`: only a SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # to tell keys apart in listings
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class UiSession(Base):
    """A dashboard sign-in: the browser's cookie holds a random id, the table only its SHA-256, and the SHA-256 of
    the key it was made with (a session lasts only while that key is valid; revoking the key ends it)."""

    __tablename__ = "ui_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    key_hash: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
