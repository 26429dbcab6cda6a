"""Batches are fenced as training runs are (issue #37, "fencing tokens"), on SQLite and PostgreSQL.

Each take of a batch carries a lease (a fencing token, one more at each take), and every write for the batch (its
results, its failed items, its split, its hand-back to the queue) checks that token in the same transaction. The
interleaving is forced through the real engine and the real encoder: worker A takes a batch, and while it scores,
its heartbeat expires, the sweeper gives the batch back (what sweep does once it sees A dead) and worker B takes it.
Then A goes on, and whatever it does next must write nothing. Before fencing, A finished the batch under B (its
results, its verdict that an item is poison, its split into halves), or put B's batch back in the queue so a third
worker scored it again beside B."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from rewardq.storage import ledger
from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.models import Batch, ItemError, Job, Result
from rewardq.storage.settings import get_settings
from rewardq.workers.errors import InjectedFault, InjectedOutage
from rewardq.workers.models.base import Preempted
from tests.support import enqueued_job, job_done, queued_messages

pytestmark = pytest.mark.usefixtures("redis_url")

PAIRS = [("What is the capital of France?", "Paris."), ("2 + 2?", "4"), ("Name a colour.", "Blue."), ("Hi", "Hello")]


@pytest.fixture()
def queue(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"test-batch-fencing-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", name)
    get_settings.cache_clear()
    yield name
    redis.Redis.from_url(get_settings().redis_url).delete(name)
    get_settings.cache_clear()


def _state(db_url: str, job_id: str) -> dict[str, Any]:
    """Everything a write for the batch could change."""
    with session_scope(db_url) as s:
        b = s.get(Batch, (job_id, 0))
        job = s.get(Job, job_id)
        assert b is not None and job is not None
        return {
            "batch": (b.done, b.lease, b.worker, b.attempts, b.deaths, b.enqueued_at, b.started_at),
            "job": (*job_done(s, job_id), job.n_batches),
            "results": s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)),
            "errors": s.scalar(select(func.count()).select_from(ItemError).where(ItemError.job_id == job_id)),
        }


def _take_over(db_url: str, job_id: str) -> None:
    """A froze past its heartbeat: the sweeper gives its batch back (a death), and worker B takes it (lease 2)."""
    with session_scope(db_url) as s:
        b = s.get(Batch, (job_id, 0))
        assert b is not None and b.lease == 1 and not b.done
        assert ledger.claim_requeue(s, job_id=job_id, batch_no=0, seen=b.enqueued_at, taken=b.started_at, died=True)
    with session_scope(db_url) as s:
        take = repo.start_batch(s, job_id=job_id, batch_no=0, worker="worker-b")
        assert take is not None and take.lease == 2


@pytest.mark.parametrize("then", ["saves its results", "finds a poison item", "is preempted", "meets an outage"])
def test_a_worker_that_lost_its_batch_to_another_writes_nothing_for_it(
    db_url: str, queue: str, monkeypatch: pytest.MonkeyPatch, then: str
):
    from rewardq.workers import engine

    msg = enqueued_job(db_url, PAIRS, "fence")
    real_score = engine._score
    after_take_over: dict[str, Any] = {}

    def scored_while_taken_over(model: Any, prompts: list[str], responses: list[str], scope: str) -> Any:
        out = real_score(model, prompts, responses, scope)  # A scores for real ...
        _take_over(db_url, msg.job_id)  # ... and meanwhile loses the batch to B
        after_take_over.update(_state(db_url, msg.job_id))
        if then == "finds a poison item":
            raise InjectedFault("A's verdict: an item of this batch cannot be scored")
        if then == "is preempted":
            raise Preempted("interactive work waits")
        if then == "meets an outage":
            raise InjectedOutage("the database went away for a moment")
        return out

    monkeypatch.setattr(engine, "_score", scored_while_taken_over)
    payload_queue = queue if then == "is preempted" else None
    if then == "meets an outage":  # the task retries it later (tasks.score_batch); A's hand-back must not land
        with pytest.raises(InjectedOutage):
            engine.score_batch(msg, queue=payload_queue)
    else:
        assert engine.score_batch(msg, queue=payload_queue) == 0
    state = _state(db_url, msg.job_id)
    assert state == after_take_over, f"A wrote for a batch that is B's: {after_take_over} -> {state}"
    assert state["batch"][:3] == (False, 2, "worker-b") and state["results"] == state["errors"] == 0
    assert state["job"][3] == 1  # not split
    assert queued_messages(redis.Redis.from_url(get_settings().redis_url), queue) == []  # nothing queued again

    # B, which holds the batch, finishes it; A's token, presented again, still writes nothing.
    with session_scope(db_url) as s:
        stale = repo.save_results(s, job_id=msg.job_id, batch_no=0, start_idx=0, scores=[0.5] * 4, cos=[[0.1]] * 4,
                                  model_version=msg.model_version, lease=1)  # fmt: skip
        assert stale == 0
    with session_scope(db_url) as s:
        assert repo.save_results(s, job_id=msg.job_id, batch_no=0, start_idx=0, scores=[0.5] * 4, cos=[[0.1]] * 4,
                                 model_version=msg.model_version, lease=2) == 4  # fmt: skip
    assert _state(db_url, msg.job_id)["job"][:2] == ("succeeded", 4)


def test_a_worker_that_holds_its_batch_writes_as_before(db_url: str, queue: str):
    """The fence is no obstacle to the holder: the same engine path with no takeover scores and finishes the job."""
    from rewardq.workers import engine

    msg = enqueued_job(db_url, PAIRS, "fence")
    assert engine.score_batch(msg, queue=None) == len(PAIRS)
    state = _state(db_url, msg.job_id)
    assert state["batch"][:2] == (True, 1) and state["job"][:2] == ("succeeded", 4) and state["results"] == 4
