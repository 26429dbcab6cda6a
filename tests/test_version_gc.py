"""Fine-tuned versions nothing uses are collected (issue #37, item 10): rejected candidates and their files were kept
forever. Beat deletes a candidate its gate rejected REWARDQ_REJECTED_VERSION_DAYS after it was made, and a
tenant's versions past its newest REWARDQ_KEEP_VERSIONS, never one that is active anywhere or named by a job, with
its folder under REWARDQ_ARTIFACTS_DIR. Real SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from rewardq.storage import lifecycle
from rewardq.storage import repository as repo
from rewardq.storage.clock import utcnow
from rewardq.storage.db import session_scope
from rewardq.storage.models import ActiveVersion, ModelVersion, TrainingRun
from rewardq.storage.settings import Settings
from rewardq.workers.retention import collect_versions


def _version(db: str, artifacts: Path, tenant: str, status: str, age_days: float) -> str:
    """A fine-tuned version made by a run of ``tenant`` that ended ``status``, ``age_days`` ago, with its folder."""
    version, run_id = "ft-" + uuid.uuid4().hex[:12], uuid.uuid4().hex
    (artifacts / version).mkdir(parents=True)
    (artifacts / version / "heads.safetensors").write_bytes(b"x")
    made = utcnow() - timedelta(days=age_days)
    with session_scope(db) as s:
        s.add(ModelVersion(version=version, kind="sim_exp", owner=tenant, base_model="m", path=version, run_id=run_id,
                           created_at=made))  # fmt: skip
        s.add(TrainingRun(id=run_id, tenant=tenant, status=status, result_version=version, created_at=made))
    return version


def _exists(db: str, version: str) -> bool:
    with session_scope(db) as s:
        return s.get(ModelVersion, version) is not None


def _job_on(db: str, tenant: str, version: str) -> None:
    with session_scope(db) as s:
        repo.create_job(s, tenant=tenant, items=[repo.NewItem("0", "p", "r")], model_version=version, batch_size=1)


def test_rejected_candidates_nothing_uses_are_deleted_with_their_files(db_url: str, tmp_path: Path):
    tenant = f"gc-{uuid.uuid4().hex[:8]}"
    old_rejected = _version(db_url, tmp_path, tenant, "rejected", 10)
    new_rejected = _version(db_url, tmp_path, tenant, "rejected", 1)
    used = _version(db_url, tmp_path, tenant, "rejected", 10)
    active = _version(db_url, tmp_path, tenant, "rejected", 10)
    promoted = _version(db_url, tmp_path, tenant, "succeeded", 10)
    _job_on(db_url, tenant, used)
    with session_scope(db_url) as s:
        s.add(ActiveVersion(scope=tenant, version=active))
    settings = Settings(database_url=db_url, artifacts_dir=tmp_path, rejected_version_days=7, keep_versions=0)

    assert collect_versions(settings) == [old_rejected]
    assert not _exists(db_url, old_rejected) and not (tmp_path / old_rejected).exists()
    for kept in (new_rejected, used, active, promoted):
        assert _exists(db_url, kept) and (tmp_path / kept).is_dir(), kept
    assert collect_versions(settings) == []  # nothing more
    assert collect_versions(Settings(database_url=db_url, artifacts_dir=tmp_path, rejected_version_days=0)) == []


def test_a_version_taken_up_between_the_pick_and_the_delete_stays(db_url: str, tmp_path: Path):
    """Forced: the collector picks a rejected candidate, then a job names it, then the delete runs: it must not
    go (the delete re-checks in its own statement, and the foreign key backs it)."""
    tenant = f"gc-{uuid.uuid4().hex[:8]}"
    version = _version(db_url, tmp_path, tenant, "rejected", 10)
    cutoff = utcnow() - timedelta(days=7)
    with session_scope(db_url) as s:
        picks = lifecycle.collectable_versions(s, rejected_before=cutoff, keep_newest=0)
    assert (version, version) in picks
    _job_on(db_url, tenant, version)
    with session_scope(db_url) as s:
        assert not lifecycle.delete_version(s, version=version)
    assert _exists(db_url, version)


def test_keep_versions_keeps_each_tenants_newest(tmp_path: Path):
    from rewardq.storage.migrate import upgrade

    db = f"sqlite:///{tmp_path / 'gc.db'}"  # a database of its own: this collects every tenant's older versions
    upgrade(db)
    artifacts = tmp_path / "artifacts"
    a = [_version(db, artifacts, "a", "succeeded", age) for age in (30, 20, 10, 1)]  # oldest first
    b = [_version(db, artifacts, "b", "succeeded", age) for age in (5, 2)]
    _job_on(db, "a", a[0])  # the oldest is still named by a job
    settings = Settings(database_url=db, artifacts_dir=artifacts, rejected_version_days=0, keep_versions=2)

    assert sorted(collect_versions(settings)) == sorted([a[1]])
    assert [_exists(db, v) for v in a + b] == [True, False, True, True, True, True]
    assert sorted(p.name for p in artifacts.iterdir()) == sorted([a[0], a[2], a[3], *b])
