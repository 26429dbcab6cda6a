"""POST /v1/score: the interactive lane. A few hundred pairs, answered in the same response; bulk work never
delays it by more than one encoder pass (a bulk batch under way stops and goes back to the queue). Answer-only by
default; ``persist`` makes it a normal job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from rewardq.api.deps import SessionDep, SettingsDep, TenantDep, read_body
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.integrations import vllm
from rewardq.api.lane import check_items, lane_share, resolve_version, score_facts, score_pairs
from rewardq.api.parsing import check_metadata, loads
from rewardq.api.routes.jobs import wait_for_job
from rewardq.api.schemas import ErrorOut, ScoreOut, ScoreRow
from rewardq.storage import ledger, registry, results
from rewardq.storage import repository as repo
from rewardq.storage.models import FINISHED
from rewardq.storage.score_stats import place
from rewardq.storage.settings import Settings
from rewardq.workers.messages import build_messages, enqueue_score_batches

router = APIRouter(prefix="/v1/score", tags=["interactive"])

_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
    }
}


def _load(body: bytes) -> Any:
    try:
        return loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc


def _parse(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise invalid([FieldError("body", 'must be an object like {"items": [...]}')])
    unknown = set(doc) - {"items", "model_version", "persist", "metadata"}
    if unknown:
        raise invalid([FieldError(sorted(unknown)[0], "unknown field")])
    if "items" not in doc:
        raise invalid([FieldError("items", "field required")])
    if doc.get("model_version") is not None and not isinstance(doc["model_version"], str | dict):
        raise invalid([FieldError("model_version", "must be a version's id or name, or {version: weight, ...}")])
    if not isinstance(doc.get("persist", False), bool):
        raise invalid([FieldError("persist", "must be true or false")])
    return doc


@router.post(
    "",
    response_model=ScoreOut,
    openapi_extra=_DOC,
    responses={c: {"model": ErrorOut} for c in (413, 415, 422, 503, 504)},
)
async def score(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ScoreOut:
    """Score up to REWARDQ_INTERACTIVE_MAX_ITEMS pairs now: `{"items": [{prompt, response, id?}], "model_version"?,
    "persist"?}`. With `"persist": true` the pairs become a job (its id is returned) whose batches go through the
    interactive queue; the default writes nothing."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "use application/json", [FieldError("content-type", "unsupported")])
    raw = _load(await read_body(request, settings.max_json_bytes))
    if vllm.is_vllm_score(raw):  # vLLM's score body: answered in vLLM's shape, as POST /score does
        return JSONResponse(await vllm.score_doc(raw, session, settings, tenant))  # type: ignore[return-value]
    doc = _parse(raw)
    items = check_items(doc["items"], settings)
    version = await resolve_version(session, settings, tenant, doc.get("model_version"))
    if doc.get("persist"):
        # Within the same share as answer-only requests: persisted batches go onto the lane too.
        async with lane_share(settings, tenant, len(items)):
            return await _persisted(session, settings, tenant, version, items, doc.get("metadata") or {}, response)
    scored = await score_pairs(settings, tenant, version, [it.prompt for it in items], [it.response for it in items])
    stats, members = await run_in_threadpool(score_facts, session, settings, version)
    rows = []
    for i, (it, row) in enumerate(zip(items, scored.rows, strict=True)):
        z, pct = place(row["score"], stats)
        parts = registry.components_of(row.get("components"), members)
        rows.append(ScoreRow(index=i, id=it.item_id, score_z=z, percentile=pct, **{**row, "components": parts}))
    return ScoreOut(model_version=version, kind=scored.kind, results=rows)


async def _persisted(
    session: Session,
    settings: Settings,
    tenant: str,
    version: str,
    items: list[repo.NewItem],
    metadata: dict[str, Any],
    response: Response,
) -> ScoreOut:
    """A normal job whose batches skip the bulk queue; answered when it ends (202 with its id if it takes longer)."""
    metadata = check_metadata(metadata)

    def create() -> tuple[str, list[Any]]:
        job = repo.create_job(
            session,
            tenant=tenant,
            items=items,
            model_version=version,
            batch_size=settings.batch_size,
            metadata={**metadata, "lane": "interactive"},
        )
        batches = [repo.BatchRef(b.batch_no, b.start_idx, b.end_idx) for b in repo.job_batches(session, job_id=job.id)]
        for b in batches:  # claimed now, so the feeder never puts them on the bulk queue
            ledger.claim_requeue(session, job_id=job.id, batch_no=b.batch_no, seen=None)
        messages = build_messages(session, job_id=job.id, model_version=version, batches=batches)
        session.commit()
        return job.id, messages

    job_id, messages = await run_in_threadpool(create)
    try:
        await run_in_threadpool(enqueue_score_batches, messages, settings.interactive_queue)
    except Exception:  # the sweeper re-enqueues claimed batches nobody took: the job still completes
        pass

    await wait_for_job(session, settings, job_id, settings.interactive_timeout_s)

    def read() -> ScoreOut:
        job = repo.get_job(session, job_id=job_id)
        assert job is not None
        mv = registry.get_version(session, version=version)
        kind = mv.kind if mv is not None else ""
        if job.status not in FINISHED:
            response.status_code = 202
            return ScoreOut(model_version=version, kind=kind, results=[], job_id=job_id, status=job.status)
        stats, members = registry.score_stats(session, version=version), registry.members(session, version=version)
        rows, _ = results.results_page(session, job_id=job_id, sort="index", cursor=None, limit=len(items))
        by_idx = {r.idx: r for r, _ in rows}
        errors = {e.idx: e for e, _ in results.item_errors(session, job_id=job_id, limit=None)}
        out = []
        for i, it in enumerate(items):
            r, e = by_idx.get(i), errors.get(i)
            z, pct = place(r.score if r else None, stats)
            out.append(
                ScoreRow(
                    index=i,
                    id=it.item_id,
                    score=r.score if r else None,
                    score_z=z,
                    percentile=pct,
                    cos=r.cos if r else None,
                    truncated=bool(r and r.truncated),
                    n_tokens=r.n_tokens if r else None,
                    components=registry.components_of(r.components, members) if r else None,
                    error={"code": e.code, "message": e.message} if e else None,
                )
            )
        return ScoreOut(model_version=version, kind=kind, results=out, job_id=job_id, status=job.status)

    return await run_in_threadpool(read)
