"""Thin Celery tasks: validate the payload, call the engine."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.time import get_exponential_backoff_interval, maybe_iso8601
from sqlalchemy.exc import OperationalError

from rewardq.storage import db
from rewardq.storage.settings import get_settings
from rewardq.workers import engine, events, writer
from rewardq.workers.celery_app import SCORE_BATCH, SCORE_INTERACTIVE, TRAIN, app
from rewardq.workers.errors import (
    LOAD_RETRY_MAX_S,
    RETRY_BACKOFF_MAX_S,
    ModelLoadFailed,
    ModelUnavailable,
    is_transient,
    public_message,
)
from rewardq.workers.messages import InteractiveBatch, ScoreBatch

log = logging.getLogger(__name__)


@worker_process_init.connect
def _preload(**_: Any) -> None:
    # Load the default model in each child after the fork, before the first batch arrives.
    from rewardq.storage import registry
    from rewardq.storage.db import session_scope

    if writer.wanted(get_settings()):
        writer.start()

    try:
        with session_scope() as s:
            version = registry.default_version(s)
        if version:
            engine.get_model(version)
    except Exception:  # a missing DB here must not kill the worker; the first task retries
        log.exception("could not preload the active model")


DRAIN_S = 60.0  # how long a pool process that exits cleanly waits for its writer


@worker_process_shutdown.connect
def _drain(**_: Any) -> None:
    # A pool process that ends cleanly (a warm shutdown, a recycled child) writes the results it holds first; what a
    # process killed before that holds goes back to the queue through the sweeper (workers.writer).
    if not writer.drain(DRAIN_S):
        log.warning("exiting with %d batch write(s) unfinished: the sweeper queues them again", writer.pending())


class _ScoringTask(app.Task):  # type: ignore[misc]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Not transient (transient errors are retried without end): say so on the job instead of leaving it running.
        job_id = (kwargs.get("payload") or {}).get("job_id")
        if job_id:
            engine.fail_job(job_id, public_message(exc, log, f"job {job_id}"))


_settings = get_settings()
db.use_sqlite_cache(_settings.sqlite_worker_cache_mib)  # only workers import this module


@app.task(
    bind=True,
    base=_ScoringTask,
    name=SCORE_BATCH,
    time_limit=_settings.batch_time_limit_s,  # a hung batch: its process is replaced, and that counts as a death
    max_retries=None,
)
def score_batch(self: Any, payload: dict[str, Any]) -> int:
    """Transient failures (the database, Redis) are retried with backoff up to a minute apart for as long as they
    last: an outage, or a database busy with another tenant's work, never fails the job, and a retry never counts as
    a worker death. So is a model this worker cannot load: the message goes back to the queue, where a worker that
    can load it takes it. (It is not passed back at once while this worker pauses: a version no worker can load, its
    files gone, then stalled every worker that met it, and all other work with it.)"""
    msg = ScoreBatch.model_validate(payload)
    queue = (self.request.delivery_info or {}).get("routing_key")  # a bulk batch may stop for interactive work
    try:
        return engine.score_batch(msg, queue=queue)
    except Exception as exc:
        if not (is_transient(exc) or isinstance(exc, ModelLoadFailed)):
            raise
        # A model this worker cannot load: back soon (10 s at most), since another worker may be able to take it.
        cap = LOAD_RETRY_MAX_S if isinstance(exc, ModelLoadFailed) else RETRY_BACKOFF_MAX_S
        countdown = get_exponential_backoff_interval(1, self.request.retries, cap, full_jitter=True)
        raise self.retry(exc=exc, countdown=countdown) from exc


def _seconds_left(expires: Any) -> float:
    """Seconds until a message's expiry (0 if it has none: it is answered, not handed back)."""
    if not expires:
        return 0.0
    when = maybe_iso8601(expires) if isinstance(expires, str) else expires
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return float((when - datetime.now(timezone.utc)).total_seconds())


class _InteractiveTask(app.Task):  # type: ignore[misc]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Answer the waiting request now rather than let it time out.
        payload = kwargs.get("payload") or {}
        if payload.get("request_id"):
            error = {"code": "scoring_error", "message": public_message(exc, log, "an interactive request")[:500]}
            events.push_reply(
                get_settings().redis_url, payload["request_id"], {"part": payload.get("part"), "error": error}
            )


@app.task(bind=True, base=_InteractiveTask, name=SCORE_INTERACTIVE)
def score_interactive(self: Any, payload: dict[str, Any]) -> None:
    """A model this worker cannot load, or a brief outage (the database, Redis), is the worker's failure, not the
    request's: the part goes back to the queue (1 to 5 s apart) for as long as the request waits, so another worker,
    or this one once it can, answers it. Only when its wait would end first does the request hear
    model_load_failed, or scoring_error (_InteractiveTask.on_failure)."""
    msg = InteractiveBatch.model_validate(payload)
    try:
        reply = engine.score_interactive(msg)
    except ModelUnavailable as exc:
        reply = {"part": msg.part, "error": {"code": exc.code, "message": str(exc)}}
    except Exception as exc:
        if not (isinstance(exc, ModelLoadFailed) or is_transient(exc)):
            raise
        countdown = min(1 + self.request.retries, 5)
        if _seconds_left(self.request.expires) > countdown + 1:
            raise self.retry(exc=exc, countdown=countdown, max_retries=self.request.retries + 1) from exc
        if not isinstance(exc, ModelLoadFailed):
            raise
        reply = {"part": msg.part, "error": {"code": exc.code, "message": str(exc)}}
    events.push_reply(get_settings().redis_url, msg.request_id, reply)


@app.task(
    name=TRAIN,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=120,
    max_retries=10,
    soft_time_limit=_settings.run_time_limit_s,  # the run fails, saying so
    time_limit=_settings.run_time_limit_s + 120,
)
def train(run_id: str) -> str:
    from rewardq.workers.runs import execute_run

    return execute_run(run_id)
