"""Migrations and the repository on SQLite and PostgreSQL: idempotent upserts, progress, summaries."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from rewardq.storage import registry, results
from rewardq.storage import repository as repo
from rewardq.storage.db import get_engine, session_scope
from rewardq.storage.models import Batch, Job, Result
from tests.support import delete_queue, drop_message, job_done, queued_messages


def _job(db_url: str, n: int, batch_size: int = 4) -> str:
    with session_scope(db_url) as s:
        version = registry.default_version(s)
        assert version is not None
        items = [repo.NewItem(f"i{i}", f"p{i}", f"r{i}") for i in range(n)]
        job = repo.create_job(s, tenant="t", items=items, model_version=version, batch_size=batch_size)
        batches = s.query(Batch).filter_by(job_id=job.id).order_by(Batch.batch_no).all()
        assert [(b.start_idx, b.end_idx) for b in batches][-1] == (batch_size * (len(batches) - 1), n)
        assert job.n_batches == len(batches) and all(b.enqueued_at is None for b in batches)  # the feeder's job
        return job.id


def test_migrations_create_every_table(db_url: str):
    names = set(inspect(get_engine(db_url)).get_table_names())
    assert {"jobs", "items", "batches", "results", "model_versions", "alembic_version"} <= names


def _save(db_url: str, job_id: str, batch_no: int, start: int, scores: list[float]) -> int:
    with session_scope(db_url) as s:
        version = s.get(Job, job_id).model_version
        return repo.save_results(s, job_id=job_id, batch_no=batch_no, start_idx=start, scores=scores,
                                 cos=[[0.5]] * len(scores), model_version=version)  # fmt: skip


def test_a_partly_new_batch_counts_only_its_new_rows_and_keeps_nulls(db_url: str):
    """A copy of a batch that overlaps rows already stored (a split batch's half, a redelivery after a partial
    write) inserts and counts only the new ones, in one statement whatever mix of known and unknown token counts
    its rows have, and an unknown count stays NULL."""
    job_id = _job(db_url, 8)
    with session_scope(db_url) as s:
        version = s.get(Job, job_id).model_version
        assert (
            repo.save_results(
                s,
                job_id=job_id,
                batch_no=0,
                start_idx=2,
                scores=[1.0, 2.0],
                cos=[[0.5]] * 2,
                model_version=version,
                n_tokens=[7, None],
            )
            == 2
        )
    with session_scope(db_url) as s:
        got = repo.save_results(
            s,
            job_id=job_id,
            batch_no=0,
            start_idx=0,
            scores=[9.0] * 6,
            cos=[[0.5]] * 6,
            model_version=version,
            n_tokens=[None, 5, None, 5, None, 5],
        )
        assert got == 4  # indices 0, 1, 4 and 5; 2 and 3 were there
    with session_scope(db_url) as s:
        rows = s.query(Result).filter_by(job_id=job_id).order_by(Result.idx).all()
        assert [(r.idx, r.score, r.n_tokens) for r in rows] == [
            (0, 9.0, None),
            (1, 9.0, 5),
            (2, 1.0, 7),
            (3, 2.0, None),
            (4, 9.0, None),
            (5, 9.0, 5),
        ]
        assert all(r.created_at is not None for r in rows) and job_done(s, job_id)[1] == 6


def test_redelivered_batch_counts_once_and_job_finishes(db_url: str):
    job_id = _job(db_url, 6)
    with session_scope(db_url) as s:
        repo.mark_running(s, job_id=job_id)
    assert _save(db_url, job_id, 0, 0, [1.0, 2.0, 3.0, 4.0]) == 4
    assert _save(db_url, job_id, 0, 0, [9.0, 9.0, 9.0, 9.0]) == 0  # redelivery: nothing new, nothing overwritten
    with session_scope(db_url) as s:
        assert job_done(s, job_id)[:2] == ("running", 4)
    assert _save(db_url, job_id, 1, 4, [5.0, 6.0]) == 2
    with session_scope(db_url) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.n_done) == ("succeeded", 6) and job.finished_at is not None
        assert [r.score for r in s.query(Result).filter_by(job_id=job_id).order_by(Result.idx)] == [1, 2, 3, 4, 5, 6]
        summary = results.score_summary(s, job_id=job_id)
    assert summary["count"] == 6 and summary["min"] == 1.0 and summary["max"] == 6.0
    assert summary["mean"] == 3.5 and summary["p50"] in (3.0, 4.0)


def test_results_after_cancel_are_kept_but_status_stays(db_url: str):
    job_id = _job(db_url, 8)
    with session_scope(db_url) as s:
        repo.cancel_job(s, job=s.get(Job, job_id))
    assert _save(db_url, job_id, 0, 0, [1.0] * 4) == 4
    with session_scope(db_url) as s:
        assert job_done(s, job_id)[:2] == ("cancelled", 4)


def test_a_cancel_never_overwrites_a_job_that_ended_meanwhile(db_url: str):
    """Forced interleaving: the cancel has read the job (running) when a worker commits the job's last batch; the
    cancel's write must not turn the succeeded job into a cancelled one."""
    job_id = _job(db_url, 4)
    with session_scope(db_url) as s:
        repo.mark_running(s, job_id=job_id)
    with session_scope(db_url) as s:
        job = s.get(Job, job_id)
        assert job.status == "running"  # what the cancel saw
        assert _save(db_url, job_id, 0, 0, [1.0] * 4) == 4  # meanwhile, in another transaction: the last batch
        assert repo.cancel_job(s, job=job).status == "succeeded"
    with session_scope(db_url) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.n_done) == ("succeeded", 4)


