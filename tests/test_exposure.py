"""What a tenant can learn about the server: /metrics needs an admin key (or the scraper's token), the API reference
can be turned off, and failures answer generic messages with a request id or reference while the details (SQL, hosts,
paths) go to the logs only."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from rewardq.storage.settings import get_settings
from tests.conftest import make_client

SECRET_HOST = "db-primary.internal.example:5432"


@pytest.fixture()
def keyed(db_url: str, redis_url: str) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str], str]]:
    tenant, admin, token = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    keys = f"t-{tenant[:6]}:{tenant}{tenant},ops-{admin[:6]}:{admin}{admin}:admin"
    app = make_client(db_url, "test-exposure", api_keys=keys, metrics_token=token * 2).app
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, {"Authorization": f"Bearer {tenant}{tenant}"}, {"Authorization": f"Bearer {admin}{admin}"}, token * 2


def test_metrics_need_an_admin_key_or_the_scrapers_token(keyed):
    c, tenant, admin, token = keyed
    assert c.get("/metrics").status_code == 401
    refused = c.get("/metrics", headers=tenant)  # every tenant's job counts: not for a tenant
    assert refused.status_code == 403 and "rewardq_jobs" not in refused.text
    assert c.get("/metrics", headers={"Authorization": "Bearer " + "x" * 64}).status_code == 401
    for who in (admin, {"Authorization": f"Bearer {token}"}):
        resp = c.get("/metrics", headers=who)
        assert resp.status_code == 200 and "rewardq_jobs" in resp.text


def test_the_api_reference_can_be_turned_off(db_url: str, monkeypatch):
    with make_client(db_url, "test-exposure") as c:
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
    monkeypatch.setenv("REWARDQ_DOCS", "0")
    get_settings.cache_clear()
    try:
        with make_client(db_url, "test-exposure") as c:
            assert [c.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]
    finally:
        get_settings.cache_clear()


def test_failures_answer_a_request_id_and_keep_the_details_in_the_log(keyed, monkeypatch, caplog):
    from rewardq.storage import repository

    c, tenant, _, _ = keyed

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError(f"could not talk to {SECRET_HOST}: SELECT * FROM jobs")

    monkeypatch.setattr(repository, "list_jobs", broken)
    with caplog.at_level(logging.ERROR):
        resp = c.get("/v1/jobs", headers={**tenant, "X-Request-ID": "trace-0123456789"})
    assert resp.status_code == 500 and SECRET_HOST not in resp.text and "SELECT" not in resp.text
    assert resp.json()["request_id"] == resp.headers["x-request-id"] == "trace-0123456789"
    assert SECRET_HOST in caplog.text and "trace-0123456789" in caplog.text  # the operator finds it by the id
    assert resp.headers["x-content-type-options"] == "nosniff"  # the security headers, even on a 500

    def down(*_: object, **__: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception(f"connection to {SECRET_HOST} refused"))

    monkeypatch.setattr(repository, "list_jobs", down)
    resp = c.get("/v1/jobs", headers={**tenant, "X-Request-ID": "<script>alert(1)</script>"})
    assert resp.status_code == 503 and SECRET_HOST not in resp.text and resp.headers["retry-after"] == "5"
    rid = resp.headers["x-request-id"]
    assert "<" not in rid and rid in resp.json()["detail"]  # a caller's id that is not plain is replaced
    assert c.get("/v1/jobs/nope", headers=tenant).headers["x-request-id"]  # every response carries one


def test_worker_errors_name_a_reference_not_the_exception_text(caplog):
    from rewardq.workers.errors import InjectedFault, public_message

    log = logging.getLogger("test.exposure")
    with caplog.at_level(logging.ERROR):
        text = public_message(RuntimeError(f"psycopg: server {SECRET_HOST} closed the connection"), log, "item j/3")
    assert SECRET_HOST not in text and text.startswith("model_error: RuntimeError (ref ")
    ref = text.split("ref ")[1].split(":")[0]
    assert ref in caplog.text and SECRET_HOST in caplog.text
    # rewardq's own errors are written for the user and say what happened.
    assert public_message(InjectedFault("a text contains the marker"), log, "x") == (
        "InjectedFault: a text contains the marker"
    )


def test_base_model_never_shows_a_server_path(tmp_path: Path, stack):
    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from rewardq.workers.registry import resolve_encoder

    folder = tmp_path / "srv" / "my-encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_encoder(str(folder))[1] == "my-encoder"
    version = f"pathy-{uuid.uuid4().hex[:8]}"
    with session_scope(stack.db_url) as s:  # a row registered before paths were kept out of responses
        registry.register(
            s, version=version, kind="sim_exp", base_model="/srv/models/old-encoder", config={}, path=version
        )
    listed = {m["version"]: m for m in stack.client.get("/v1/models").json()["models"]}
    assert listed[version]["base_model"] == "old-encoder"
    assert all("/" not in m["base_model"] for m in listed.values())
