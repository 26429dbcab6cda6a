"""The dashboard at /ui: HTML pages served by the API itself, drawing from the /v1 endpoints.

Pages are small shells; `static/app.js` fills them from /v1 (same keys, same tenant scoping) and
draws charts with the bundled Chart.js. Every aggregate a chart needs is computed in SQL, so a
million-item job loads as fast as a small one.

Sign-in (/ui/login) checks a key and makes a server-side session (`storage.ui_sessions`): the cookie holds
only a random id, whose hash is stored with the tenant and the hash of the key; it ends after
REWARDQ_UI_SESSION_HOURS, on sign-out, or when its key is revoked. The cookie is HttpOnly, SameSite=Strict,
Path=/, without Domain. Over https (behind a TLS proxy too, when uvicorn trusts its X-Forwarded-Proto) and
on a loopback host, which browsers treat as secure, it is `__Host-rewardq_session` with Secure; over plain
http to any other host a browser would drop a Secure cookie, so it is `rewardq_session` without Secure,
and sign-in logs a warning. Sign-in and sign-out refuse another origin (Origin, else Referer;
Sec-Fetch-Site: cross-site): no login CSRF. Changes made with the cookie need the dashboard's own request
header (see `api.deps`). Pages run no inline script or style: `api.main` sends a strict CSP.
"""

from __future__ import annotations

import html
import logging
import urllib.parse
from pathlib import Path
from string import Template
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from rewardq.api.deps import (
    DEFAULT_TENANT,
    SessionDep,
    SettingsDep,
    auth_required,
    caller_for_key,
    caller_for_session,
    note_failed_auth,
    read_body,
    request_key,
    session_token,
    stop_guessing,
    tenant_for_key,
    ui_cookie,
)
from rewardq.api.errors import ApiError
from rewardq.storage import keys, ui_sessions
from rewardq.storage import repository as repo
from rewardq.storage import training_repository as trepo
from rewardq.storage.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
_PAGE = Template((STATIC_DIR / "page.html").read_text())
_NAV = [("jobs", "Jobs"), ("models", "Models"), ("runs", "Training runs"), ("schedules", "Schedules")]
_MAX_LOGIN_BODY = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
log = logging.getLogger(__name__)
_PLAIN_HTTP = (
    "dashboard sign-in over plain http to %s: its session cookie cannot be Secure (serve the API over https, or "
    "behind a TLS proxy trusted through FORWARDED_ALLOW_IPS)"
)

router = APIRouter(prefix="/ui", include_in_schema=False)
static = StaticFiles(directory=STATIC_DIR)


class LoginRequired(Exception):
    """The page needs a key the request did not carry."""


def _tenant_or_none(request: Request, settings: Settings, session: Session) -> str | None:
    if not auth_required(settings, session):
        return DEFAULT_TENANT
    key = request_key(request)
    if not key:
        token = session_token(request)
        found = caller_for_session(settings, session, token) if token else None
        return found[0].tenant if found else None
    address = request.client.host if request.client else "unknown"
    stop_guessing(settings, address)  # pages check keys too: the same limit on guesses as the API and sign-in
    tenant = tenant_for_key(settings, session, key)
    if tenant is None:
        note_failed_auth(settings, address)
    return tenant


def _page_tenant(request: Request, settings: SettingsDep, session: SessionDep) -> str:
    tenant = _tenant_or_none(request, settings, session)
    if tenant is None:
        raise LoginRequired()
    return tenant


PageTenant = Annotated[str, Depends(_page_tenant)]


def _render(page: str, title: str, tenant: str | None, *, status: int = 200, body: str = "",
            data: dict[str, str] | None = None) -> HTMLResponse:  # fmt: skip
    nav = "".join(
        f'<a href="/ui/{key}"{" class=active" if page.startswith(key[:-1]) else ""}>{label}</a>' for key, label in _NAV
    )
    attrs = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in {"page": page, **(data or {})}.items())
    who = "" if tenant is None else (
        f'<span class="tenant">tenant <b>{html.escape(tenant)}</b></span>'
        + ('<form method="post" action="/ui/logout"><button class="link">sign out</button></form>'
           if tenant != DEFAULT_TENANT else "")
    )  # fmt: skip
    text = _PAGE.substitute(title=html.escape(title), nav=nav if tenant is not None else "", who=who, attrs=attrs,
                            body=body)  # fmt: skip
    return HTMLResponse(text, status_code=status, headers={"Cache-Control": "no-store"})


def _not_found(tenant: str, what: str) -> HTMLResponse:
    body = f'<h1>Not found</h1><p class="muted">{html.escape(what)} does not exist or belongs to another tenant.</p>'
    return _render("error", "Not found", tenant, status=404, body=body)


def login_redirect(request: Request, _: LoginRequired) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/ui/login?" + urllib.parse.urlencode({"next": target}), status_code=303)


