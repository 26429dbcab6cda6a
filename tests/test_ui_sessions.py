"""The dashboard's sign-in over HTTP: server-side sessions (the cookie never holds the key; sign-out, expiry and
revoking the key end them), the cookie's name and attributes (behind a TLS proxy too), the origin check on
sign-in and sign-out, and the security headers on every response."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from rewardq.api.procs import free_port, start_api
from rewardq.storage.clock import utcnow
from rewardq.storage.db import session_scope
from rewardq.storage.keys import create_key, hash_key
from rewardq.storage.models import ApiKey, UiSession
from rewardq.storage.settings import get_settings
from tests.conftest import make_client, migrated, worker_env
from tests.test_security import SECURE, _cli

ENV_KEY = "ui-env-key-0123456789abcdef0123456789"
HTTPS = "https://rewardq.example"
UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database without sessions: a fresh SQLite file, or the session's PostgreSQL database emptied of
    sessions (sessions compare times in SQL, by the database's clock)."""
    before = os.environ.get("REWARDQ_DATABASE_URL")
    if request.param == "sqlite":
        url = migrated(f"sqlite:///{tmp_path / 'ui.db'}")
    else:
        url = migrated(request.getfixturevalue("pg_url"))
        with session_scope(url) as s:
            s.execute(delete(UiSession))
    os.environ.pop("REWARDQ_DATABASE_URL")
    os.environ.update({"REWARDQ_DATABASE_URL": before} if before else {})
    get_settings.cache_clear()
    with session_scope(url) as s:
        keys_before = set(s.scalars(select(ApiKey.key_hash)))
    yield url
    # The PostgreSQL database is the session's: a key left there would make every later test's anonymous request a 401
    # (a stored key, even revoked, turns authentication on), in whatever order a process runs the files.
    with session_scope(url) as s:
        s.execute(delete(UiSession))
        s.execute(delete(ApiKey).where(ApiKey.key_hash.not_in(keys_before)))


def _client(db: str, base: str = HTTPS, api_keys: str = f"env:{ENV_KEY}", **extra: object) -> TestClient:
    app = make_client(db, "test-ui-sessions", api_keys=api_keys, **{**SECURE, **extra}).app
    return TestClient(app, base_url=base)


def _login(c: TestClient, key: str, **headers: str) -> httpx.Response:
    c.cookies.clear()  # a fresh browser: no earlier session to end
    return c.post("/ui/login", data={"key": key, "next": "/ui/jobs"}, headers=headers, follow_redirects=False)


def _cookie(resp: httpx.Response) -> tuple[str, str, dict[str, str]]:
    """The one Set-Cookie of a response: name, value and attributes (lower-case names)."""
    [raw] = resp.headers.get_list("set-cookie")
    first, *attrs = (p.strip() for p in raw.split(";"))
    name, _, value = first.partition("=")
    return name, value, {a.partition("=")[0].lower(): a.partition("=")[2] for a in attrs}


def _with(c: TestClient, name: str, value: str, path: str, method: str = "GET") -> httpx.Response:
    """A request carrying exactly this cookie (never the client's jar)."""
    c.cookies.clear()
    return c.request(method, path, headers={"Cookie": f"{name}={value}"}, follow_redirects=False)


