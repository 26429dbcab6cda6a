"""The dashboard at /ui: HTML pages served by the API itself, drawing from the /v1 endpoints.

Pages are small shells; `static/app.js` fills them from /v1 (same keys, same tenant scoping) and
draws charts with the bundled Chart.js. Every aggregate a chart needs is computed in SQL, so a
million-item job loads as fast as a small one. A browser authenticates once on /ui/login: the
key goes into an HttpOnly, SameSite=Strict cookie, and changes made with the cookie need the
dashboard's own request header (see `api.deps`).
"""

from __future__ import annotations

import html
import urllib.parse
from pathlib import Path
from string import Template
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from api.deps import (
    DEFAULT_TENANT,
    UI_COOKIE,
    SessionDep,
    SettingsDep,
    auth_required,
    note_failed_auth,
    read_body,
    request_key,
    stop_guessing,
    tenant_for_key,
)
from api.errors import ApiError
from storage import repository as repo
from storage import training_repository as trepo
from storage.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
_PAGE = Template((STATIC_DIR / "page.html").read_text())
_NAV = [("jobs", "Jobs"), ("models", "Models"), ("runs", "Training runs"), ("schedules", "Schedules")]
_MAX_LOGIN_BODY = 4096
COOKIE_MAX_AGE_S = 12 * 3600

router = APIRouter(prefix="/ui", include_in_schema=False)
static = StaticFiles(directory=STATIC_DIR)


class LoginRequired(Exception):
    """The page needs a key the request did not carry."""


def _tenant_or_none(request: Request, settings: Settings, session: Session) -> str | None:
    if not auth_required(settings, session):
        return DEFAULT_TENANT
    token, _ = request_key(request)
    if not token:
        return None
    address = request.client.host if request.client else "unknown"
    stop_guessing(settings, address)  # pages check keys too: the same limit on guesses as the API and sign-in
    tenant = tenant_for_key(settings, session, token)
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
    if not key or tenant_for_key(settings, session, key) is None:
        note_failed_auth(settings, address)
        return _login_form(next_url, "That key is not valid.", 401)
    resp = RedirectResponse(next_url, status_code=303)
    resp.set_cookie(UI_COOKIE, key, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict", path="/",
                    secure=request.url.scheme == "https")  # fmt: skip
    return resp


@router.post("/logout")
def logout() -> Response:
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(UI_COOKIE, path="/")
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
