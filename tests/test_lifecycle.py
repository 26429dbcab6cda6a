"""Data lifecycle: DELETE /v1/jobs/{id} and /v1/feedback, tenant-scoped, in chunks, safe against a worker that is
mid-batch; REWARDQ_RETENTION_DAYS's purge (beat, `rewardq purge`), safe in two beats at once; the CLI verbs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from rewardq.storage import lifecycle, registry
from rewardq.storage import repository as repo
from rewardq.storage import training_repository as trepo
from rewardq.storage.db import session_scope
from rewardq.storage.models import Batch, Feedback, Item, ItemError, Job, Result
from tests.conftest import RUN_ID, TEST_REDIS_URL, make_client

KEY_A, KEY_B = "key-lifecycle-a-" + "a" * 32, "key-lifecycle-b-" + "b" * 32
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
ITEMS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
TABLES: tuple[Any, ...] = (Item, Result, ItemError, Batch)


@pytest.fixture()
def tenants(db_url: str, redis_url: str) -> Iterator[tuple[TestClient, str, str]]:
    """The API in-process (no worker) with two keys, for tenants of this test only."""
    a, b = f"lc-a-{uuid.uuid4().hex[:8]}", f"lc-b-{uuid.uuid4().hex[:8]}"
    queue = f"test-lifecycle-{RUN_ID}"
    with make_client(db_url, queue, api_keys=f"{a}:{KEY_A},{b}:{KEY_B}") as c:
        yield c, a, b
    redis.Redis.from_url(redis_url).delete(queue)


def _rows(db_url: str, job_id: str) -> dict[str, int]:
    """Rows the job has in each table, counted in SQL."""
    with session_scope(db_url) as s:
        out = {t.__tablename__: int(s.scalar(select(func.count()).select_from(t).where(t.job_id == job_id)) or 0)
               for t in TABLES}  # fmt: skip
        out["jobs"] = int(s.scalar(select(func.count()).select_from(Job).where(Job.id == job_id)) or 0)
    return out


def _job(db_url: str, n: int, tenant: str = "lifecycle", batch_size: int = 4) -> str:
    with session_scope(db_url) as s:
        version = registry.default_version(s)
        assert version is not None
        items = [repo.NewItem(f"i{i}", f"p{i}", f"r{i}") for i in range(n)]
        return repo.create_job(s, tenant=tenant, items=items, model_version=version, batch_size=batch_size).id


def _score(db_url: str, job_id: str, fail: frozenset[int] = frozenset()) -> None:
    """What workers write for the whole job: every batch's results, ``fail`` in the error ledger instead."""
    with session_scope(db_url) as s:
        repo.mark_running(s, job_id=job_id)
        version = s.get(Job, job_id).model_version
        for b in repo.job_batches(s, job_id=job_id):
            for idx in sorted(fail & set(range(b.start_idx, b.end_idx))):
                repo.record_item_failure(s, job_id=job_id, batch_no=b.batch_no, idx=idx, code="x", message="m")
            n = b.end_idx - b.start_idx
            repo.save_results(s, job_id=job_id, batch_no=b.batch_no, start_idx=b.start_idx, scores=[1.0] * n,
                              cos=[[0.5]] * n, model_version=version,
                              skip=frozenset(i - b.start_idx for i in fail))  # fmt: skip


def _queued_key(job_id: str, batch_no: int = 0) -> bool:
    from rewardq.workers.messages import QUEUED_BATCHES, batch_key

    return bool(redis.Redis.from_url(TEST_REDIS_URL).sismember(QUEUED_BATCHES, batch_key(job_id, batch_no)))