def _safe_next(value: str | None) -> str:
    """Only ever redirect within the dashboard (no open redirect through ?next=)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/jobs"


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def cross_origin(request: Request) -> str | None:
    """Why a sign-in or sign-out form was posted from another origin, or None when it was not: the Origin header
    (else the Referer) must name this request's own scheme, host and port, and Sec-Fetch-Site must not say
    cross-site. A request with neither header (a script, curl) passes: it has no victim's browser behind it."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return "a cross-site request"
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return None
    if _origin(claimed) is None or _origin(claimed) != _origin(str(request.base_url)):
        return "another origin"
    return None


@router.get("")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=307)


@router.get("/login")
def login_page(request: Request, settings: SettingsDep, session: SessionDep, next: str | None = None) -> Response:
    if not auth_required(settings, session):
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_form(_safe_next(next))


def _login_form(next_url: str, error: str = "", status: int = 200) -> HTMLResponse:
    err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""<section class="login card"><h1>Sign in</h1>
<p class="muted">Paste an API key (from <code>REWARDQ_API_KEYS</code> or <code>rewardq keys create TENANT</code>).</p>
{err}<form method="post" action="/ui/login">
<input type="hidden" name="next" value="{html.escape(next_url)}">
<label>API key <input type="password" name="key" id="key" autocomplete="current-password" required autofocus></label>
<button type="submit">Sign in</button></form></section>"""
    return _render("login", "Sign in", None, status=status, body=body)


@router.post("/login")
async def login(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    refused = cross_origin(request)
    if refused:  # login CSRF: another site signing this browser in with the attacker's key
        return _login_form("/ui/jobs", f"Sign-in refused: {refused}.", 403)
    try:
        raw = await read_body(request, _MAX_LOGIN_BODY)
    except ApiError as exc:
        return _login_form("/ui/jobs", "request too large", exc.status)
    form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    next_url = _safe_next((form.get("next") or [""])[0])
    if not auth_required(settings, session):
        return RedirectResponse(next_url, status_code=303)
    address = request.client.host if request.client else "unknown"
    try:
        stop_guessing(settings, address)
    except ApiError as exc:
        return _login_form(next_url, "Too many failed sign-ins from this address; wait a minute.", exc.status)
    caller = caller_for_key(settings, session, key) if key else None
    if caller is None:
        note_failed_auth(settings, address)
        return _login_form(next_url, "That key is not valid.", 401)
    ui_sessions.purge_expired(session)
    if old := session_token(request):
        ui_sessions.delete_session(session, token=old)
    token = ui_sessions.create_session(session, tenant=caller.tenant, admin=caller.admin, key_hash=keys.hash_key(key),
                                       hours=settings.ui_session_hours)  # fmt: skip
    session.commit()
    name, secure = ui_cookie(request)
    if not secure:
        log.warning(_PLAIN_HTTP, request.url.hostname)
    resp = RedirectResponse(next_url, status_code=303)
    resp.set_cookie(name, token, max_age=int(settings.ui_session_hours * 3600), httponly=True, samesite="strict",
                    path="/", secure=secure)  # fmt: skip
    return resp


@router.post("/logout")
def logout(request: Request, session: SessionDep) -> Response:
    refused = cross_origin(request)
    if refused:
        body = f'<h1>Sign-out refused</h1><p class="muted">The request came from {html.escape(refused)}.</p>'
        return _render("error", "Sign-out refused", None, status=403, body=body)
    if token := session_token(request):
        ui_sessions.delete_session(session, token=token)
        session.commit()
    resp = RedirectResponse("/ui/login", status_code=303)
    name, secure = ui_cookie(request)
    resp.delete_cookie(name, path="/", secure=secure, httponly=True, samesite="strict")
    return resp


@router.get("/jobs")
def jobs_page(tenant: PageTenant) -> HTMLResponse:
    return _render("jobs", "Jobs", tenant)


@router.get("/jobs/{job_id}")
def job_page(job_id: str, tenant: PageTenant, session: SessionDep) -> HTMLResponse:
    # Checked here as well as by /v1: another tenant's job is a 404 page, not a shell that fails later.
    if repo.get_job(session, job_id=job_id, tenant=tenant) is None:
        return _not_found(tenant, f"Job {job_id}")
    return _render("job", f"Job {job_id}", tenant, data={"id": job_id})


@router.get("/models")
def models_page(tenant: PageTenant) -> HTMLResponse:
    return _render("models", "Models", tenant)


@router.get("/runs")
def runs_page(tenant: PageTenant) -> HTMLResponse:
    return _render("runs", "Training runs", tenant)


@router.get("/runs/{run_id}")
def run_page(run_id: str, tenant: PageTenant, session: SessionDep) -> HTMLResponse:
    if trepo.get_run(session, run_id=run_id, tenant=tenant) is None:
        return _not_found(tenant, f"Training run {run_id}")
    return _render("run", f"Training run {run_id}", tenant, data={"id": run_id})


@router.get("/schedules")
def schedules_page(tenant: PageTenant) -> HTMLResponse:
    return _render("schedules", "Schedules", tenant)