def test_score_cursor_pages_cover_ties_exactly_once(db_url: str):
    job_id = _job(db_url, 12, batch_size=12)
    _save(db_url, job_id, 0, 0, [0.5, 0.1, 0.5, 0.5, 0.2, 0.5, 0.9, 0.1, 0.5, 0.3, 0.5, 0.5])
    for sort in ("index", "score", "-score"):
        seen, cursor = [], None
        with session_scope(db_url) as s:
            while True:
                rows, cursor = results.results_page(s, job_id=job_id, sort=sort, cursor=cursor, limit=5)
                seen += [r.idx for r, _ in rows]
                if cursor is None:
                    break
        assert sorted(seen) == list(range(12)), sort


def test_histogram_in_sql_matches_numpy(db_url: str):
    """Bins are floor((score - min) / width) in SQL on both databases (PostgreSQL's CAST would round)."""
    import numpy as np

    rng = np.random.default_rng(0)
    scores = [float(x) for x in rng.normal(0.6, 0.15, 500)]
    job_id = _job(db_url, 500, batch_size=500)
    _save(db_url, job_id, 0, 0, scores)
    with session_scope(db_url) as s:
        hist = results.score_histogram(s, job_id=job_id, bins=17)
        single = results.score_histogram(s, job_id=_job(db_url, 1, batch_size=1), bins=5)
    expected, edges = np.histogram(scores, bins=17, range=(min(scores), max(scores)))
    assert [b["count"] for b in hist["bins"]] == expected.tolist()
    assert [b["lo"] for b in hist["bins"]] == pytest.approx(edges[:-1].tolist())
    assert hist["count"] == 500 and hist["max"] == max(scores) and hist["bins"][-1]["hi"] == pytest.approx(max(scores))
    assert single == {"count": 0, "min": None, "max": None, "bins": []}  # nothing scored yet


