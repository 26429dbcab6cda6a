"""Secure by default: no start without keys unless anonymous use is allowed, keys of at least 32 characters, revoking
the last key never opens the API, requests limited per key (per address when anonymous) and failed
authentications per client address, by default."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from rewardq.cli import main
from rewardq.storage.db import session_scope
from rewardq.storage.keys import create_key
from rewardq.storage.settings import Settings, get_settings
from tests.conftest import Ledger, make_client, migrated

SECURE = {"allow_anonymous": False, "rate_limit_per_minute": 0, "auth_failures_per_minute": 0}


@pytest.fixture()
def fresh_db(tmp_path: Path) -> str:
    """A database with no key in it (the session's databases hold other tests' keys now and then)."""
    import os

    before = os.environ.get("REWARDQ_DATABASE_URL")
    url = migrated(f"sqlite:///{tmp_path / 'secure.db'}")
    os.environ.pop("REWARDQ_DATABASE_URL")
    os.environ.update({"REWARDQ_DATABASE_URL": before} if before else {})
    get_settings.cache_clear()
    return url


def _cli(db: str, *args: str, **env: str) -> tuple[int, str]:
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(main, list(args), env={"REWARDQ_DATABASE_URL": db, **env})
    finally:
        get_settings.cache_clear()
    return res.exit_code, res.output


def _wait_for_a_fresh_minute(needed_s: float) -> None:
    """Rate windows are calendar minutes: start a burst early enough in one that it ends there."""
    if time.time() % 60 > 60 - needed_s:
        time.sleep(60 - time.time() % 60 + 0.1)


def test_the_api_refuses_to_start_without_keys_unless_anonymous_use_is_allowed(
    fresh_db: str, caplog: pytest.LogCaptureFixture, ledger: Ledger
):
    with pytest.raises(RuntimeError, match="no API keys"), make_client(fresh_db, "test-secure", **SECURE):
        pass
    code, out = _cli(fresh_db, "api", REWARDQ_ALLOW_ANONYMOUS="0")
    assert code != 0 and "no API keys" in out and "REWARDQ_ALLOW_ANONYMOUS=1" in out
    with caplog.at_level(logging.WARNING), make_client(fresh_db, "test-secure", allow_anonymous=True) as c:
        assert c.get("/v1/jobs").status_code == 200
    assert "ANYONE WHO CAN REACH THIS API IS ITS ADMIN" in caplog.text
    # A key in REWARDQ_API_KEYS must be at least 32 characters; the refusal never prints it.
    code, out = _cli(fresh_db, "api", REWARDQ_ALLOW_ANONYMOUS="0", REWARDQ_API_KEYS="t:short-key-0123")
    assert code != 0 and "fewer than 32" in out and "short-key-0123" not in out
    backwards = "key-written-first-0123456789abcdef:tenant"  # the key where the tenant goes: still never printed
    code, out = _cli(fresh_db, "api", REWARDQ_ALLOW_ANONYMOUS="0", REWARDQ_API_KEYS=backwards)
    assert code != 0 and "entry 1" in out and "key-written-first" not in out
    outcome = "refuses to start, saying how to make a key (or allow anonymous use on loopback)"
    ledger.add("auth", "the API started with no key, then with a 16-character key", "SQLite", outcome)


def test_revoking_the_last_key_never_opens_the_api(fresh_db: str, ledger: Ledger):
    with session_scope(fresh_db) as s:
        key = create_key(s, tenant="solo")
    auth = {"Authorization": f"Bearer {key}"}
    for anonymous in (False, True):  # not even where anonymous use is allowed: a key was made, so keys are needed
        with make_client(fresh_db, "test-secure", **{**SECURE, "allow_anonymous": anonymous}) as c:
            if not anonymous:
                assert c.get("/v1/jobs", headers=auth).status_code == 200
                code, out = _cli(fresh_db, "keys", "revoke", key[:10])
                assert code == 0, out
                assert _cli(fresh_db, "keys", "revoke", key[:10])[0] != 0  # already revoked: says so
            assert c.get("/v1/jobs", headers=auth).status_code == 401
            assert c.get("/v1/jobs").status_code == 401
    code, out = _cli(fresh_db, "keys", "list")
    assert code == 0 and key[:10] in out and '"revoked_at": null' not in out
    outcome = "401 with it and without any key, anonymous use allowed or not"
    ledger.add("auth", "the last key revoked with `rewardq keys revoke`", "SQLite", outcome)


def test_requests_are_rate_limited_by_default(fresh_db: str, ledger: Ledger):
    default = Settings.model_fields["rate_limit_per_minute"].default
    assert default > 0
    key = f"rate-{uuid.uuid4().hex}"  # its own counter
    _wait_for_a_fresh_minute(30)
    with make_client(fresh_db, "test-secure", api_keys=f"t:{key}", **{**SECURE, "rate_limit_per_minute": default}) as c:
        auth = {"Authorization": f"Bearer {key}"}
        codes = [c.get("/v1/feedback", headers=auth).status_code for _ in range(default + 1)]
    assert codes[:default] == [200] * default and codes[default] == 429
    # Anonymous callers (allowed on loopback) are limited per client address.
    app = make_client(fresh_db, "test-secure", **{**SECURE, "allow_anonymous": True, "rate_limit_per_minute": 3}).app
    here, there = f"198.51.100.{uuid.uuid4().int % 250}", "203.0.113.9"
    with TestClient(app, client=(here, 1)) as c, TestClient(app, client=(there, 1)) as d:
        codes = [c.get("/v1/feedback").status_code for _ in range(4)]
        assert codes[:3] == [200] * 3 and codes[3] == 429 and d.get("/v1/feedback").status_code == 200
    what = f"{default + 1} requests in a minute on one key at the default limit"
    ledger.add("rate limit", what, "SQLite", "the last is 429; anonymous callers are limited per address")


def test_failed_authentications_are_limited_per_client_address(fresh_db: str, ledger: Ledger):
    default = Settings.model_fields["auth_failures_per_minute"].default
    assert default > 0
    key = "good-" + "k" * 32
    settings = {**SECURE, "auth_failures_per_minute": default}
    app = make_client(fresh_db, "test-secure", api_keys=f"t:{key}", **settings).app
    guesser, other = f"192.0.2.{uuid.uuid4().int % 250}", f"198.18.0.{uuid.uuid4().int % 250}"
    _wait_for_a_fresh_minute(20)
    with TestClient(app, client=(guesser, 1)) as c, TestClient(app, client=(other, 1)) as d:
        wrong = [c.get("/v1/jobs", headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(default)]
        assert wrong == [401] * default
        # Over the limit even the right key is refused from that address (a guess never learns it was right)...
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 429
        form = {"key": key, "next": "/ui/jobs"}
        assert c.post("/ui/login", data=form, follow_redirects=False).status_code == 429  # the dashboard's too
        assert c.get("/ui/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 429  # and its pages
        # ...while another address is served.
        assert d.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    what = f"{default} wrong keys in a minute from one address, then the right one"
    outcome = "401 each, then 429 for any key from that address (API and dashboard); other addresses served"
    ledger.add("auth", what, "SQLite", outcome)


def test_every_api_route_needs_a_key(fresh_db: str):
    """Each route of the API reference, walked from the app's OpenAPI schema (so a route added later is covered
    without a change here), answers 401 without a key and with a wrong one; only liveness is open."""
    import re

    with session_scope(fresh_db) as s:
        create_key(s, tenant="solo")
    with make_client(fresh_db, "test-secure", **SECURE) as c:
        paths = c.app.openapi()["paths"]
        assert {"/v1/jobs", "/v1/training-runs/defaults", "/v1/score", "/get_reward", "/metrics"} <= set(paths)
        checked = 0
        for path, methods in paths.items():
            if path == "/healthz":
                continue
            for method in methods:
                for headers in ({}, {"Authorization": "Bearer " + "x" * 40}):
                    url = re.sub(r"\{[^}]+\}", "abc123", path)
                    status = c.request(method.upper(), url, headers=headers, json={}).status_code
                    assert status == 401, (method, path, headers, status)
                    checked += 1
    assert checked >= 2 * 25


def test_every_body_fastapi_parses_is_limited_before_it_is_read(fresh_db: str, ledger: Ledger):
    """A route whose body FastAPI parses (training runs, schedules, imports, activation, sign-in, ...) took a body of
    any size into memory before validating it: a 1 MiB + 1 body is refused with 413, declared or chunked, on every
    such route (walked from the app, so a route added later is covered). The routes that read their own body in
    chunks are routes, and a small chunked body still reaches its route whole."""
    import re

    from rewardq.api.main import SMALL_BODY_BYTES, STREAMED_BODIES

    big = b"{" + b" " * SMALL_BODY_BYTES + b"}"
    with make_client(fresh_db, "test-secure", allow_anonymous=True) as c:
        paths = c.app.openapi()["paths"]
        routes = [(p, m.upper()) for p, methods in paths.items() for m in methods if m != "get"]
        routes += [("/ui/login", "POST"), ("/ui/logout", "POST")]  # the dashboard's forms (not in the API reference)
        assert STREAMED_BODIES <= {path for path, method in routes if method == "POST"}
        checked = 0
        for path, method in routes:
            if path in STREAMED_BODIES:
                continue
            url = re.sub(r"\{[^}]+\}", "abc123", path)
            for body in (big, iter([big[: len(big) // 2], big[len(big) // 2 :]])):
                resp = c.request(method, url, content=body, headers={"Content-Type": "application/json"})
                assert resp.status_code == 413, (method, path, resp.status_code, resp.text[:200])
                assert resp.json()["errors"] == [{"field": "body", "message": "too large"}]
                checked += 1
        assert checked >= 2 * 8
        small = iter([b'{"kind": ', b'"nope"}'])
        resp = c.post("/v1/training-runs", content=small, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422 and "kind" in resp.json()["detail"], resp.text
    ledger.add("input", "a 1 MiB + 1 body to every route whose body FastAPI parses, declared or chunked", "SQLite",
               "413 before it is read further")  # fmt: skip
