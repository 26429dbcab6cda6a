"""The worker's write stage on a thread of its own (issue #36, item 1; rewardq/workers/writer.py), on SQLite and
PostgreSQL with the real encoder, Redis and the real engine.

The interleavings are forced with the write hold (REWARDQ_FAULT_WRITE_HOLD_FILE: a write waits before its
transaction while the file exists), not hoped for:
- while a batch's write is held, the task thread has acked it and takes and scores the next batch;
- a worker that dies while it writes a batch (its heartbeat expired, its last words say ``@write``) gives the
  batch back to the sweeper without a death counted on it; one that dies scoring it does count one;
- a write that meets a brief outage is tried again with its scores; past the retry budget it hands its batch back
  and queues it again, as the task's own retry did.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.exc import OperationalError

from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.models import Batch, db_now
from rewardq.storage.settings import get_settings
from rewardq.workers import liveness, writer
from rewardq.workers.messages import ScoreBatch, batch_key
from tests.support import enqueued_job, job_done, payloads, queued_messages, wait_for

pytestmark = pytest.mark.usefixtures("redis_url")

PAIRS = [("What is the capital of France?", "Paris."), ("2 + 2?", "4"), ("Name a colour.", "Blue."), ("Hi", "Hello")]


@pytest.fixture()
def hold(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings for the engine in this process, and the write hold's file (absent: writes go through)."""
    name = f"test-write-behind-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "hold"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", name)
    monkeypatch.setenv("REWARDQ_FAULT_WRITE_HOLD_FILE", str(path))
    get_settings.cache_clear()
    yield path
    path.unlink(missing_ok=True)
    assert writer.stop(30)
    redis.Redis.from_url(get_settings().redis_url).delete(name)
    get_settings.cache_clear()


def _job(db_url: str, job_id: str) -> tuple[str, int]:
    with session_scope(db_url) as s:
        return job_done(s, job_id)[:2]


def _beat() -> str:
    raw = redis.Redis.from_url(get_settings().redis_url).get(liveness.PREFIX + liveness.worker_id())
    return raw.decode() if raw else ""


def test_the_next_batch_is_scored_while_a_write_is_held(db_url: str, hold: Path):
    from rewardq.workers import engine

    writer.start()
    first, second = enqueued_job(db_url, PAIRS, "wb"), enqueued_job(db_url, PAIRS, "wb")
    hold.touch()
    assert engine.score_batch(first) == len(PAIRS)  # handed to the writer, which holds it
    assert writer.pending() == 1 and _job(db_url, first.job_id) == ("running", 0)
    # The task thread goes on: the next batch is taken and scored while the first one's write waits. Its take's
    # beat says what the process does: the first batch's write, and the second batch.
    assert engine.score_batch(second) == len(PAIRS)
    assert set(_beat().split(",")) == {batch_key(first.job_id, 0) + liveness.WRITING, batch_key(second.job_id, 0)}
    with session_scope(db_url) as s:
        b = s.get(Batch, (second.job_id, 0))
        assert b is not None and b.lease == 1 and not b.done  # taken, scored, its write queued behind the first
    assert writer.pending() == 2 and _job(db_url, first.job_id) == ("running", 0)
    hold.unlink()
    assert writer.drain(30)
    assert _job(db_url, first.job_id) == ("succeeded", 4) and _job(db_url, second.job_id) == ("succeeded", 4)
    assert _beat() == liveness.IDLE  # both writes said they were done, in their own round trips


@pytest.mark.parametrize("was", ["writing", "scoring"])
def test_a_worker_that_died_writing_a_batch_counts_no_death_on_it(db_url: str, hold: Path, was: str):
    """A dead worker's batch goes back either way; a death is counted only when it died scoring it (the next
    batch may have killed it while this one's results were being written: counting that quarantined innocent
    batches beside a killer after three kills)."""
    from rewardq.workers import sweeper

    msg = enqueued_job(db_url, PAIRS, "wb")
    dead = f"gone-host:1:{uuid.uuid4().hex[:8]}"
    with session_scope(db_url) as s:
        assert repo.start_batch(s, job_id=msg.job_id, batch_no=0, worker=dead) is not None
    client = redis.Redis.from_url(get_settings().redis_url)
    words = batch_key(msg.job_id, 0) + (liveness.WRITING if was == "writing" else "")
    client.set(liveness.PREFIX + dead + liveness.LAST_WORDS, f"other:3,{words}", ex=60)  # its heartbeat expired
    with session_scope(db_url) as s:
        later = db_now(s) + timedelta(seconds=get_settings().heartbeat_ttl_s + 1)
    sweeper.sweep(now=later)  # (it also queues what earlier tests left unfinished in this database: not this job's)
    with session_scope(db_url) as s:
        b = s.get(Batch, (msg.job_id, 0))
        assert b is not None
        assert (b.attempts, b.deaths) == (2, 0 if was == "writing" else 1)
    again = [p for p in payloads(queued_messages(client, get_settings().scoring_queue)) if p["job_id"] == msg.job_id]
    assert [p["batch_no"] for p in again] == [0]
    client.delete(liveness.PREFIX + dead + liveness.LAST_WORDS)