def test_sign_in_makes_a_server_side_session_that_sign_out_ends(db: str) -> None:
    with session_scope(db) as s:
        key = create_key(s, tenant="acme", admin=True)
    with _client(db) as c:
        resp = _login(c, key)
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/jobs"
        name, token, attrs = _cookie(resp)
        # A __Host- cookie: Secure, Path=/, no Domain; and HttpOnly, SameSite=Strict. It holds a session id only.
        assert name == "__Host-rewardq_session"
        assert "secure" in attrs and attrs["path"] == "/" and "domain" not in attrs
        assert "httponly" in attrs and attrs["samesite"].lower() == "strict" and int(attrs["max-age"]) == 12 * 3600
        assert key not in resp.headers["set-cookie"] and len(token) >= 43
        with session_scope(db) as s:
            [row] = s.scalars(select(UiSession)).all()
            assert (row.tenant, row.admin, row.key_hash) == ("acme", True, hash_key(key))
            assert row.id_hash != token and token not in row.id_hash  # only a hash of the id is stored
        assert _with(c, name, token, "/v1/jobs").status_code == 200
        assert _with(c, name, token, "/ui/jobs").status_code == 200
        # Changes made with the cookie still need the dashboard's header.
        assert _with(c, name, token, "/v1/jobs/nope/cancel", "POST").status_code == 403
        # The key itself in the cookie is nothing.
        assert _with(c, name, key, "/v1/jobs").status_code == 401
        # Sign-out deletes the session: the old cookie, replayed, is refused by /v1 and sent to sign in by pages.
        c.cookies.clear()
        out = c.post("/ui/logout", headers={"Cookie": f"{name}={token}"}, follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        gone_name, gone_value, gone = _cookie(out)
        assert gone_name == name and not gone_value.strip('"') and "secure" in gone and gone["path"] == "/"
        with session_scope(db) as s:
            assert s.scalars(select(UiSession)).all() == []
        assert _with(c, name, token, "/v1/jobs").status_code == 401
        page = _with(c, name, token, "/ui/jobs")
        assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")


def test_an_expired_session_is_refused_and_purged(db: str) -> None:
    with _client(db, ui_session_hours=0.5) as c:
        name, token, attrs = _cookie(_login(c, ENV_KEY))
        assert int(attrs["max-age"]) == 1800
        with session_scope(db) as s:
            s.execute(update(UiSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert _with(c, name, token, "/v1/jobs").status_code == 401
        assert _with(c, name, token, "/ui/jobs").headers["location"].startswith("/ui/login")
        _login(c, ENV_KEY)  # the next sign-in purges expired sessions
        with session_scope(db) as s:
            assert len(s.scalars(select(UiSession)).all()) == 1


def test_revoking_its_key_ends_a_session(db: str) -> None:
    with session_scope(db) as s:
        key, other = create_key(s, tenant="acme"), create_key(s, tenant="acme")
    with _client(db) as c:
        made, kept = _cookie(_login(c, key)), _cookie(_login(c, other))
        env = _cookie(_login(c, ENV_KEY))
        assert _with(c, made[0], made[1], "/v1/jobs").status_code == 200
        code, out = _cli(db, "keys", "revoke", key[:10])
        assert code == 0, out
        assert _with(c, made[0], made[1], "/v1/jobs").status_code == 401
        assert _with(c, made[0], made[1], "/ui/jobs").status_code == 303
        assert _with(c, env[0], env[1], "/v1/jobs").status_code == 200
        # Revoked in SQL by hand, its sessions rows left: each lookup checks the key, so that ends them too.
        assert _with(c, kept[0], kept[1], "/v1/jobs").status_code == 200
        with session_scope(db) as s:
            s.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(other)).values(revoked_at=utcnow()))
        assert _with(c, kept[0], kept[1], "/v1/jobs").status_code == 401
    # A key taken out of REWARDQ_API_KEYS (or given to another tenant) ends its sessions as well.
    with _client(db, api_keys=f"other:{ENV_KEY[::-1]}") as c:
        assert _with(c, env[0], env[1], "/v1/jobs").status_code == 401
    with _client(db, api_keys=f"other:{ENV_KEY}") as c:
        assert _with(c, env[0], env[1], "/v1/jobs").status_code == 401


def test_sign_in_and_sign_out_from_another_origin_are_refused(db: str) -> None:
    with _client(db) as c:
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "http://rewardq.example"},  # another scheme
            {"Origin": "https://rewardq.example:8443"},  # another port
            {"Origin": "null"},
            {"Referer": "https://evil.example/login.html"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Origin": HTTPS, "Sec-Fetch-Site": "cross-site"},
        ):
            resp = _login(c, ENV_KEY, **headers)
            assert resp.status_code == 403, headers
            assert "set-cookie" not in resp.headers and "Sign-in refused" in resp.text
        with session_scope(db) as s:
            assert s.scalars(select(UiSession)).all() == []
        for headers in ({"Origin": HTTPS}, {"Origin": "https://REWARDQ.example:443"}, {"Referer": HTTPS + "/ui/login"},
                        {"Origin": HTTPS, "Sec-Fetch-Site": "same-origin"}, {}):  # fmt: skip
            assert _login(c, ENV_KEY, **headers).status_code == 303, headers
        name, token, _ = _cookie(_login(c, ENV_KEY, Origin=HTTPS))
        c.cookies.clear()
        cookie = {"Cookie": f"{name}={token}"}
        evil = c.post("/ui/logout", headers={**cookie, "Origin": "https://evil.example"}, follow_redirects=False)
        assert evil.status_code == 403 and "set-cookie" not in evil.headers
        assert _with(c, name, token, "/v1/jobs").status_code == 200  # not signed out
        own = c.post("/ui/logout", headers={**cookie, "Origin": HTTPS}, follow_redirects=False)
        assert own.status_code == 303 and _with(c, name, token, "/v1/jobs").status_code == 401