def test_delete_removes_the_job_and_every_row_it_holds(db_url: str, tenants: tuple[TestClient, str, str]):
    from rewardq.workers.messages import QUEUED_BATCHES, batch_key

    c, _, _ = tenants
    done = c.post("/v1/jobs", json={"items": ITEMS}, headers=A).json()["job_id"]
    other = c.post("/v1/jobs", json={"items": ITEMS[:3]}, headers=A).json()["job_id"]
    _score(db_url, done, fail=frozenset({4}))
    redis.Redis.from_url(TEST_REDIS_URL).sadd(QUEUED_BATCHES, batch_key(done, 0))  # as if its message were waiting
    assert c.get(f"/v1/jobs/{done}", headers=A).json()["status"] == "succeeded"
    assert _rows(db_url, done) == {"items": 5, "results": 4, "item_errors": 1, "batches": 1, "jobs": 1}

    r = c.delete(f"/v1/jobs/{done[:8]}", headers=A)  # a short id resolves, as for GET
    assert r.status_code == 200, r.text
    assert r.json() == {"job_id": done, "cancelled": False,
                        "deleted": {"items": 5, "results": 4, "item_errors": 1, "batches": 1}}  # fmt: skip
    assert _rows(db_url, done) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
    assert not _queued_key(done)
    assert _rows(db_url, other) == {"items": 3, "results": 0, "item_errors": 0, "batches": 1, "jobs": 1}
    assert c.get(f"/v1/jobs/{done}", headers=A).status_code == 404
    assert c.get(f"/v1/jobs/{done}/results", headers=A).status_code == 404
    assert c.delete(f"/v1/jobs/{done}", headers=A).status_code == 404  # gone: as if it never existed

    # A job nobody has scored yet (no worker here): cancelled first, then deleted.
    r = c.delete(f"/v1/jobs/{other}", headers=A)
    assert r.status_code == 200 and r.json()["cancelled"] is True and r.json()["deleted"]["items"] == 3
    assert _rows(db_url, other) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
    assert c.get("/v1/jobs", headers=A).json()["jobs"] == []


def test_a_long_poll_on_a_job_that_is_deleted_answers_404(db_url: str, tenants: tuple[TestClient, str, str]):
    from rewardq.workers import events

    c, a, b = tenants
    job = c.post("/v1/jobs", json={"items": ITEMS}, headers=A).json()["job_id"]
    answer: list[int] = []
    with make_client(db_url, f"test-lifecycle-{RUN_ID}", api_keys=f"{a}:{KEY_A},{b}:{KEY_B}") as poller:
        waiter = threading.Thread(
            target=lambda: answer.append(poller.get(f"/v1/jobs/{job}?wait=30", headers=A).status_code)
        )
        waiter.start()
        from rewardq.api.procs import wait_for

        wait_for(lambda: any(w.count for ws in events._waiters.values() for w in ws.values()), 10, "the long poll")
        assert c.delete(f"/v1/jobs/{job}", headers=A).status_code == 200
        waiter.join(20)
    assert answer == [404]  # not a 500 from a row that vanished under it, not the whole 30 s


def test_another_tenants_delete_is_404_and_deletes_nothing(db_url: str, tenants: tuple[TestClient, str, str]):
    from rewardq.api.deps import UI_HEADER

    c, a, _ = tenants
    job = c.post("/v1/jobs", json={"items": ITEMS}, headers=A).json()["job_id"]
    assert c.post("/v1/feedback", json=[{"prompt": "p", "chosen": "x", "rejected": "y"}], headers=A).status_code == 201
    before = _rows(db_url, job)
    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job[:8]}"):
        r = c.delete(path, headers=B)
        assert r.status_code == 404 and r.json()["errors"][0]["field"] == "job_id", r.text
    assert c.delete("/v1/feedback", headers=B).json() == {"deleted": 0, "before": None, "total": 0}
    assert c.delete(f"/v1/jobs/{job}").status_code == 401  # no key
    assert _rows(db_url, job) == before and c.get(f"/v1/jobs/{job}", headers=A).json()["status"] == "queued"
    assert c.get("/v1/feedback", headers=A).json()["total"] == 1

    # The dashboard's cookie alone never deletes (another site's form could send it); with its header it does.
    signed_in = c.post("/ui/login", data={"key": KEY_A, "next": "/ui/jobs"}, follow_redirects=False)
    assert signed_in.status_code == 303 and c.cookies  # a session cookie (api.ui)
    try:
        assert c.delete(f"/v1/jobs/{job}").status_code == 403
        assert c.delete("/v1/feedback").status_code == 403
        assert _rows(db_url, job) == before
        assert c.delete(f"/v1/jobs/{job}", headers={UI_HEADER: "1"}).status_code == 200
    finally:
        c.cookies.clear()
    assert _rows(db_url, job)["jobs"] == 0


def _backdate_feedback(db_url: str, tenant: str, ids: list[int], days: float) -> None:
    with session_scope(db_url) as s:
        s.execute(
            update(Feedback)
            .where(Feedback.tenant == tenant, Feedback.id.in_(ids))
            .values(created_at=datetime.now(timezone.utc) - timedelta(days=days))
        )


def _feedback_ids(db_url: str, tenant: str) -> list[int]:
    with session_scope(db_url) as s:
        return list(s.scalars(select(Feedback.id).where(Feedback.tenant == tenant).order_by(Feedback.id)))


