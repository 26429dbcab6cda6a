"""/v1/feedback: preferences and ratings that fine-tuning learns from."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from rewardq.api.deps import SessionDep, SettingsDep, TenantDep, read_body, request_content_type
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.ingest import JSON_LIMIT_HINT, ingest_feedback, receive
from rewardq.api.parsing import loads, validate_feedback
from rewardq.api.schemas import ErrorOut, FeedbackAdded, FeedbackDeleted, FeedbackStats
from rewardq.storage import lifecycle
from rewardq.storage import training_repository as trepo
from rewardq.storage.clock import as_utc
from rewardq.storage.settings import Settings

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])

_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}},
                "example": [
                    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                    {"prompt": "Capital of France?", "response": "Paris", "rating": 4.5},
                ],
            },
            "application/x-ndjson": {"schema": {"type": "string", "description": "one feedback object per line"}},
        },
    }
}


@router.post("", status_code=201, response_model=FeedbackAdded, openapi_extra=_DOC,
             responses={c: {"model": ErrorOut} for c in (413, 415, 422)})  # fmt: skip
async def add_feedback(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FeedbackAdded:
    """Add preferences `{prompt, chosen, rejected}` and ratings `{prompt, response, rating}` (any real scale)."""
    ctype = request_content_type(request)
    if ctype == "application/json":
        body = await read_body(request, settings.max_json_bytes, hint=JSON_LIMIT_HINT)
        upload = None
    else:  # ndjson: received (spooled) in full before any database work, then validated and written in chunks
        upload = await receive(request, settings, ctype)

    def store() -> FeedbackAdded:
        trepo.lock_feedback_quota(session, tenant=tenant)  # two uploads cannot both pass the quota
        have = trepo.feedback_stats(session, tenant=tenant)["total"]
        if upload is None:
            try:
                raw = loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc
            rows = validate_feedback(raw, max_items=settings.max_items_per_job, max_chars=settings.max_text_chars)
            _check_quota(settings, have, len(rows))
            trepo.add_feedback(session, tenant=tenant, rows=rows)
            added, prefs = len(rows), sum(r["kind"] == "preference" for r in rows)
        else:
            try:
                added, prefs = ingest_feedback(upload, session, settings, tenant=tenant)
            finally:
                upload.close()
            _check_quota(settings, have, added)  # over it: the transaction rolls back, nothing is kept
        session.commit()
        stats = trepo.feedback_stats(session, tenant=tenant)
        return FeedbackAdded(added=added, preferences=prefs, ratings=added - prefs, total=stats["total"])

    return await run_in_threadpool(store)


def _check_quota(settings: Settings, have: int, adding: int) -> None:
    if have + adding > settings.max_feedback_per_tenant:
        raise ApiError(
            403,
            f"feedback quota: {have} rows kept, {adding} more would pass the "
            f"{settings.max_feedback_per_tenant} allowed (REWARDQ_MAX_FEEDBACK_PER_TENANT); "
            "delete old feedback first (DELETE /v1/feedback, `rewardq feedback delete`)",
        )


@router.get("", response_model=FeedbackStats)
def feedback_stats(session: SessionDep, tenant: TenantDep) -> FeedbackStats:
    stats = trepo.feedback_stats(session, tenant=tenant)
    return FeedbackStats(total=stats["total"], preferences=stats["preferences"], ratings=stats["ratings"])


@router.delete("", response_model=FeedbackDeleted)
def delete_feedback(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    before: Annotated[
        datetime | None,
        Query(description="only rows created before this ISO 8601 date or time (UTC unless it names a zone)"),
    ] = None,
) -> FeedbackDeleted:
    """Delete your feedback, or only what was added before ``before``; returns how many rows went. A training run
    that has read its feedback already trains on what it read; models already made from it stay."""
    try:
        before = as_utc(before) if before is not None else None
    except OverflowError as exc:  # year 1 in a zone east of UTC: no such instant in UTC
        raise invalid([FieldError("before", "out of range")]) from exc
    deleted, _ = lifecycle.delete_feedback(settings.database_url, tenant=tenant, before=before)
    total = trepo.feedback_stats(session, tenant=tenant)["total"]
    return FeedbackDeleted(deleted=deleted, before=before, total=total)