def test_a_lost_batch_is_found_while_the_queue_never_drains(db_url: str, monkeypatch: pytest.MonkeyPatch):
    """Forced: a job's three batches are queued, then batch 1's message is lost (as a Redis restart loses one: from
    the queue and from the set of waiting batches) while batches 0 and 2 still wait, so the queue is never empty.
    The sweeper must enqueue batch 1 again, once (the old code waited for an empty queue), and leave the others."""
    import json
    import uuid
    from datetime import datetime, timedelta, timezone

    import redis

    from rewardq.storage.settings import get_settings
    from rewardq.workers.feeder import enqueue_claimed
    from rewardq.workers.messages import QUEUED_BATCHES, batch_key
    from rewardq.workers.sweeper import sweep

    queue = f"test-lost-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", queue)
    get_settings.cache_clear()
    r = redis.Redis.from_url(get_settings().redis_url)

    def batch_nos() -> list[int]:
        reprs = [json.loads(m)["headers"]["kwargsrepr"] for m in queued_messages(r, queue)]
        return sorted(n for n in range(3) for k in reprs if f"'job_id': '{job_id}', 'batch_no': {n}," in k)

    try:
        job_id = _job(db_url, 12, batch_size=4)
        with session_scope(db_url) as s:
            version = s.get(Job, job_id).model_version
            batches = s.query(Batch).filter_by(job_id=job_id)
            rows = [(job_id, b.batch_no, b.start_idx, b.end_idx, None, version, None) for b in batches]
        assert enqueue_claimed(rows) == 3 and batch_nos() == [0, 1, 2]
        [lost] = [m for m in queued_messages(r, queue) if "'batch_no': 1," in json.loads(m)["headers"]["kwargsrepr"]]
        drop_message(r, queue, lost)
        r.srem(QUEUED_BATCHES, batch_key(job_id, 1))
        later = datetime.now(timezone.utc) + timedelta(seconds=get_settings().lost_after_s + 1)
        sweep(now=later)
        sweep(now=later + timedelta(seconds=1))  # a second sweep enqueues nothing more
        assert batch_nos() == [0, 1, 2]
        with session_scope(db_url) as s:
            attempts = {b.batch_no: b.attempts for b in s.query(Batch).filter_by(job_id=job_id)}
        assert attempts == {0: 1, 1: 2, 2: 1}
    finally:
        delete_queue(r, queue)
        monkeypatch.delenv("REWARDQ_SCORING_QUEUE")
        get_settings.cache_clear()


def _outcomes(db_url: str, job_id: str) -> tuple[list[int], list[int], tuple[int, int, int, str]]:
    from rewardq.storage.models import ItemError

    with session_scope(db_url) as s:
        scored = [r.idx for r in s.query(Result).filter_by(job_id=job_id).order_by(Result.idx)]
        failed = [e.idx for e in s.query(ItemError).filter_by(job_id=job_id).order_by(ItemError.idx)]
        job = s.get(Job, job_id)
        _, done, n_failed = job_done(s, job_id)
        return scored, failed, (done, n_failed, job.n_items, job.status)


def _fail(db_url: str, job_id: str, batch_no: int, idx: int) -> bool:
    with session_scope(db_url) as s:
        return repo.record_item_failure(s, job_id=job_id, batch_no=batch_no, idx=idx, code="oom", message="x")


def test_an_item_is_scored_or_failed_never_both(db_url: str):
    """Forced, both orders: a split copy of a batch fails an item that the batch's first (slow, resumed) worker then
    scores; and a worker scores a batch whose split copy then fails one of its items. Whichever outcome is written
    first stays, the other is dropped, and n_done + n_failed never exceeds n_items."""
    job_id = _job(db_url, 8)
    assert _fail(db_url, job_id, 0, 1)  # the split copy: item 1 is poison
    assert _save(db_url, job_id, 0, 0, [1.0] * 4) == 3  # the first copy, late: items 0, 2, 3 only
    assert _save(db_url, job_id, 1, 4, [1.0] * 4) == 4
    assert not _fail(db_url, job_id, 1, 5)  # item 5 is scored already: it stays scored
    assert _outcomes(db_url, job_id) == ([0, 2, 3, 4, 5, 6, 7], [1], (7, 1, 8, "succeeded"))