def test_feedback_delete_takes_all_or_only_rows_before_a_time(db_url: str, tenants: tuple[TestClient, str, str]):
    c, a, b = tenants
    rows = [{"prompt": f"p{i}", "response": "r", "rating": float(i)} for i in range(4)]
    assert c.post("/v1/feedback", json=rows, headers=A).status_code == 201
    assert c.post("/v1/feedback", json=rows[:1], headers=B).status_code == 201
    ids = _feedback_ids(db_url, a)
    _backdate_feedback(db_url, a, ids[:2], days=10)

    cutoff = (datetime.now(timezone.utc) - timedelta(days=5)).isoformat()
    r = c.delete("/v1/feedback", params={"before": cutoff}, headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == 2 and r.json()["total"] == 2
    assert _feedback_ids(db_url, a) == ids[2:]  # the two old ones went, the recent ones stayed
    assert c.delete("/v1/feedback", params={"before": "last tuesday"}, headers=A).status_code == 422
    day = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()  # a plain date: its midnight, UTC
    assert c.delete("/v1/feedback", params={"before": day}, headers=A).json()["deleted"] == 0
    assert c.delete("/v1/feedback", headers=A).json() == {"deleted": 2, "before": None, "total": 0}
    assert _feedback_ids(db_url, a) == [] and c.get("/v1/feedback", headers=B).json()["total"] == 1


def test_a_big_job_goes_in_chunks_and_a_deletion_cut_short_resumes(db_url: str):
    job = _job(db_url, 23)
    _score(db_url, job, fail=frozenset({3, 17}))
    first = lifecycle.delete_job(db_url, job_id=job, chunk=4, max_rows=30)  # a budget, as beat's purge has per tick
    assert first is not None and not first.complete
    assert first.results == 21 and first.item_errors == 2 and first.items == 7
    assert _rows(db_url, job) == {"items": 16, "results": 0, "item_errors": 0, "batches": 6, "jobs": 1}
    rest = lifecycle.delete_job(db_url, job_id=job, chunk=4)
    assert rest is not None and rest.complete and (rest.items, rest.batches) == (16, 6)
    assert _rows(db_url, job) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
    assert lifecycle.delete_job(db_url, job_id=job) is None


def test_a_worker_finishing_a_batch_of_a_deleted_job_writes_nothing(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    """Forced interleaving: the job is deleted while a worker scores one of its batches (between its take and its
    write). The worker's outcome writers find no job under its lock and drop the batch: no row comes back, no
    exception escapes (the old writers raised a foreign-key violation, and failed the task)."""
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine
    from rewardq.workers.messages import ScoreBatch
    from rewardq.workers.models.base import RewardModel, Scores

    job = _job(db_url, 4)
    with session_scope(db_url) as s:
        version = s.get(Job, job).model_version

    class DeletedWhileScoring(RewardModel):
        kind = "sim_exp"

        def score(self, prompts: Any, responses: Any) -> Scores:
            assert lifecycle.delete_job(db_url, job_id=job) is not None  # the API's DELETE, mid-batch
            n = len(prompts)  # item 1 cannot be scored: the error ledger's writer meets the deleted job too
            return Scores([1.0] * n, [[0.5]] * n, [False] * n, errors={1: ("invalid_input", "bad")})

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", f"test-lifecycle-unused-{RUN_ID}")
    get_settings.cache_clear()
    monkeypatch.setattr(engine, "get_model", lambda _version: DeletedWhileScoring())
    monkeypatch.setattr(engine, "feed_quietly", lambda: None)  # other tests' jobs stay out of this queue
    try:
        msg = ScoreBatch(job_id=job, batch_no=0, start_idx=0, model_version=version, prompts=["p0", "p1", "p2", "p3"],
                         responses=["r0", "r1", "r2", "r3"])  # fmt: skip
        assert engine.score_batch(msg) == 0
        assert _rows(db_url, job) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
        # Each writer on its own, after the deletion: a redelivered copy, a split copy.
        with session_scope(db_url) as s:
            assert repo.save_results(s, job_id=job, batch_no=0, start_idx=0, scores=[1.0], cos=[[0.5]],
                                     model_version=version) == 0  # fmt: skip
            assert repo.record_item_failure(s, job_id=job, batch_no=0, idx=0, code="x", message="m") is False
            assert repo.split_batch(s, job_id=job, batch_no=0) == []
        assert _rows(db_url, job) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
    finally:
        get_settings.cache_clear()


def test_rows_a_worker_commits_while_its_job_is_deleted_are_deleted_too(db_url: str):
    """Forced interleaving in two transactions: a worker has written a batch's results but not committed when the
    job is deleted. The deletion waits for the worker's commit (the job's row lock) and then deletes its rows."""
    from rewardq.storage.db import get_sessionmaker

    job = _job(db_url, 8)
    gone: list[lifecycle.JobDeletion | None] = []
    with get_sessionmaker(db_url)() as worker:
        version = worker.get(Job, job).model_version
        assert repo.save_results(worker, job_id=job, batch_no=1, start_idx=4, scores=[1.0] * 4, cos=[[0.5]] * 4,
                                 model_version=version) == 4  # fmt: skip
        deleter = threading.Thread(target=lambda: gone.append(lifecycle.delete_job(db_url, job_id=job)))
        deleter.start()
        deleter.join(1.0)
        assert deleter.is_alive(), "the deletion did not wait for the worker's uncommitted batch"
        worker.commit()
    deleter.join(30)
    assert gone and gone[0] is not None and gone[0].complete and (gone[0].results, gone[0].items) == (4, 8)
    assert _rows(db_url, job) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}


def _age_job(db_url: str, job_id: str, days: float) -> None:
    """Move the job's times ``days`` into the past (finished_at only if it has finished)."""
    past = datetime.now(timezone.utc) - timedelta(days=days)
    with session_scope(db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(created_at=past, started_at=past))
        s.execute(update(Job).where(Job.id == job_id, Job.finished_at.is_not(None)).values(finished_at=past))


def _status(db_url: str, job_id: str) -> str | None:
    with session_scope(db_url) as s:
        return repo.job_status(s, job_id=job_id)


def test_retention_purges_only_old_finished_jobs_and_old_feedback(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
):
    from rewardq.storage.settings import get_settings
    from rewardq.workers import retention

    tenant = f"lc-purge-{uuid.uuid4().hex[:8]}"
    old_done, recent_done, old_running, old_queued, old_cancelled = (_job(db_url, 6, tenant) for _ in range(5))
    _score(db_url, old_done, fail=frozenset({2}))
    _score(db_url, recent_done)
    with session_scope(db_url) as s:
        repo.mark_running(s, job_id=old_running)
        repo.cancel_job(s, job=s.get(Job, old_cancelled))
    for job in (old_done, old_running, old_queued, old_cancelled):
        _age_job(db_url, job, days=10)
    with session_scope(db_url) as s:
        trepo.add_feedback(s, tenant=tenant, rows=[{"kind": "rating", "prompt": f"p{i}", "response": "r",
                                                    "rating": 1.0} for i in range(5)])  # fmt: skip
    ids = _feedback_ids(db_url, tenant)
    _backdate_feedback(db_url, tenant, ids[:3], days=10)

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_RETENTION_DAYS", "0")
    get_settings.cache_clear()
    try:
        assert retention.purge_tick() == retention.EVERY_S  # 0: keep everything
        assert _status(db_url, old_done) == "succeeded" and len(_feedback_ids(db_url, tenant)) == 5
        with pytest.raises(ValueError):
            retention.purge(0)

        # A bounded tick: it stops at its row budget and says there is more; the next ones go on from there.
        first = retention.purge(1, max_rows=4)
        assert first.more and first.jobs == 0 and first.feedback == 3  # feedback has a budget of its own
        assert _status(db_url, old_done) == "succeeded"
        for _ in range(20):
            if not retention.purge(1, max_rows=4).more:
                break
        else:
            pytest.fail("the purge never caught up with its backlog")
    finally:
        get_settings.cache_clear()
    for job in (old_done, old_cancelled):
        assert _rows(db_url, job) == {"items": 0, "results": 0, "item_errors": 0, "batches": 0, "jobs": 0}
    assert _status(db_url, recent_done) == "succeeded" and _rows(db_url, recent_done)["results"] == 6
    # A job that has not ended stays, however old: the purge never touches live work.
    assert (_status(db_url, old_running), _status(db_url, old_queued)) == ("running", "queued")
    assert _rows(db_url, old_running)["items"] == 6
    assert _feedback_ids(db_url, tenant) == ids[3:]


def test_two_beats_purging_at_once_delete_each_row_once(db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch):
    from rewardq.storage.settings import get_settings
    from rewardq.workers import retention

    tenant = f"lc-beats-{uuid.uuid4().hex[:8]}"
    jobs = [_job(db_url, 30, tenant) for _ in range(3)]
    for job in jobs:
        _score(db_url, job)
        _age_job(db_url, job, days=10)
    with session_scope(db_url) as s:
        trepo.add_feedback(s, tenant=tenant, rows=[{"kind": "rating", "prompt": f"p{i}", "response": "r",
                                                    "rating": 1.0} for i in range(40)])  # fmt: skip
    _backdate_feedback(db_url, tenant, _feedback_ids(db_url, tenant), days=10)
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    get_settings.cache_clear()
    outcomes: list[Any] = []

    def beat() -> None:
        try:
            outcomes.append(retention.purge(1, max_rows=None))
        except Exception as exc:  # recorded, so the test names it
            outcomes.append(exc)

    try:
        beats = [threading.Thread(target=beat) for _ in range(2)]
        for t in beats:
            t.start()
        for t in beats:
            t.join(120)
    finally:
        get_settings.cache_clear()
    assert len(outcomes) == 2 and not [o for o in outcomes if isinstance(o, Exception)], outcomes
    mine = sum(o.items for o in outcomes)
    assert mine >= 90  # both together deleted every item once (and maybe other tests' expired rows)
    assert all(_rows(db_url, job)["jobs"] == 0 for job in jobs) and _feedback_ids(db_url, tenant) == []


def test_rewardq_purge_refuses_without_a_retention_unless_days_are_given(db_url: str, redis_url: str):
    """`rewardq purge`: operator-side, on the database; refused while the retention is 0 unless --days is given."""
    from click.testing import CliRunner

    from rewardq.cli import main
    from rewardq.storage.settings import get_settings

    old = _job(db_url, 3, f"lc-cli-{uuid.uuid4().hex[:8]}")
    _score(db_url, old)
    _age_job(db_url, old, days=10)
    env = {"REWARDQ_DATABASE_URL": db_url, "REWARDQ_RETENTION_DAYS": "0"}
    get_settings.cache_clear()
    try:
        refused = CliRunner().invoke(main, ["purge"], env=env)
        assert refused.exit_code == 2 and "--days" in refused.output and _rows(db_url, old)["jobs"] == 1
        done = CliRunner().invoke(main, ["purge", "--days", "7"], env=env)
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output
    assert '"days": 7.0' in done.output and '"jobs": ' in done.output and _rows(db_url, old)["jobs"] == 0


@pytest.mark.slow
def test_cli_deletes_jobs_and_feedback(db_url: str, redis_url: str, tmp_path: Path):
    from rewardq.api.procs import free_port, start_api
    from tests.conftest import worker_env
    from tests.test_cli import rewardq

    tenant = f"lc-cli-{uuid.uuid4().hex[:8]}"
    port = free_port()
    queue = f"test-lifecycle-cli-{RUN_ID}"
    api = start_api({**worker_env(db_url, queue), "REWARDQ_API_KEYS": f"{tenant}:{KEY_A}"}, tmp_path / "api.log", port)
    url = f"http://127.0.0.1:{port}"
    try:
        pairs = tmp_path / "p.jsonl"
        pairs.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}", "rating": {i}}}\n' for i in range(3)))
        job = rewardq("submit", str(pairs), url=url, key=KEY_A).stdout.strip()
        out = rewardq("jobs", "delete", job[:8], url=url, key=KEY_A)
        assert out.returncode == 0, out.stderr
        assert f"deleted job {job} (cancelled first): 3 items, 0 results, 0 failed items, 1 batches" in out.stdout
        assert _rows(db_url, job)["jobs"] == 0
        gone = rewardq("jobs", "delete", job, url=url, key=KEY_A)
        assert gone.returncode == 1 and "404" in gone.stderr and "Traceback" not in gone.stderr
        assert "no jobs" in rewardq("jobs", "--limit", "5", url=url, key=KEY_A).stderr  # still lists

        assert rewardq("feedback", "--url", url, str(pairs), key=KEY_A).returncode == 0  # `feedback FILE` still adds
        _backdate_feedback(db_url, tenant, _feedback_ids(db_url, tenant)[:1], days=10)
        day = (datetime.now(timezone.utc) - timedelta(days=5)).date().isoformat()
        out = rewardq("feedback", "delete", "--before", day, url=url, key=KEY_A)
        assert out.returncode == 0, out.stderr
        assert '"deleted": 1' in out.stdout and '"total": 2' in out.stdout
        out = rewardq("feedback", "delete", url=url, key=KEY_A)
        assert '"deleted": 2' in out.stdout and _feedback_ids(db_url, tenant) == []
        with redis.Redis.from_url(redis_url) as r:
            r.delete(queue)
    finally:
        api.stop()
