"""The FastAPI application factory: routers, error handlers, health."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from api import ui
from api.errors import ApiError, FieldError
from api.routes import feedback, jobs, ops, training


def _field_error(err: dict[str, Any]) -> FieldError:
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    index = next((p for p in loc if isinstance(p, int)), None)
    names = [str(p) for p in loc if not isinstance(p, int)]
    return FieldError(names[-1] if names else "body", err.get("msg", "invalid"), index)


def create_app() -> FastAPI:
    app = FastAPI(
        title="rewardq",
        version="0.1.0",
        description="Queue-based batch scoring and retraining for reward models.",
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
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        # The database is unreachable (restarting, failing over): a retryable 503, not a 500.
        return JSONResponse({"detail": "database unavailable, retry shortly", "errors": []}, status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip

    app.add_exception_handler(ui.LoginRequired, ui.login_redirect)  # type: ignore[arg-type]
    app.include_router(ops.router)
    app.include_router(jobs.router)
    app.include_router(feedback.router)
    for router in (training.runs, training.models, training.schedules):
        app.include_router(router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static, name="ui-static")
    return app


app = create_app()
