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
    from tests.support import delete_queue, payloads, queued_messages

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
        ours = [m for m in map(ScoreBatch.model_validate, payloads(queued_messages(r, queue))) if m.job_id == job_id]
        assert sorted(m.batch_no for m in ours) == sorted(h.batch_no for h in halves)
        for half in ours:
            engine.score_batch(half)
        with session_scope(db_url) as s:
            job = repo.get_job(s, job_id=job_id)
            assert job is not None and (job.status, job.n_done, job.n_failed) == ("succeeded", 1, 1)
    finally:
        get_settings.cache_clear()
        delete_queue(r, queue)


def test_a_non_finite_score_is_the_items_failure_and_results_stay_readable(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    """Issue #37, item 10: a model that returns NaN or infinity for a pair (an fp16 head overflowing, a broken
    checkpoint) had the value stored, and reading the job's results was a 500. Fault injected into the real model's
    output: the pair fails alone with `non_finite_score`, the others are stored, and the results read as JSON."""
    import math

    from rewardq.storage import registry
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine
    from rewardq.workers.messages import ScoreBatch
    from tests.conftest import make_client

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", f"test-nan-{RUN_ID}")
    get_settings.cache_clear()
    try:
        with session_scope(db_url) as s:
            version = registry.default_version(s)
            items = [repo.NewItem(f"i{k}", "q", f"answer {k}") for k in range(3)]
            job_id = repo.create_job(s, tenant="default", model_version=version, batch_size=3, items=items).id
        model = engine.get_model(str(version))
        real = model.score

        def overflowing(prompts, responses):
            out = real(prompts, responses)
            out.reward[1], out.reward[2] = math.nan, math.inf
            return out

        monkeypatch.setattr(model, "score", overflowing)
        msg = ScoreBatch(job_id=job_id, batch_no=0, start_idx=0, model_version=str(version), tenant="default",
                         prompts=["q"] * 3, responses=[f"answer {k}" for k in range(3)])  # fmt: skip
        assert engine.score_batch(msg) == 1
        with session_scope(db_url) as s:
            job = repo.get_job(s, job_id=job_id)
            assert job is not None and (job.status, job.n_done, job.n_failed) == ("succeeded", 1, 2)
        with make_client(db_url, f"test-nan-{RUN_ID}") as c:
            resp = c.get(f"/v1/jobs/{job_id}/results")
            assert resp.status_code == 200, resp.text
            assert [r["id"] for r in resp.json()["results"]] == ["i0"]
            errors = c.get(f"/v1/jobs/{job_id}/errors").json()
            assert [(e["id"], e["code"]) for e in errors] == [("i1", "non_finite_score"), ("i2", "non_finite_score")]
    finally:
        get_settings.cache_clear()
