"""Workers on one job write in parallel on PostgreSQL (issue #36, item 3: no serialising lock).

A write holds its job's row shared (FOR KEY SHARE), locks its batch's row, and counts its outcomes in its batch's
progress row (one of a few per job, by batch number): no statement of one batch's write waits for another batch's
write. The job closes after the commit of whichever write completes it, in a compare-and-set on the job's row, so the
last two writes still close it once with exact counts, whatever order they commit in; and a deletion (the one
exclusive holder) still waits for every write in flight. Each interleaving is forced: a write is held inside its
transaction (a pause in the real repository function, on that thread only), and a blocked statement is seen in
pg_stat_activity, not guessed from a sleep. SQLite has one writer at a time: nothing to show there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from rewardq.storage import ledger, lifecycle, registry
from rewardq.storage import repository as repo
from rewardq.storage.db import get_sessionmaker, session_scope
from rewardq.storage.models import Job, JobProgress, Result
from tests.conftest import migrated
from tests.support import job_done


@pytest.fixture()
def url(pg_url: str) -> str:
    return migrated(pg_url)


def _job(url: str) -> tuple[str, str, list[int]]:
    """A job of 8 items in two batches of 4, both taken (each by its worker): its id, version and the two leases."""
    with session_scope(url) as s:
        version = registry.default_version(s)
        assert version is not None
        items = [repo.NewItem(f"i{i}", f"prompt {i}", f"response {i}") for i in range(8)]
        job_id = repo.create_job(s, tenant="parallel", items=items, model_version=version, batch_size=4).id
    leases = []
    for batch_no in (0, 1):
        with session_scope(url) as s:
            take = repo.start_batch(s, job_id=job_id, batch_no=batch_no, worker=f"w{batch_no}")
            assert take is not None
            leases.append(take.lease)
    return job_id, version, leases


def _save(s: Session, job_id: str, version: str, batch_no: int, lease: int) -> int:
    return repo.save_results(
        s, job_id=job_id, batch_no=batch_no, start_idx=4 * batch_no, scores=[0.5] * 4, cos=[[0.1]] * 4,
        model_version=version, lease=lease,
    )  # fmt: skip


class Held:
    """Pause the thread that runs ``name`` in the repository (after the real call, or ``before`` it) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, before: bool = False) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None
        real: Callable[..., Any] = getattr(repo, name)

        def pause() -> None:
            if threading.current_thread() is self.thread:
                self.reached.set()
                assert self.release.wait(30), "never released"

        def held(*args: Any, **kwargs: Any) -> Any:
            if before:
                pause()
            out = real(*args, **kwargs)
            if not before:
                pause()
            return out

        monkeypatch.setattr(repo, name, held)

    def run(self, fn: Callable[[], None]) -> threading.Thread:
        self.thread = threading.Thread(target=fn, daemon=True)
        self.thread.start()
        assert self.reached.wait(30), "the held write never got there"
        return self.thread


def _writer(url: str, job_id: str, version: str, batch_no: int, lease: int, out: list[Any]) -> Callable[[], None]:
    def write() -> None:
        with session_scope(url) as s:
            out.append(_save(s, job_id, version, batch_no, lease))

    return write


def _a_write_waits(url: str, done: threading.Thread, timeout: float = 20.0) -> bool:
    """True once a backend of this database waits on a lock (the only writer that can is the one under test); False
    if ``done`` ended first (it did not wait)."""
    q = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
    deadline = time.monotonic() + timeout
    with get_sessionmaker(url)() as s:
        while time.monotonic() < deadline and done.is_alive():
            if s.execute(q).scalar():
                return True
            s.rollback()  # a fresh snapshot of pg_stat_activity
            time.sleep(0.01)
    return False


def _progress(url: str, job_id: str) -> tuple[str, int, int, bool]:
    with session_scope(url) as s:
        status, done, _ = job_done(s, job_id)
        n = s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id))
        finished = s.scalar(select(Job.finished_at).where(Job.id == job_id)) is not None
        return status, done, int(n or 0), finished


