"""Bounded training: one queued or running run per tenant (even when two requests race), a cap on a run's steps,
schedules at most every 5 minutes and per-tenant quotas of schedules and feedback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

from rewardq.storage import training_repository as trepo
from rewardq.storage.clock import as_utc
from rewardq.storage.db import get_sessionmaker, session_scope
from rewardq.storage.models import Schedule, TrainingRun, db_now
from rewardq.storage.settings import get_settings
from tests.conftest import make_client

RATINGS = [{"prompt": f"question {i}", "response": f"answer {i}", "rating": float(i % 5)} for i in range(40)]


@pytest.fixture()
def tenant_client(db_url: str, redis_url: str) -> Iterator[tuple[TestClient, str]]:
    """A client with a key of its own tenant (nothing else in the shared database is that tenant's)."""
    tenant, key = f"q-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex + uuid.uuid4().hex
    limits = {"max_train_steps": 100, "max_feedback_per_tenant": 50, "max_schedules_per_tenant": 2}
    with make_client(db_url, f"test-quota-{tenant}", api_keys=f"{tenant}:{key}", **limits) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c, tenant
    # Nothing of this tenant may fire or be swept in a later test: its schedules go, its open runs end.
    with session_scope(db_url) as s:
        s.query(Schedule).filter_by(tenant=tenant).delete()
        s.query(TrainingRun).filter_by(tenant=tenant).filter(TrainingRun.status.in_(("queued", "running"))).update(
            {"status": "failed"}
        )


def test_a_tenant_has_one_open_run_and_each_run_is_capped_in_steps(tenant_client: tuple[TestClient, str], db_url: str):
    c, tenant = tenant_client
    assert c.post("/v1/feedback", json=RATINGS).status_code == 201
    # 40 rows, 36 trained on: 100 epochs of batches of 2 would be 1,800 steps, over the 100 allowed.
    big = c.post("/v1/training-runs", json={"epochs": 100, "batch_size": 2})
    assert big.status_code == 422 and big.json()["errors"][0]["field"] == "epochs"
    assert "REWARDQ_MAX_TRAIN_STEPS" in big.json()["detail"]
    bad = c.post("/v1/training-runs", json={"epochs": 1, "max_grad_norm": -1})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "max_grad_norm"
    first = c.post("/v1/training-runs", json={"epochs": 1, "objective": "cosent_cos"})
    assert first.status_code == 202, first.text
    assert first.json()["params"]["max_grad_norm"] == 1.0  # the similarity objectives' default, shown resolved
    second = c.post("/v1/training-runs", json={"epochs": 1})
    assert second.status_code == 409 and first.json()["run_id"] in second.json()["detail"]
    with session_scope(db_url) as s:
        s.query(TrainingRun).filter_by(tenant=tenant).update({"status": "rejected"})
    assert c.post("/v1/training-runs", json={"epochs": 1}).status_code == 202  # the last one ended: a new one


def test_two_racing_run_requests_make_one_run(db_url: str):
    """Forced interleaving: both requests see no open run, then both insert. The unique index of open runs lets one
    in; the API answers the other 409 (its IntegrityError branch)."""
    tenant = f"race-{uuid.uuid4().hex[:8]}"
    make = get_sessionmaker(db_url)
    with make() as a, make() as b:
        assert trepo.open_run_of_tenant(a, tenant=tenant) is None
        assert trepo.open_run_of_tenant(b, tenant=tenant) is None
        trepo.create_run(a, tenant=tenant, params={})
        a.commit()
        with pytest.raises(IntegrityError):
            trepo.create_run(b, tenant=tenant, params={})
            b.commit()
        b.rollback()
    with make() as s:
        assert s.query(TrainingRun).filter_by(tenant=tenant).count() == 1


def test_a_run_that_grew_past_the_step_cap_fails_in_the_worker(db_url: str, monkeypatch):
    """A scheduled run (or one whose feedback grew after it was accepted) is checked again when it starts."""
    from rewardq.workers.runs import execute_run

    tenant = f"steps-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_MAX_TRAIN_STEPS", "10")
    get_settings.cache_clear()
    try:
        with session_scope(db_url) as s:
            rows = [{"kind": "rating", **r} for r in RATINGS]
            trepo.add_feedback(s, tenant=tenant, rows=rows)
            run_id = trepo.create_run(s, tenant=tenant, params={"epochs": 5, "batch_size": 8}).id
        assert execute_run(run_id) == "failed"
        with session_scope(db_url) as s:
            error = s.get(TrainingRun, run_id).error
        assert "REWARDQ_MAX_TRAIN_STEPS" in error and "25 steps" in error  # 5 epochs x 5 batches of 8 (36 rows)
    finally:
        get_settings.cache_clear()