def test_the_cookie_is_secure_wherever_a_browser_keeps_it(db: str, caplog: pytest.LogCaptureFixture) -> None:
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with _client(db, base=base) as c:
            name, _, attrs = _cookie(_login(c, ENV_KEY))
            assert name == "__Host-rewardq_session" and "secure" in attrs, base
    # Plain http to another host: a Secure cookie would be dropped, so a plain one, and a warning.
    with caplog.at_level(logging.WARNING), _client(db, base="http://rewardq.internal:8000") as c:
        name, token, attrs = _cookie(_login(c, ENV_KEY))
        assert name == "rewardq_session" and "secure" not in attrs and attrs["path"] == "/"
        assert "cannot be Secure" in caplog.text
        assert _with(c, name, token, "/v1/jobs").status_code == 200
        assert _with(c, "__Host-rewardq_session", token, "/v1/jobs").status_code == 401  # read by one name only
    with _client(db) as c:  # nor is the plain cookie, set over http, taken over https
        assert _with(c, "rewardq_session", token, "/v1/jobs").status_code == 401


def test_behind_a_trusted_tls_proxy_the_cookie_is_secure(db: str, tmp_path: Path) -> None:
    """`rewardq api` as deployed: uvicorn trusts X-Forwarded-Proto from FORWARDED_ALLOW_IPS (127.0.0.1 here)."""
    env = worker_env(db, "test-ui-proxy", REWARDQ_API_KEYS=f"env:{ENV_KEY}", REWARDQ_ALLOW_ANONYMOUS="0")
    env.pop("FORWARDED_ALLOW_IPS", None)
    port = free_port()
    proc = start_api(env, tmp_path / "api.log", port)
    try:
        form = {"key": ENV_KEY, "next": "/ui/jobs"}
        host = {"Host": "rewardq.example"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            proxied = c.post("/ui/login", data=form, headers={**host, "X-Forwarded-Proto": "https", "Origin": HTTPS})
            name, token, attrs = _cookie(proxied)
            assert proxied.status_code == 303 and name == "__Host-rewardq_session" and "secure" in attrs
            assert c.get("/v1/jobs", headers={**host, "X-Forwarded-Proto": "https",
                                              "Cookie": f"{name}={token}"}).status_code == 200  # fmt: skip
            plain = c.post("/ui/login", data=form, headers=host)  # plain http through the same host name
            assert _cookie(plain)[0] == "rewardq_session" and "secure" not in _cookie(plain)[2]
    finally:
        proc.stop()


def test_security_headers_on_every_response(db: str) -> None:
    with session_scope(db) as s:
        key = create_key(s, tenant="acme")
    with _client(db) as c:
        name, token, _ = _cookie(_login(c, key))
        checks = {  # each path's own status: a page that vanished (404 everywhere) must fail this test
            "/ui/login": (200, UI_CSP),
            "/ui/jobs": (200, UI_CSP),
            "/ui/jobs/nope": (404, UI_CSP),
            "/ui/static/app.js": (200, UI_CSP),
            "/v1/jobs": (200, API_CSP),
            "/healthz": (200, API_CSP),
            "/docs": (200, None),  # Swagger UI: a CDN and inline script
            "/openapi.json": (200, None),
        }
        for path, (status, csp) in checks.items():
            resp = _with(c, name, token, path)
            assert resp.status_code == status, (path, resp.status_code)
            assert resp.headers.get("content-security-policy") == csp, path
            assert resp.headers["x-content-type-options"] == "nosniff", path
            assert resp.headers["x-frame-options"] == "DENY", path
            assert resp.headers["referrer-policy"] == "same-origin", path
            if path.startswith("/ui/") and "static" not in path:  # nothing inline that the CSP would block
                assert not re.search(r"\sstyle\s*=|<style|<script(?![^>]*\ssrc=)|\son\w+\s*=", resp.text), path
        refused = c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.headers["x-frame-options"] == "DENY"
        c.cookies.clear()
        to_login = c.get("/ui/jobs", follow_redirects=False)
        assert to_login.status_code == 303 and to_login.headers["content-security-policy"] == UI_CSP
