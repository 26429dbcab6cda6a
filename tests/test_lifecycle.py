"""Data lifecycle: DELETE /v1/jobs/{id} and /v1/feedback, tenant-scoped, in chunks, safe against a worker that is
mid-batch."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from storage import lifecycle, registry
from storage import repository as repo
from storage.db import session_scope
from storage.models import Batch, Feedback, Item, ItemError, Job, Result
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
    from workers.messages import QUEUED_BATCHES, batch_key

    return bool(redis.Redis.from_url(TEST_REDIS_URL).sismember(QUEUED_BATCHES, batch_key(job_id, batch_no)))


def test_delete_removes_the_job_and_every_row_it_holds(db_url: str, tenants: tuple[TestClient, str, str]):
    from workers.messages import QUEUED_BATCHES, batch_key

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
    from workers import events

    c, a, b = tenants
    job = c.post("/v1/jobs", json={"items": ITEMS}, headers=A).json()["job_id"]
    answer: list[int] = []
    with make_client(db_url, f"test-lifecycle-{RUN_ID}", api_keys=f"{a}:{KEY_A},{b}:{KEY_B}") as poller:
        waiter = threading.Thread(
            target=lambda: answer.append(poller.get(f"/v1/jobs/{job}?wait=30", headers=A).status_code)
        )
        waiter.start()
        from api.procs import wait_for

        wait_for(lambda: any(w.count for ws in events._waiters.values() for w in ws.values()), 10, "the long poll")
        assert c.delete(f"/v1/jobs/{job}", headers=A).status_code == 200
        waiter.join(20)
    assert answer == [404]  # not a 500 from a row that vanished under it, not the whole 30 s


def test_another_tenants_delete_is_404_and_deletes_nothing(db_url: str, tenants: tuple[TestClient, str, str]):
    from api.deps import UI_COOKIE, UI_HEADER

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
    c.cookies.set(UI_COOKIE, KEY_A)
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
    from storage.settings import get_settings
    from workers import engine
    from workers.messages import ScoreBatch
    from workers.models.base import RewardModel, Scores

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
    from storage.db import get_sessionmaker

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