def test_concurrent_score_and_failure_of_one_item_leave_one_outcome(db_url: str):
    """Forced interleaving in two transactions: a worker has written a batch's results but not committed when a
    split copy records one of its items as failed. The failure must wait for the scores' commit, see them, and
    write nothing (the old code recorded both)."""
    import threading

    from rewardq.storage.db import get_sessionmaker

    job_id = _job(db_url, 4)
    with get_sessionmaker(db_url)() as first:
        version = first.get(Job, job_id).model_version
        scores, cos = [1.0] * 4, [[0.5]] * 4
        inserted = repo.save_results(
            first, job_id=job_id, batch_no=0, start_idx=0, scores=scores, cos=cos, model_version=version
        )
        assert inserted == 4
        outcome: list[bool] = []
        copy = threading.Thread(target=lambda: outcome.append(_fail(db_url, job_id, 0, 2)))
        copy.start()
        copy.join(1.0)
        assert copy.is_alive(), "the failure did not wait for the uncommitted scores of its item"
        first.commit()
    copy.join(30)
    assert outcome == [False]
    assert _outcomes(db_url, job_id) == ([0, 1, 2, 3], [], (4, 0, 4, "succeeded"))


def test_times_compared_across_hosts_are_the_databases(pg_url: str, monkeypatch: pytest.MonkeyPatch):
    """Forced: workers on hosts whose clocks are 2 minutes off the sweeper's. One, behind, takes batch 0 and is
    healthy; one, ahead, takes batch 1 and dies. The sweeper must leave batch 0 alone (the old code took it for a
    lost message: started before it was enqueued) and queue batch 1 again a TTL later (the old code saw a take in
    its future and waited the skew out)."""
    import json
    import uuid
    from datetime import datetime, timedelta, timezone

    import redis

    from rewardq.storage import models
    from rewardq.storage.settings import get_settings
    from rewardq.workers import liveness
    from rewardq.workers.feeder import enqueue_claimed
    from rewardq.workers.messages import QUEUED_BATCHES, batch_key
    from rewardq.workers.sweeper import sweep
    from tests.conftest import migrated

    db_url = migrated(pg_url)
    queue = f"test-clock-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", queue)
    get_settings.cache_clear()
    settings = get_settings()
    r = redis.Redis.from_url(settings.redis_url)
    healthy, dead = f"behind:{uuid.uuid4().hex[:8]}", f"ahead:{uuid.uuid4().hex[:8]}"

    def queued() -> list[int]:
        reprs = [json.loads(m)["headers"]["kwargsrepr"] for m in queued_messages(r, queue)]
        return sorted(n for n in range(2) for k in reprs if f"'job_id': '{job_id}', 'batch_no': {n}," in k)

    def take(batch_no: int, worker: str, skew_s: float) -> None:
        real = models.utcnow
        with monkeypatch.context() as m:  # this host's clock is skew_s off
            skewed = lambda: real() + timedelta(seconds=skew_s)  # noqa: E731
            m.setattr(models, "utcnow", skewed)
            m.setattr(repo, "utcnow", skewed, raising=False)
            with session_scope(db_url) as s:
                assert repo.start_batch(s, job_id=job_id, batch_no=batch_no, worker=worker).deaths == 0
        r.srem(QUEUED_BATCHES, batch_key(job_id, batch_no))

    try:
        job_id = _job(db_url, 8)
        with session_scope(db_url) as s:
            version = s.get(Job, job_id).model_version
        assert enqueue_claimed([(job_id, n, 4 * n, 4 * n + 4, None, version, None) for n in range(2)]) == 2
        delete_queue(r, queue)  # both messages delivered
        r.set(liveness.PREFIX + healthy, "1", ex=300)
        take(0, healthy, -120.0)
        take(1, dead, +120.0)
        later = max(settings.lost_after_s, settings.heartbeat_ttl_s) + 1
        sweep(now=datetime.now(timezone.utc) + timedelta(seconds=later))
        assert queued() == [1]
        with session_scope(db_url) as s:
            got = {b.batch_no: (b.attempts, b.deaths) for b in s.query(Batch).filter_by(job_id=job_id)}
        assert got == {0: (1, 0), 1: (2, 1)}
    finally:
        delete_queue(r, queue)
        r.delete(liveness.PREFIX + healthy)
        monkeypatch.delenv("REWARDQ_SCORING_QUEUE")
        get_settings.cache_clear()


