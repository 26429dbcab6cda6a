"""The FastAPI application factory: routers, error handlers, security headers, health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rewardq.api import ui
from rewardq.api.correlation import RequestIds, request_id
from rewardq.api.deps import check_auth_setup
from rewardq.api.errors import ApiError, FieldError
from rewardq.api.integrations import openrlhf, vllm
from rewardq.api.routes import feedback, jobs, models, ops, score, training
from rewardq.api.schemas import EnsembleCreate, JobCreate, ScoreRequest
from rewardq.storage.migrate import unmigrated
from rewardq.storage.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _field_error(err: dict[str, Any]) -> FieldError:
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    index = next((p for p in loc if isinstance(p, int)), None)
    names = [str(p) for p in loc if not isinstance(p, int)]
    return FieldError(names[-1] if names else "body", err.get("msg", "invalid"), index)


UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
# Swagger UI and ReDoc load from a CDN and run inline script: no CSP there rather than a loose one everywhere.
_NO_CSP = ("/docs", "/redoc", "/openapi.json")
_ALWAYS = (("x-content-type-options", "nosniff"), ("referrer-policy", "same-origin"), ("x-frame-options", "DENY"))


class SecurityHeaders:
    """Headers on every response: no MIME sniffing, no framing, no Referer to other origins, and a CSP (the
    dashboard's allows only its own files: no inline script or style). `same-origin`, not `no-referrer`: under
    no-referrer a browser sends `Origin: null` with the dashboard's own sign-in form, which its origin check
    refuses. A plain ASGI middleware: streamed bodies and long polls pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = UI_CSP if path == "/ui" or path.startswith("/ui/") else None if path.startswith(_NO_CSP) else API_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _ALWAYS:
                    headers.setdefault(name, value)
                if csp:
                    headers.setdefault("content-security-policy", csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# Routes that read their own body within their own limits (REWARDQ_MAX_JSON_BYTES, the upload caps), in chunks:
# jobs and feedback spool uploads of many MiB, the scoring routes take up to the interactive lane's pairs.
STREAMED_BODIES = frozenset(
    {"/v1/jobs", "/v1/feedback", "/v1/score", "/score", "/classify", "/v1/classify", "/pooling", "/v1/pooling",
     "/get_reward", "/openrlhf/get_reward"}
)  # fmt: skip
SMALL_BODY_BYTES = 1 << 20


class BodyLimit:
    """Every other route's body is read here first, up to SMALL_BODY_BYTES (1 MiB), and refused with 413 past it
    (at once when Content-Length says so). FastAPI would read a body of any size into memory before validating it,
    so one request to, say, POST /v1/training-runs could take the API's memory. Those bodies are a few hundred
    bytes. A new route is limited unless it reads its body itself and is named in STREAMED_BODIES."""

    def __init__(self, app: ASGIApp, limit: int = SMALL_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in STREAMED_BODIES:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, f"request body of {int(declared)} bytes exceeds the limit")
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send, "request body exceeds the limit")
                return
            messages.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        error = ApiError(413, f"{message} of {self.limit} bytes for {scope['path']}", [FieldError("body", "too large")])
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _settings_of(app: FastAPI) -> Settings:
    """The settings the app's routes see (a test may override them)."""
    return app.dependency_overrides.get(get_settings, get_settings)()  # type: ignore[no-any-return]


async def _pending(request: Request) -> str | None:
    """Why the app's database is not migrated ("run `rewardq db upgrade`"), or None."""
    return await run_in_threadpool(unmigrated, _settings_of(request.app).database_url)


def _retry_later(request: Request, detail: str) -> JSONResponse:
    rid = request_id(request.scope)
    return JSONResponse(
        {"detail": f"{detail} (request id {rid})", "errors": [], "request_id": rid},
        status_code=503,
        headers={"Retry-After": "5", "X-Request-ID": rid},
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = _settings_of(app)
    warning = check_auth_setup(settings)  # raises: the API does not start open by accident
    if warning:
        log.warning(warning)
    pending = await run_in_threadpool(unmigrated, settings.database_url)
    if pending:  # it starts all the same (/healthz says so too): the operator may migrate while it runs
        log.error("%s", pending)
    yield


def create_app() -> FastAPI:
    docs = get_settings().docs  # REWARDQ_DOCS=0: no /docs, /redoc or /openapi.json
    app = FastAPI(
        title="rewardq",
        version="0.1.0",
        description="Queue-based batch scoring and retraining for reward models.",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_error(dict(e)) for e in exc.errors()]
        first = errors[0] if errors else FieldError("body", "invalid")
        body = {"detail": f"{first.field}: {first.message}", "errors": [e.as_dict() for e in errors]}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        # The database is unreachable (restarting, failing over): a retryable 503, not a 500. What the driver said
        # (hosts, SQL) goes to the log only.
        rid = request_id(request.scope)
        log.warning("request %s %r: database unavailable (request id %s): %s", request.method, request.url.path,
                    rid, exc)  # fmt: skip
        # SQLite says "no such table" with the same error: a database never migrated is not a passing outage.
        return _retry_later(request, await _pending(request) or "database unavailable, retry shortly")

    @app.exception_handler(ProgrammingError)
    async def _no_tables(request: Request, exc: ProgrammingError) -> JSONResponse:
        # PostgreSQL says "relation does not exist" for a database never migrated: say what to do. Anything else is
        # an internal error.
        pending = await _pending(request)
        return _retry_later(request, pending) if pending else await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request.scope)  # (run by the outermost middleware: the scope still has it)
        log.error("request %s %r failed (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        body = {"detail": f"internal error: quote request id {rid} to the operator", "errors": [], "request_id": rid}
        # Sent by Starlette's outermost error middleware, past SecurityHeaders: its headers are added here.
        headers = {"X-Request-ID": rid, "Content-Security-Policy": API_CSP, **dict(_ALWAYS)}
        return JSONResponse(body, status_code=500, headers=headers)

    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(ui.LoginRequired, ui.login_redirect)  # type: ignore[arg-type]
    app.add_middleware(RequestIds)
    app.include_router(ops.router)
    app.include_router(jobs.router)
    app.include_router(feedback.router)
    for router in (training.runs, models.router, training.schedules):
        app.include_router(router)
    app.include_router(score.router)
    app.include_router(openrlhf.router)
    app.include_router(vllm.router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static, name="ui-static")
    _document_raw_bodies(app)
    return app


def _document_raw_bodies(app: FastAPI) -> None:
    """Routes that read their body themselves (to stream it, or to name a bad item's index) describe it with a
    $ref: put the referenced models into the OpenAPI components."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (JobCreate, ScoreRequest, EnsembleCreate):
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


app = create_app()
