"""Operations: liveness and Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select

from rewardq.api.deps import SessionDep, SettingsDep, caller_of
from rewardq.api.errors import ApiError
from rewardq.storage.migrate import unmigrated
from rewardq.storage.models import Job
from rewardq.workers import metrics

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(settings: SettingsDep) -> JSONResponse:
    """Liveness, and whether the database is migrated for this version (503 saying to run `rewardq db upgrade`)."""
    pending = unmigrated(settings.database_url)
    if pending:
        return JSONResponse({"status": "unmigrated", "detail": pending}, status_code=503)
    return JSONResponse({"status": "ok"})


def _line(name: str, kind: str, help_: str, value: float, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value:g}"]


def _scraper(request: Request, settings: SettingsDep, session: SessionDep) -> None:
    """/metrics counts every tenant's jobs: REWARDQ_METRICS_TOKEN (for a scraper) or an admin key only."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    token = settings.metrics_token
    if token and scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode()):
        return
    if not caller_of(request, settings, session).admin:
        raise ApiError(403, "/metrics needs an admin key or REWARDQ_METRICS_TOKEN")


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(_scraper)])
def prometheus(session: SessionDep, settings: SettingsDep) -> PlainTextResponse:
    """Prometheus text format: the workers' counters (summed over every worker, kept in Redis),
    queue depths and jobs by status. Needs an admin key, or REWARDQ_METRICS_TOKEN as a bearer token."""
    out: list[str] = []
    try:
        counted = metrics.read(settings.redis_url)
        depths = metrics.queue_depths(settings.redis_url, [settings.scoring_queue, settings.training_queue])
    except Exception:  # metrics must answer even with Redis down: say so instead
        counted, depths = {}, {}
        out += _line("rewardq_redis_up", "gauge", "whether Redis answered this scrape", 0)
    else:
        out += _line("rewardq_redis_up", "gauge", "whether Redis answered this scrape", 1)
    for name, help_ in metrics.COUNTERS.items():
        out += _line(f"rewardq_{name}_total", "counter", help_, counted.get(name, 0.0))
    padded = counted.get("padded_tokens", 0.0)
    out += _line("rewardq_padding_ratio", "gauge", "padding share of encoded tokens since start",
                 1 - counted.get("tokens", 0.0) / padded if padded else 0.0)  # fmt: skip
    batches = counted.get("encoder_batches", 0.0)
    out += _line("rewardq_tokens_per_batch", "gauge", "mean tokens per encoder pass since start",
                 padded / batches if batches else 0.0)  # fmt: skip
    out += ["# HELP rewardq_queue_depth messages waiting in a queue", "# TYPE rewardq_queue_depth gauge"]
    out += [f'rewardq_queue_depth{{queue="{q}"}} {n}' for q, n in depths.items()]
    out += ["# HELP rewardq_jobs jobs by status", "# TYPE rewardq_jobs gauge"]
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        out.append(f'rewardq_jobs{{status="{status}"}} {n}')
    return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")