def _taken_job(db_url: str, queue: str, takers: list[str]) -> tuple[str, list[int]]:
    """A job of one 4-item batch per taker, each enqueued, delivered (the queue emptied) and taken by its taker."""
    import redis

    from rewardq.storage.settings import get_settings
    from rewardq.workers.feeder import enqueue_claimed

    job_id = _job(db_url, 4 * len(takers))
    with session_scope(db_url) as s:
        version = s.get(Job, job_id).model_version
    rows = [(job_id, n, 4 * n, 4 * n + 4, None, version, None) for n in range(len(takers))]
    assert enqueue_claimed(rows) == len(takers)
    delete_queue(redis.Redis.from_url(get_settings().redis_url), queue)
    for n, worker in enumerate(takers):
        with session_scope(db_url) as s:
            assert repo.start_batch(s, job_id=job_id, batch_no=n, worker=worker).deaths == 0
    return job_id, list(range(len(takers)))


def _requeues(db_url: str, job_id: str) -> dict[int, tuple[int, int]]:
    with session_scope(db_url) as s:
        return {b.batch_no: (b.attempts, b.deaths) for b in s.query(Batch).filter_by(job_id=job_id)}


def test_a_batch_its_live_worker_left_is_queued_again(db_url: str, monkeypatch: pytest.MonkeyPatch):
    """Forced: two live workers each took a batch. One still works on it (its heartbeat names it); the other left
    it (its heartbeat says idle: the batch's retry waited in its memory and was lost with a Redis restart). The
    sweeper must queue the left batch again a TTL later, without counting a death, and leave the other alone; the
    old sweeper trusted any live heartbeat and left both until the 6-hour deadline."""
    import uuid
    from datetime import datetime, timedelta, timezone

    import redis

    from rewardq.storage.settings import get_settings
    from rewardq.workers import liveness
    from rewardq.workers.messages import batch_key
    from rewardq.workers.sweeper import sweep

    queue = f"test-left-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", queue)
    get_settings.cache_clear()
    r = redis.Redis.from_url(get_settings().redis_url)
    idle, busy = f"idle:{uuid.uuid4().hex[:8]}", f"busy:{uuid.uuid4().hex[:8]}"
    try:
        job_id, _ = _taken_job(db_url, queue, [idle, busy])
        r.set(liveness.PREFIX + idle, liveness.IDLE, ex=300)
        r.set(liveness.PREFIX + busy, batch_key(job_id, 1), ex=300)
        sweep(now=datetime.now(timezone.utc) + timedelta(seconds=get_settings().heartbeat_ttl_s + 1))
        assert _requeues(db_url, job_id) == {0: (1, 0), 1: (1, 0)}  # a retry may still be waiting for a minute
        sweep(now=datetime.now(timezone.utc) + timedelta(seconds=get_settings().heartbeat_ttl_s + 61))
        assert _requeues(db_url, job_id) == {0: (2, 0), 1: (1, 0)}
        mine = [m for m in queued_messages(r, queue) if job_id.encode() in m]  # other tests' batches may come too
        assert len(mine) == 1
    finally:
        delete_queue(r, queue)
        r.delete(liveness.PREFIX + idle, liveness.PREFIX + busy)
        monkeypatch.delenv("REWARDQ_SCORING_QUEUE")
        get_settings.cache_clear()