def test_feedback_and_schedules_have_quotas_and_schedules_a_minimum_interval(tenant_client: tuple[TestClient, str]):
    c, _ = tenant_client
    assert c.post("/v1/feedback", json=RATINGS).status_code == 201
    over = c.post("/v1/feedback", json=RATINGS[:11])  # 40 + 11 > 50
    assert over.status_code == 403 and "REWARDQ_MAX_FEEDBACK_PER_TENANT" in over.json()["detail"]
    assert c.get("/v1/feedback").json()["total"] == 40  # nothing of the refused post was kept
    assert c.post("/v1/feedback", json=RATINGS[:10]).status_code == 201  # up to the quota exactly

    for expr in ("* * * * *", "0,1 * * * *", "* * * * * */30"):
        resp = c.post("/v1/schedules", json={"cron": expr})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "cron", expr
    assert c.post("/v1/schedules", json={"cron": "*/5 * * * *"}).status_code == 201
    assert c.post("/v1/schedules", json={"cron": "0 3 * * *"}).status_code == 201
    third = c.post("/v1/schedules", json={"cron": "0 4 * * *"})
    assert third.status_code == 403 and "REWARDQ_MAX_SCHEDULES_PER_TENANT" in third.json()["detail"]


def test_beat_holds_an_older_schedule_to_the_minimum_interval(db_url: str, monkeypatch):
    """A schedule stored before the limit existed (every second) fires at most every REWARDQ_MIN_SCHEDULE_INTERVAL_S."""
    from rewardq.workers.schedule import fire_due_schedules

    tenant = f"old-{uuid.uuid4().hex[:8]}"
    with session_scope(db_url) as s:
        now = db_now(s)
        sched = trepo.create_schedule(s, tenant=tenant, cron="* * * * * *", min_new_feedback=10**9, params={},
                                      next_run_at=now - timedelta(seconds=1))  # fmt: skip
        sched_id, slot = sched.id, sched.next_run_at
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        fire_due_schedules(now=now)
    finally:
        get_settings.cache_clear()
    with session_scope(db_url) as s:
        nxt = s.get(Schedule, sched_id).next_run_at
        s.delete(s.get(Schedule, sched_id))
    assert (as_utc(nxt) - as_utc(slot)).total_seconds() >= get_settings().min_schedule_interval_s == 300


@pytest.mark.parametrize("kind", ["sim_exp", "classifier"])
def test_the_listed_defaults_are_what_a_run_without_parameters_uses(tenant_client: tuple[TestClient, str], kind: str):
    c, _ = tenant_client
    kinds = c.get("/v1/training-runs/defaults").json()["kinds"]
    assert set(kinds) == {"sim_exp", "classifier"} and kinds["classifier"]["epochs"] != kinds["sim_exp"]["epochs"]
    assert c.post("/v1/feedback", json=RATINGS).status_code == 201
    run = c.post("/v1/training-runs", json={"kind": kind})
    assert run.status_code == 202, run.text
    stored = run.json()["params"]
    assert {k: stored[k] for k in kinds[kind]} == kinds[kind]
