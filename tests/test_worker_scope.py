"""A worker that cannot load its model is at fault, not the work: at start it exits saying why; mid-run its batches go
back to the queue, never split nor failed, and the job finishes once a worker that can load the model runs. And the
user is told what is wrong instead of waiting: work on a queue no live worker consumes says so, and an API on an
unmigrated database says to run `rewardq db upgrade`. Real worker processes, Redis and SQLite."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rewardq.api.procs import Proc, free_port, start_worker, wait_for
from tests.conftest import RUN_ID, TEST_PG_ADMIN_URL, make_client, migrated, worker_env
from tests.support import need, wait_job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _encoders(tmp: Path) -> tuple[Path, Path]:
    """A copy of the bundled encoder, and one whose weights are garbage of the same size (the same version id: its
    id hashes the config, the tokenizer and the weights' sizes), which no worker can load."""
    from rewardq.workers.registry import base_version_id, default_encoder_path

    good, broken = tmp / "encoder", tmp / "broken-encoder"
    shutil.copytree(default_encoder_path(), good)
    shutil.copytree(good, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\0" * weights.stat().st_size)
    assert base_version_id(str(good)) == base_version_id(str(broken))
    return good, broken


def _job_db(tmp: Path, encoder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("REWARDQ_MODEL", str(encoder))
    return migrated(f"sqlite:///{tmp / 'rq.db'}")


def test_a_worker_that_cannot_load_the_model_exits_saying_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good, broken = _encoders(tmp_path)
    db = _job_db(tmp_path, good, monkeypatch)
    queue = f"test-noload-{RUN_ID}"
    env = worker_env(db, queue, REWARDQ_MODEL=str(broken))
    out = subprocess.run(
        [sys.executable, "-m", "rewardq", "worker", "-Q", queue], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode != 0
    assert "this worker cannot load model base-" in out.stderr and "It takes no work" in out.stderr, out.stderr[-2000:]
    assert "consuming" not in out.stderr  # it stopped before taking any work


def test_batches_a_worker_cannot_load_go_back_and_a_good_worker_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope

    good, broken = _encoders(tmp_path)
    db = _job_db(tmp_path, good, monkeypatch)
    queue = f"test-midrun-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    # Preflight off: the worker starts with a model it cannot load (a folder broken after it started, a GPU full).
    bad_env = worker_env(db, queue, REWARDQ_MODEL=str(broken), REWARDQ_WORKER_PREFLIGHT="0")
    bad = start_worker(bad_env, tmp_path / "bad.log", queues=f"{queue},{queue}-interactive")
    good_worker = None
    try:
        with make_client(db, queue, interactive_timeout_s=120.0) as c:
            items = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]
            job_id = c.post("/v1/jobs", json={"items": items}).json()["job_id"]
            wait_for(lambda: "cannot be loaded" in bad.tail(200), 120, "the bad worker's first try", bad.popen)
            time.sleep(5)  # a few more tries, with backoff
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running") and job["progress"]["failed"] == 0, job
            with session_scope(db) as s:
                assert len(repo.job_batches(s, job_id=job_id)) == 1  # never split
            # An interactive request the bad worker takes first: it hands the part back rather than answer 503.
            asked: dict[str, Any] = {}
            pairs = {"items": [{"prompt": "now?", "response": "yes"}]}
            ask = threading.Thread(target=lambda: asked.update(resp=c.post("/v1/score", json=pairs)))
            ask.start()
            wait_for(lambda: "score_interactive" in bad.tail(50) and "retry" in bad.tail(50), 60,
                     "the bad worker handing the interactive part back", bad.popen)  # fmt: skip
            queues = f"{queue},{queue}-interactive"
            good_worker = start_worker(worker_env(db, queue, REWARDQ_MODEL=str(good)), tmp_path / "good.log", queues)
            job = wait_job(c, job_id, timeout=240)
            ask.join(120)
        assert asked["resp"].status_code == 200, asked["resp"].text
        assert asked["resp"].json()["results"][0]["score"] > 0
        assert job["status"] == "succeeded", job
        assert (job["progress"]["done"], job["progress"]["failed"], job["progress"]["total"]) == (20, 0, 20), job
    finally:
        for w in (bad, good_worker):
            if w is not None:
                w.stop()
        print("--- bad worker ---\n" + bad.tail(20))


def test_work_on_a_queue_no_worker_consumes_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good, _ = _encoders(tmp_path)
    db = _job_db(tmp_path, good, monkeypatch)
    queue = f"test-nobody-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    with make_client(db, queue) as c:
        job_id = c.post("/v1/jobs", json={"items": [{"prompt": "p", "response": "r"}]}).json()["job_id"]
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert f"no live worker consumes queue {queue!r}" in job["notice"] and "rewardq worker" in job["notice"]
        worker = start_worker(worker_env(db, queue, REWARDQ_MODEL=str(good)), tmp_path / "w.log", queue)
        try:
            job = wait_job(c, job_id, timeout=240)
            assert job["status"] == "succeeded" and job.get("notice") is None
            queued = c.post("/v1/jobs", json={"items": [{"prompt": "p2", "response": "r2"}]}).json()["job_id"]
            assert c.get(f"/v1/jobs/{queued}").json().get("notice") is None  # a live worker consumes it
        finally:
            worker.stop()
        # A training run on a training queue nobody consumes (the worker above consumed the scoring queue only).
        feedback = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
        assert c.post("/v1/feedback", json=feedback).status_code == 201
        run = c.post("/v1/training-runs", json={"train_layers": 0}).json()
        notice = c.get(f"/v1/training-runs/{run['run_id']}").json()["notice"]
        assert f"no live worker consumes queue '{queue}-training'" in notice and "rewardq worker" in notice


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables: a new SQLite file, or a new PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'new.db'}"
        return
    import psycopg

    try:
        admin = psycopg.connect(TEST_PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error:
        need(False, f"PostgreSQL at {TEST_PG_ADMIN_URL}")
        raise
    name = f"rewardq_empty_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{TEST_PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_an_api_on_an_unmigrated_database_says_to_run_db_upgrade(empty_db: str, tmp_path: Path):
    port = free_port()
    env = worker_env(empty_db, f"test-unmigrated-{RUN_ID}")
    api = Proc("api", [sys.executable, "-m", "rewardq", "api", "--port", str(port)], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 503
            except httpx.HTTPError:
                return False

        wait_for(answers, 60, "api", api.popen)
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "unmigrated" and "run `rewardq db upgrade`" in health["detail"]
        jobs = httpx.get(f"{url}/v1/jobs")  # SQLite: "no such table"; PostgreSQL: "relation does not exist"
        assert jobs.status_code == 503 and "run `rewardq db upgrade`" in jobs.json()["detail"], jobs.text
        assert "run `rewardq db upgrade`" in api.tail(50)  # said at start, in its log
        subprocess.run([sys.executable, "-m", "rewardq", "db", "upgrade"], env=env, check=True, capture_output=True)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    finally:
        api.stop()