def _sweeper_closes(url: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sweeper's closing pass on ``url``'s database: the jobs it closed."""
    from rewardq.storage.settings import get_settings
    from rewardq.workers import sweeper

    monkeypatch.setenv("REWARDQ_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        return sweeper.close_complete_jobs()
    finally:
        get_settings.cache_clear()


def test_a_write_does_not_wait_for_another_writes_transaction(url: str, monkeypatch: pytest.MonkeyPatch):
    """Worker A's write is held after its results are inserted, its transaction open. Worker B writes its own batch
    of the same job meanwhile, with a 5 s lock timeout: before item 3, A's job row lock (taken by its fence) made B
    wait for A's whole transaction (LockNotAvailable here)."""
    job_id, version, (lease0, lease1) = _job(url)
    held = Held(monkeypatch, "_insert_new")
    out_a: list[Any] = []
    a = held.run(_writer(url, job_id, version, 0, lease0, out_a))
    with session_scope(url) as s:
        s.execute(text("SET LOCAL lock_timeout = '5s'"))
        assert _save(s, job_id, version, 1, lease1) == 4
    assert _progress(url, job_id) == ("queued", 4, 4, False)  # B committed while A's write is still open
    held.release.set()
    a.join(30)
    assert out_a == [4]
    assert _progress(url, job_id) == ("succeeded", 8, 8, True)


def test_the_counters_of_a_write_do_not_wait_for_another_writes_commit(url: str, monkeypatch: pytest.MonkeyPatch):
    """A's write is held after it counted its outcomes (its progress row updated, not committed). B's write of the
    job's other batch, with a 5 s lock timeout, counts its own and commits without waiting: before, both counted in
    the job's one row, and B waited for A's commit (LockNotAvailable here). B's commit cannot close the job (A's
    counts are not committed); A's, after it, does: 8 done, succeeded, once."""
    job_id, version, (lease0, lease1) = _job(url)
    held = Held(monkeypatch, "advance_job")
    out_a: list[Any] = []
    a = held.run(_writer(url, job_id, version, 0, lease0, out_a))
    with session_scope(url) as s:
        s.execute(text("SET LOCAL lock_timeout = '5s'"))
        assert _save(s, job_id, version, 1, lease1) == 4
    assert _progress(url, job_id) == ("queued", 4, 4, False)  # B's counts only: A's are not committed
    held.release.set()
    a.join(30)
    assert out_a == [4]
    assert _progress(url, job_id) == ("succeeded", 8, 8, True)
    with session_scope(url) as s:  # closed with its counts folded into its row
        job = s.get(Job, job_id)
        assert job is not None and (job.n_done, job.n_failed) == (8, 0)
        assert not s.scalar(select(func.count()).select_from(JobProgress).where(JobProgress.job_id == job_id))


def test_the_last_two_writes_of_a_job_close_it_once(url: str, monkeypatch: pytest.MonkeyPatch):
    """A's write commits and its closing step (after the commit) is held before it looks; B's write commits, so the
    job is complete when each step looks, and B's step closes it. A's step then finds it closed and does nothing: the
    job is succeeded once, 8 done, and only B's write says it closed it."""
    job_id, version, (lease0, lease1) = _job(url)
    held = Held(monkeypatch, "close_if_complete", before=True)
    closed: dict[str, dict[str, str]] = {}

    def write(name: str, batch_no: int, lease: int) -> Callable[[], None]:
        def run() -> None:
            with session_scope(url) as s:
                _save(s, job_id, version, batch_no, lease)
            closed[name] = dict(s.info.get(repo.CLOSED, {}))

        return run

    a = held.run(write("a", 0, lease0))  # A committed; its closing step is held before it looks
    assert _progress(url, job_id) == ("queued", 4, 4, False)
    b = threading.Thread(target=write("b", 1, lease1), daemon=True)
    b.start()
    b.join(30)
    assert closed["b"] == {job_id: "succeeded"}
    held.release.set()
    a.join(30)
    assert closed["a"] == {}
    assert _progress(url, job_id) == ("succeeded", 8, 8, True)


def test_a_job_left_open_by_a_stopped_writer_is_closed_by_the_sweeper(url: str, monkeypatch: pytest.MonkeyPatch):
    """The last write commits and its worker stops before the closing step (here the step is dropped): the job stays
    running with every item done, until the sweeper's pass closes it."""
    from rewardq.storage import db

    job_id, version, (lease0, lease1) = _job(url)
    for batch_no, lease in ((0, lease0), (1, lease1)):
        with session_scope(url) as s:
            _save(s, job_id, version, batch_no, lease)
            s.info.pop(db.AFTER_COMMIT)  # the worker stops between its commit and its closing step
    assert _progress(url, job_id) == ("queued", 8, 8, False)
    assert job_id in _sweeper_closes(url, monkeypatch)
    assert _progress(url, job_id) == ("succeeded", 8, 8, True)


def test_a_deletion_waits_for_a_write_in_flight_then_deletes_its_rows(url: str, monkeypatch: pytest.MonkeyPatch):
    """A write is held after its results are inserted, before its counters (it holds the job shared, not locked).
    A deletion of the job cancels it at once, then waits for the write (its lock is exclusive) and deletes what it
    wrote: were the deleter's lock the writers' kind, it would not wait for the write."""
    job_id, version, (lease0, _) = _job(url)
    held = Held(monkeypatch, "_insert_new")
    out_a: list[Any] = []
    a = held.run(_writer(url, job_id, version, 0, lease0, out_a))
    gone: list[Any] = []

    deleter = threading.Thread(target=lambda: gone.append(lifecycle.delete_job(url, job_id=job_id)), daemon=True)
    deleter.start()
    assert _a_write_waits(url, deleter), "the deletion did not wait for the write in flight"
    # It waits cancelled: no new take starts a write that would keep it waiting (PostgreSQL grants a new shared
    # holder before a waiting exclusive lock, so with the cancel under that lock, as it was, a busy job's deletion
    # waited as long as the job ran and the job stayed running).
    with session_scope(url) as s:
        assert repo.job_status(s, job_id=job_id) == "cancelled"
        assert repo.start_batch(s, job_id=job_id, batch_no=1, worker="w3", live_job=True) is None
    held.release.set()
    a.join(30)
    deleter.join(30)
    assert out_a == [4]
    deletion = gone[0]
    assert deletion is not None and deletion.complete and deletion.results == 4
    with session_scope(url) as s:
        assert s.get(Job, job_id) is None
        assert not s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id))