def test_missing_heartbeats_mean_nothing_until_a_restarted_redis_is_a_ttl_old(
    db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """Forced: Redis has just restarted (a new redis-server), so no worker's heartbeat is there yet; live workers
    write theirs again within a third of the TTL. The sweeper must neither queue a taken batch again nor release a
    running run until Redis has been up for two beats (the old sweeper took every worker for dead and retrained
    runs twice); then a worker still missing is dead."""
    import uuid
    from datetime import timedelta

    from rewardq.api.procs import free_port, start_redis, wait_for
    from rewardq.storage import training_repository as trepo
    from rewardq.storage.models import db_now
    from rewardq.storage.settings import get_settings
    from rewardq.workers import liveness
    from rewardq.workers.sweeper import sweep, sweep_runs
    from tests.support import need

    port = free_port()
    server = start_redis(port, tmp_path / "redis.log")
    need(server is not None, "redis-server")
    assert server is not None
    url = f"redis://127.0.0.1:{port}/0"
    queue = f"test-restarted-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_REDIS_URL", url)
    monkeypatch.setenv("REWARDQ_HEARTBEAT_TTL_S", "9")
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", queue)
    monkeypatch.setenv("REWARDQ_TRAINING_QUEUE", queue + "-runs")
    get_settings.cache_clear()
    gone = f"gone:{uuid.uuid4().hex[:8]}"
    try:
        job_id, _ = _taken_job(db_url, queue, [gone])
        with session_scope(db_url) as s:
            run = trepo.create_run(s, tenant=f"t-{uuid.uuid4().hex[:6]}", params={}).id
        with session_scope(db_url) as s:
            assert trepo.start_run(s, run_id=run, base_version="v", n_feedback=0, max_feedback_id=0, worker=gone)
        with session_scope(db_url) as s:
            later = db_now(s) + timedelta(seconds=10)
        assert not liveness.trusted(url, 9)  # up for less than two beats (6 s)
        sweep(now=later)
        assert run not in sweep_runs()  # (other tests' lost queued runs may go back: they need no heartbeat)
        assert _requeues(db_url, job_id) == {0: (1, 0)}
        wait_for(lambda: liveness.trusted(url, 9), 15, "Redis up for two beats")
        sweep(now=later)
        assert run in sweep_runs()  # other tests' runs whose workers are gone may go back too
        assert _requeues(db_url, job_id) == {0: (2, 1)}
    finally:
        server.stop()
        get_settings.cache_clear()


def test_a_heartbeat_names_each_piece_of_work_of_its_process(redis_url: str, monkeypatch: pytest.MonkeyPatch):
    """With the threads pool one process works on several batches at once: its heartbeat names each, and one
    finishing does not make the other look left."""
    from rewardq.storage.settings import get_settings
    from rewardq.workers import liveness

    monkeypatch.setenv("REWARDQ_REDIS_URL", redis_url)
    get_settings.cache_clear()
    me = liveness.worker_id()
    try:
        liveness.working_on(redis_url, 30, "job:1")
        liveness.working_on(redis_url, 30, "job:2")
        liveness.working_on(redis_url, 30, "job:1", done=True)
        beat = liveness.doing(redis_url, [me])[me]
        assert not liveness.abandoned(beat, "job:2") and liveness.abandoned(beat, "job:1")
        liveness.working_on(redis_url, 30, "job:2", done=True)
        assert liveness.doing(redis_url, [me])[me] == liveness.IDLE
    finally:
        get_settings.cache_clear()


