"""Thin Celery tasks: validate the payload, call the engine."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from workers import engine
from workers.celery_app import SCORE_BATCH, TRAIN, app
from workers.errors import TRANSIENT
from workers.messages import ScoreBatch

log = logging.getLogger(__name__)


@worker_process_init.connect
def _preload(**_: Any) -> None:
    # Load the active model in each child after the fork, before the first batch arrives.
    from storage import repository as repo
    from storage.db import session_scope

    try:
        with session_scope() as s:
            mv = repo.active_model_version(s)
            version = mv.version if mv else None
        if version:
            engine.get_model(version)
    except Exception:  # a missing DB here must not kill the worker; the first task retries
        log.exception("could not preload the active model")


class _ScoringTask(app.Task):  # type: ignore[misc]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Retries are spent or the error is not transient: say so on the job instead of leaving it running.
        job_id = (kwargs.get("payload") or {}).get("job_id")
        if job_id:
            engine.fail_job(job_id, f"{type(exc).__name__}: {exc}")


@app.task(
    base=_ScoringTask,
    name=SCORE_BATCH,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=20,
)
def score_batch(payload: dict[str, Any]) -> int:
    return engine.score_batch(ScoreBatch.model_validate(payload))


@app.task(name=TRAIN, autoretry_for=(OperationalError,), retry_backoff=True, retry_backoff_max=120, max_retries=10)
def train(run_id: str) -> str:
    from workers.runs import execute_run

    return execute_run(run_id)