def test_two_feeders_claiming_one_batch_do_not_wait_for_each_other(url: str):
    """Feeder A has claimed a batch, its transaction still open (it is building the batch's message). Feeder B read
    the same next batch and claims it too, with a 5 s lock timeout: it leaves the batch to A at once. Before, B waited
    for A's commit only to find the batch claimed (LockNotAvailable here). After A commits, the batch is claimed
    once."""
    with session_scope(url) as s:
        items = [repo.NewItem(f"x{i}", f"prompt {i}", f"response {i}") for i in range(4)]
        fresh = repo.create_job(s, tenant="parallel", items=items, model_version=_job_version(s), batch_size=4).id
        s.execute(text("UPDATE batches SET enqueued_at = NULL WHERE job_id = :j"), {"j": fresh})
    with session_scope(url) as a:
        assert ledger.claim_requeue(a, job_id=fresh, batch_no=0, seen=None)
        with session_scope(url) as b:
            b.execute(text("SET LOCAL lock_timeout = '5s'"))
            assert not ledger.claim_requeue(b, job_id=fresh, batch_no=0, seen=None)
    with session_scope(url) as s:
        attempts = s.scalar(text("SELECT attempts FROM batches WHERE job_id = :j AND batch_no = 0"), {"j": fresh})
        assert s.scalar(text("SELECT enqueued_at IS NOT NULL FROM batches WHERE job_id = :j"), {"j": fresh})
    assert attempts == 1


def _job_version(s: Session) -> str:
    version = registry.default_version(s)
    assert version is not None
    return version


def test_a_failed_closing_step_leaves_the_write_standing_and_the_sweeper_closes_the_job(
    url: str, monkeypatch: pytest.MonkeyPatch
):
    """The last write commits and its closing step fails (the database drops the connection then): the write is not
    undone, retried or failed (its caller would otherwise retry a done batch, or fail a fully scored job); the job
    stays open until the sweeper's pass closes it."""
    from sqlalchemy.exc import OperationalError

    job_id, version, (lease0, lease1) = _job(url)
    with session_scope(url) as s:
        assert _save(s, job_id, version, 0, lease0) == 4
    real = repo.close_if_complete

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(repo, "close_if_complete", broken)
    with session_scope(url) as s:
        assert _save(s, job_id, version, 1, lease1) == 4  # no exception: the write committed
    assert _progress(url, job_id) == ("queued", 8, 8, False)
    monkeypatch.setattr(repo, "close_if_complete", real)
    assert job_id in _sweeper_closes(url, monkeypatch)
    assert _progress(url, job_id) == ("succeeded", 8, 8, True)


def test_a_count_that_lands_while_the_job_closes_is_kept(url: str, monkeypatch: pytest.MonkeyPatch):
    """The closing folds the progress rows' sums into the job's row, then deletes them, in two statements. No
    outcome can be counted after the last, but should a count land between them, it is added to the job's row,
    not lost with its progress row: forced here by a commit from another connection just before the deletion."""
    job_id, version, (lease0, lease1) = _job(url)
    with session_scope(url) as s:
        assert _save(s, job_id, version, 0, lease0) == 4
    real_delete = repo.delete

    def delete_after_a_late_count(*args: Any, **kwargs: Any) -> Any:
        with get_sessionmaker(url)() as other:
            other.execute(
                text("UPDATE job_progress SET cache_hits = cache_hits + 5 WHERE job_id = :j AND stripe = 0"),
                {"j": job_id},
            )
            other.commit()
        return real_delete(*args, **kwargs)

    monkeypatch.setattr(repo, "delete", delete_after_a_late_count)
    with session_scope(url) as s:
        assert _save(s, job_id, version, 1, lease1) == 4
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.n_done, job.cache_hits) == ("succeeded", 8, 5)
        assert not s.scalar(select(func.count()).select_from(JobProgress).where(JobProgress.job_id == job_id))