def test_a_forked_child_never_uses_its_parents_connection(db_url: str):
    """Forced: the parent holds a pooled PostgreSQL connection when it forks (as `rewardq worker` did, having registered
    the base version, before Celery forked its pool). The child must open its own: two processes on one socket
    failed jobs with "connection in transaction status INTRANS" (found by benchmarks/benchmark_fair_share.py)."""
    import os

    from sqlalchemy import text

    if not db_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL backend pid names the server connection")
    # An engine of its own (another URL), so its pool holds this one connection only.
    engine = get_engine(db_url + ("&" if "?" in db_url else "?") + "application_name=rewardq-fork-test")
    with engine.connect() as c:
        parent = c.execute(text("SELECT pg_backend_pid()")).scalar()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            with engine.connect() as c:
                os.write(write, str(c.execute(text("SELECT pg_backend_pid()")).scalar()).encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 64).decode()
    os.waitpid(child, 0)
    with engine.connect() as c:  # and the parent's own connection still works
        assert c.execute(text("SELECT pg_backend_pid()")).scalar() == parent
    assert got and int(got) != parent


def test_a_batch_taken_after_the_sweeper_read_it_is_not_queued_again(db_url: str):
    """claim_requeue compared only the enqueue time, so a batch the sweeper read as lost (or as its dead worker's)
    and a worker took before the claim (a slow message, the broker's redelivery) was queued a second time while the
    worker scored it. Forced: the sweeper's read, then the take, then the claim; the claim must lose. Before the
    fix the claim won (True)."""
    from rewardq.storage import ledger

    job_id = _job(db_url, 8)
    with session_scope(db_url) as s:
        assert ledger.claim_requeue(s, job_id=job_id, batch_no=0, seen=None)  # the feeder's enqueue
    with session_scope(db_url) as s:  # the sweeper reads it: enqueued, not taken since
        b = s.get(Batch, (job_id, 0))
        seen, taken = b.enqueued_at, b.started_at
    assert taken is None
    with session_scope(db_url) as s:  # a worker takes it now
        assert repo.start_batch(s, job_id=job_id, batch_no=0, worker="w1").deaths == 0
    with session_scope(db_url) as s:
        assert not ledger.claim_requeue(s, job_id=job_id, batch_no=0, seen=seen, taken=taken)
    with session_scope(db_url) as s:  # read again, it is the take the claim compares: a dead taker's batch goes back
        b = s.get(Batch, (job_id, 0))
        seen, taken = b.enqueued_at, b.started_at
        assert ledger.claim_requeue(s, job_id=job_id, batch_no=0, seen=seen, taken=taken, died=True)
    with session_scope(db_url) as s:
        b = s.get(Batch, (job_id, 0))
        assert (b.attempts, b.deaths) == (2, 1)


def test_a_succeeded_jobs_summary_is_stored_once_and_read_after(db_url: str):
    """GET /v1/jobs/{id} read every result of the job on each call for its summary (issue #37, item 10). A
    succeeded job's is stored the first time; a running job's is computed each time (it still changes)."""
    from sqlalchemy import update

    job_id = _job(db_url, 4, batch_size=4)
    assert _save(db_url, job_id, 0, 0, [0.1, 0.2, 0.3, 0.4]) == 4
    with session_scope(db_url) as s:
        job = s.get(Job, job_id)
        assert job.status == "succeeded"
        first = results.job_summary(s, job)
    assert first["count"] == 4 and first["max"] == pytest.approx(0.4)
    with session_scope(db_url) as s:  # a result changed behind its back: the stored summary is what is read
        assert s.get(Job, job_id).summary == first
        s.execute(update(Result).where(Result.job_id == job_id, Result.idx == 3).values(score=9.0))
    with session_scope(db_url) as s:
        assert results.job_summary(s, s.get(Job, job_id)) == first
    running = _job(db_url, 8, batch_size=4)
    _save(db_url, running, 0, 0, [0.5] * 4)
    with session_scope(db_url) as s:
        job = s.get(Job, running)
        assert job.status != "succeeded" and results.job_summary(s, job)["count"] == 4
    _save(db_url, running, 1, 4, [0.7] * 4)
    with session_scope(db_url) as s:
        assert results.job_summary(s, s.get(Job, running))["count"] == 8  # not a stale stored one
