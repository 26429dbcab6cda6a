"""Redis and broker errors are transient everywhere (issue #37, item 1): the interleaving that failed a whole job,
forced. A poison batch is split and the split commits; publishing the halves then meets a Redis that is restarting.
The task is retried instead of failing the job, and the sweeper enqueues the stranded halves; the job ends with its
one good item scored and its poison item failed alone. The real Celery task runs eagerly, in process, on the suite's
Redis and each database."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis

from tests.conftest import POISON, RUN_ID

pytestmark = pytest.mark.usefixtures("redis_url")


def test_a_redis_error_publishing_a_splits_halves_retries_and_the_sweeper_recovers_them(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    from rewardq.storage import registry
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.storage.models import db_now
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine, tasks
    from rewardq.workers.errors import is_transient
    from rewardq.workers.messages import ScoreBatch, enqueue_score_batches
    from rewardq.workers.sweeper import sweep
    from tests.support import delete_queue, queued_messages

    queue = f"test-split-outage-{RUN_ID}"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", queue)
    monkeypatch.setenv("REWARDQ_FAULT_POISON_MARKER", POISON)
    get_settings.cache_clear()
    r = redis.Redis.from_url(redis_url)
    outage = redis.exceptions.ConnectionError("Connection refused (Redis restarting)")
    assert is_transient(outage)

    def restarting(messages, queue, priorities=None):  # the split's halves meet the restarting Redis
        raise outage

    try:
        with session_scope(db_url) as s:
            version = registry.default_version(s)
            items = [repo.NewItem("good", "q", "fine"), repo.NewItem("bad", "q", f"poison {POISON}")]
            job_id = repo.create_job(s, tenant="default", model_version=version, batch_size=2, items=items).id
        msg = ScoreBatch(job_id=job_id, batch_no=0, start_idx=0, model_version=version, tenant="default",
                         prompts=["q", "q"], responses=["fine", f"poison {POISON}"])  # fmt: skip
        monkeypatch.setattr(engine, "enqueue_score_batches", restarting)
        tasks.score_batch.apply(kwargs={"payload": msg.model_dump()})  # eager: its retry runs at once
        with session_scope(db_url) as s:
            job = repo.get_job(s, job_id=job_id)
            assert job is not None and job.status in ("queued", "running"), (job.status, job.error)
            assert (job.n_done, job.n_failed) == (0, 0)
            halves = [b for b in repo.job_batches(s, job_id=job_id) if not b.done]
            assert len(halves) == 2  # committed by the split, never published
            later = db_now(s) + timedelta(seconds=get_settings().lost_after_s + 1)
        monkeypatch.setattr(engine, "enqueue_score_batches", enqueue_score_batches)  # Redis is back
        sweep(now=later)  # (it also enqueues what earlier tests left unfinished in this database: not this job's)
        ours = [m for m in map(ScoreBatch.model_validate, _payloads(queued_messages(r, queue))) if m.job_id == job_id]
        assert sorted(m.batch_no for m in ours) == sorted(h.batch_no for h in halves)
        for half in ours:
            engine.score_batch(half)
        with session_scope(db_url) as s:
            job = repo.get_job(s, job_id=job_id)
            assert job is not None and (job.status, job.n_done, job.n_failed) == ("succeeded", 1, 1)
    finally:
        get_settings.cache_clear()
        delete_queue(r, queue)


def _payloads(messages: list[bytes]) -> list[dict[str, object]]:
    import base64
    import json

    out = []
    for m in messages:
        body = json.loads(m)["body"]
        kwargs = json.loads(base64.b64decode(body))[1]
        out.append(kwargs["payload"])
    return out