def test_a_write_that_meets_a_brief_outage_is_tried_again_with_its_scores(
    db_url: str, hold: Path, monkeypatch: pytest.MonkeyPatch
):
    """The writer keeps the scores and tries the write again after a backoff (the lease still fences each try): the
    batch is written on its first take, nothing is queued again, nothing is scored twice."""
    from rewardq.workers import engine

    writer.start()
    msg = enqueued_job(db_url, PAIRS, "wb")
    real = repo.save_results
    calls: list[int] = []

    def once_down(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("the database went away"))
        return real(*args, **kwargs)

    monkeypatch.setattr(repo, "save_results", once_down)
    assert engine.score_batch(msg) == len(PAIRS)
    assert writer.drain(30)
    assert len(calls) == 2 and _job(db_url, msg.job_id) == ("succeeded", 4)
    with session_scope(db_url) as s:
        b = s.get(Batch, (msg.job_id, 0))
        assert b is not None and b.done and b.deaths == 0 and b.lease == 1 and b.attempts == 1
    assert queued_messages(redis.Redis.from_url(get_settings().redis_url), get_settings().scoring_queue) == []
    assert batch_key(msg.job_id, 0) not in _beat()


def test_a_write_that_meets_a_long_outage_queues_its_batch_again(
    db_url: str, hold: Path, monkeypatch: pytest.MonkeyPatch
):
    """Past the writer's retry budget (WRITE_RETRY_S, 60 s; 1 s here), the message being acked already, the writer
    does what the task's retry did: the batch goes back (no death) and its message is queued again; the worker's
    heartbeat no longer names it."""
    from rewardq.workers import engine

    writer.start()
    msg = enqueued_job(db_url, PAIRS, "wb")
    real = repo.save_results

    def outage(*args: Any, **kwargs: Any) -> int:
        raise OperationalError("INSERT", {}, ConnectionRefusedError("the database went away"))

    monkeypatch.setattr(engine, "WRITE_RETRY_S", 1.0)
    monkeypatch.setattr(repo, "save_results", outage)
    key = batch_key(msg.job_id, 0)
    hold.touch()
    assert engine.score_batch(msg) == len(PAIRS)
    # Forced: while the write waits, this process's task thread says it works on the batch again (as when it takes
    # the batch's next message). The writer's giving up must not unsay that: it clears only its own entry.
    settings = get_settings()
    liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key)
    hold.unlink()
    assert writer.drain(30)
    assert _beat().split(",") == [key]
    liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key, done=True)
    monkeypatch.setattr(repo, "save_results", real)
    with session_scope(db_url) as s:
        b = s.get(Batch, (msg.job_id, 0))
        assert b is not None and not b.done and b.deaths == 0 and b.lease == 1
    assert _job(db_url, msg.job_id) == ("running", 0)
    assert key not in _beat()
    [again] = payloads(queued_messages(redis.Redis.from_url(get_settings().redis_url), get_settings().scoring_queue))
    assert again["job_id"] == msg.job_id and again["batch_no"] == 0
    # Taken again from that message, it is scored and written, counted as no death (it was handed back).
    assert engine.score_batch(ScoreBatch.model_validate(again)) == len(PAIRS)
    wait_for(lambda: _job(db_url, msg.job_id) == ("succeeded", 4), 30, "the batch written on its second take")
    with session_scope(db_url) as s:
        b = s.get(Batch, (msg.job_id, 0))
        assert b is not None and b.deaths == 0 and b.lease == 2
