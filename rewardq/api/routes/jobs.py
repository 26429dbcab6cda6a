"""/v1/jobs: create scoring jobs, follow them, cancel them, read their results."""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import ObjectDeletedError

from rewardq.api import exports
from rewardq.api.correlation import request_id
from rewardq.api.deps import SessionDep, SettingsDep, TenantDep, full_id, read_body, request_content_type
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.ingest import JSON_LIMIT_HINT, ingest_ndjson, receive
from rewardq.api.parsing import NDJSON_TYPES, parse_json_job
from rewardq.api.schemas import (
    DeletedRows,
    ErrorOut,
    FailedItem,
    Histogram,
    JobCreated,
    JobDeleted,
    JobList,
    JobOut,
    Progress,
    ResultOut,
    ResultPage,
    ScoreSummary,
)
from rewardq.storage import lifecycle, registry, results
from rewardq.storage import repository as repo
from rewardq.storage.clock import as_utc, utcnow
from rewardq.storage.models import FINISHED, Job
from rewardq.storage.settings import Settings
from rewardq.workers import events, liveness
from rewardq.workers.feeder import feed
from rewardq.workers.messages import forget_batches

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_CREATE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "application/x-ndjson": {
                "schema": {
                    "type": "string",
                    "description": "one item object per line: {id?, prompt, response}",
                }
            },
        },
    }
}


def _job_detail(session: Session, job: Job, summary: bool = True) -> JobOut:
    """A job with its score summary (unless ``summary`` is false) and its error ledger (GET /v1/jobs/{id}).

    The summary reads every result of the job (a third of a second for a million on SQLite), so
    whatever polls a running job asks without it and fetches it once at the end; a succeeded job's is stored the
    first time, and read from its row after.
    """
    counts = _counts(session, [job])[job.id]
    out = _job_out(job, counts, results.job_summary(session, job) if summary else None)
    out.scored_with = repo.scored_with(session, job_id=job.id)
    if counts.failed:
        out.error_counts = results.error_counts(session, job_id=job.id)
        out.failed_items = [
            FailedItem(index=e.idx, id=it.item_id, code=e.code, message=e.message)
            for e, it in results.item_errors(session, job_id=job.id, limit=100)
        ]
    session.commit()  # a summary stored now
    return out


def _counts(session: Session, jobs: list[Job]) -> dict[str, repo.Counts]:
    """Each job's progress: its row's counts and its progress rows' (repository.job_counts), one query for all."""
    counts = {j.id: repo.Counts(j.n_done, j.n_failed, j.cache_hits, j.cache_misses) for j in jobs}
    counts.update(repo.job_counts(session, job_ids=[j.id for j in jobs]))  # a job deleted meanwhile: its row's
    return counts


def _job_out(job: Job, counts: repo.Counts, summary: dict[str, Any] | None = None) -> JobOut:
    end = as_utc(job.finished_at or utcnow())
    elapsed = None
    if job.started_at is not None:
        elapsed = max((end - as_utc(job.started_at)).total_seconds(), 0.0)
    return JobOut(
        job_id=job.id,
        status=job.status,
        model_version=job.model_version,
        progress=Progress(
            done=counts.done,
            failed=counts.failed,
            total=job.n_items,
            fraction=(counts.done + counts.failed) / job.n_items if job.n_items else 1.0,
        ),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        elapsed_s=elapsed,
        pairs_per_s=(counts.done / elapsed) if elapsed else None,
        metadata=job.meta,
        error=job.error,
        embed_cache_hits=counts.cache_hits,
        embed_cache_misses=counts.cache_misses,
        summary=ScoreSummary(**summary) if summary is not None else None,
    )


def _load_job(session: Session, job_id: str, tenant: str) -> Job:
    """The tenant's job by its id, or by the first 8 or more characters of it when they match one job only."""
    job = repo.get_job(session, job_id=job_id, tenant=tenant)
    if job is None:
        job = repo.get_job(session, job_id=full_id(session, Job, job_id, tenant=tenant, noun="job"), tenant=tenant)
    if job is None:
        raise ApiError(404, f"job {job_id!r} not found", [FieldError("job_id", "not found")])
    return job


def pinned_version(session: Session, tenant: str, requested: str | dict[str, Any] | None) -> str:
    """The model version a new job is pinned to: the one asked for (shared or the tenant's own), or the
    tenant's active one. Another tenant's version is as unknown as one that does not exist. ``{version: weight}``
    names the tenant's ensemble of those versions (made on first use, as POST /v1/models/ensemble makes it)."""
    if isinstance(requested, dict):
        from rewardq.api.routes.models import inline_ensemble

        return inline_ensemble(session, tenant, requested)
    if requested is None:
        active = registry.active_version(session, tenant=tenant)
        if active is None:
            raise ApiError(503, "no model version is registered yet: run 'rewardq db upgrade' or start a worker")
        return active
    mv = registry.resolve(session, ref=requested, tenant=tenant)
    if mv is None:
        raise invalid([FieldError("model_version", f"unknown model version {requested!r} (an id or a name)")])
    return mv.version


def _prior(session: Session, tenant: str, idem_key: str | None, body_hash: str) -> JobCreated | None:
    """The job an earlier request with this Idempotency-Key made (409 if its body differed)."""
    prior = repo.find_job_by_idempotency_key(session, tenant=tenant, key=idem_key) if idem_key else None
    if prior is None:
        return None
    if prior.request_hash != body_hash:
        raise ApiError(
            409,
            "Idempotency-Key was already used with a different request body",
            [FieldError("Idempotency-Key", "reused with another payload")],
        )
    return JobCreated(job_id=prior.id, status=prior.status, n_items=prior.n_items, model_version=prior.model_version)


def _commit_and_feed(
    session: Session, settings: Settings, job: Job, tenant: str, idem_key: str | None, body_hash: str
) -> tuple[JobCreated, bool]:
    job.idempotency_key = idem_key
    job.request_hash = body_hash
    try:
        session.commit()
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: answer as it did.
        session.rollback()
        prior = _prior(session, tenant, idem_key, body_hash)
        if prior is None:
            raise
        return prior, False
    try:
        feed(settings)
    except Exception as exc:
        # Nothing half-created: a job accepted while Redis is down would only wait; say so now instead.
        session.delete(job)
        session.commit()
        log.warning("could not enqueue job %s (request id %s): %s", job.id, request_id(), exc)
        raise ApiError(503, "could not enqueue the job's batches (is Redis up?)", headers={"Retry-After": "5"}) from exc
    return JobCreated(job_id=job.id, status=job.status, n_items=job.n_items, model_version=job.model_version), True


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (409, 413, 415, 422, 503)}


@router.post("", status_code=202, response_model=JobCreated, openapi_extra=_CREATE_DOC, responses=_ERRORS)
async def create_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    model_version: Annotated[str | None, Query(description="for ndjson bodies; JSON bodies carry it inline")] = None,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> JobCreated:
    """Create a scoring job from `{"items": [...]}` JSON or from an ndjson body (one item a line)."""
    ctype = request_content_type(request)
    if ctype in NDJSON_TYPES:
        # Received in full (spooled) before any database work, then streamed into SQL in one transaction.
        upload = await receive(request, settings, ctype)

        def ingest() -> tuple[JobCreated, bool]:
            try:
                prior = _prior(session, tenant, idempotency_key, upload.digest)
                if prior is not None:
                    return prior, False
                version = pinned_version(session, tenant, model_version)
                job = ingest_ndjson(upload, session, settings, tenant=tenant, model_version=version)
                return _commit_and_feed(session, settings, job, tenant, idempotency_key, upload.digest)
            finally:
                upload.close()

        created, is_new = await run_in_threadpool(ingest)
        response.status_code = 202 if is_new else 200
        return created
    body = await read_body(request, settings.max_json_bytes, hint=JSON_LIMIT_HINT)

    def build() -> tuple[JobCreated, bool]:
        req = parse_json_job(body, max_items=settings.max_items_per_job, max_chars=settings.max_text_chars)
        body_hash = hashlib.sha256(ctype.encode() + b"\0" + body).hexdigest()
        prior = _prior(session, tenant, idempotency_key, body_hash)
        if prior is not None:
            return prior, False
        job = repo.create_job(
            session,
            tenant=tenant,
            items=req.items,
            batch_size=settings.batch_size,
            model_version=pinned_version(session, tenant, req.model_version or model_version),
            metadata=req.metadata,
        )
        return _commit_and_feed(session, settings, job, tenant, idempotency_key, body_hash)

    created, is_new = await run_in_threadpool(build)
    if not is_new:
        response.status_code = 200
    return created


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JobList:
    jobs = repo.list_jobs(session, tenant=tenant, limit=limit, status=status)
    counts = _counts(session, jobs)
    return JobList(jobs=[_job_out(j, counts[j.id]) for j in jobs])


@router.delete("/{job_id}", response_model=JobDeleted, responses={404: {"model": ErrorOut}})
def delete_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobDeleted:
    """Delete a job and everything it holds (items, results, failed items, batches): its id then answers 404. A job
    still queued or running is cancelled first; a worker that finishes one of its batches afterwards writes nothing.
    A million-item job goes in chunks of short transactions (tens of seconds); a deletion cut short is finished by
    sending it again."""
    full_id = _load_job(session, job_id, tenant).id
    session.rollback()  # the deletion commits as it goes, in transactions of its own
    gone = lifecycle.delete_job(settings.database_url, job_id=full_id, tenant=tenant)
    if gone is None:  # another request deleted it meanwhile
        raise ApiError(404, f"job {job_id!r} not found", [FieldError("job_id", "not found")])
    forget_batches(settings.redis_url, full_id, gone.batch_nos)
    events.publish_finished(settings.redis_url, full_id)  # a long poll on it answers now (404)
    return JobDeleted(job_id=full_id, cancelled=gone.cancelled, deleted=DeletedRows(**gone.rows()))


@router.get("/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    summary: Annotated[
        bool, Query(description="include the score summary (one pass over the job's results; pollers say false)")
    ] = True,
    wait: Annotated[
        float, Query(ge=0, le=60, description="seconds to wait for the job to end before answering (long poll)")
    ] = 0,
) -> JobOut:

    def load() -> tuple[Job, str, str]:
        job = _load_job(session, job_id, tenant)
        if wait and job.status not in FINISHED:
            # End the read transaction in the same thread hop: no connection is held while waiting (nor while
            # waiting for a thread), and the next read is fresh. (The rollback expires ``job``: it is only touched
            # again in the thread pool, where it reloads.)
            full, status = job.id, job.status
            session.rollback()
            return job, full, status
        return job, job.id, job.status

    def detail(job: Job) -> JobOut:
        try:
            return _job_detail(session, job, summary)
        except ObjectDeletedError as exc:  # deleted while the request waited
            raise ApiError(404, f"job {job_id!r} not found", [FieldError("job_id", "not found")]) from exc
        finally:
            session.rollback()  # before the response goes out, not when the request's session closes

    job, full, status = await run_in_threadpool(load)
    if wait and status not in FINISHED:
        await wait_for_job(session, settings, full, wait)
    out = await run_in_threadpool(detail, job)
    if out.status not in FINISHED:  # asked of Redis once the answer is read (no transaction open), and only then
        out.notice = await run_in_threadpool(
            liveness.no_worker_notice,
            settings.redis_url,
            settings.scoring_queue,
            settings.heartbeat_ttl_s,
            f"job {full}",
        )
    return out


async def wait_for_job(session: Session, settings: Settings, job_id: str, seconds: float) -> None:
    """Wait until the job ends or ``seconds`` pass, holding no database connection (each read of its status
    gives the connection back); 429 when REWARDQ_MAX_WAITERS requests of this process wait already."""

    def ended() -> bool:
        try:
            status = repo.job_status(session, job_id=job_id)
            return status is None or status in FINISHED  # None: deleted meanwhile
        finally:
            session.rollback()

    async def finished() -> bool:
        return await run_in_threadpool(ended)

    try:
        await events.wait_finished(settings.redis_url, job_id, finished, seconds, limit=settings.max_waiters)
    except events.TooManyWaiters as exc:
        raise ApiError(
            429,
            f"{exc} on this API process (REWARDQ_MAX_WAITERS={settings.max_waiters}): retry, or poll without ?wait=",
            headers={"Retry-After": "5"},
        ) from exc


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobOut:
    job = repo.cancel_job(session, job=_load_job(session, job_id, tenant))
    session.commit()
    events.publish_finished(settings.redis_url, job.id)
    return _job_detail(session, job)


@router.get("/{job_id}/errors", response_model=list[FailedItem])
def job_errors(
    job_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[int, Query(ge=-1, le=2**31 - 1, description="the last item index of the previous page")] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[FailedItem]:
    """The items that could not be scored, with their reason codes (the error ledger), in index order, one page at a
    time: when more follow, a `Link: <...>; rel="next"` header gives the next page's URL."""
    job = _load_job(session, job_id, tenant)
    rows = results.item_errors(session, job_id=job.id, limit=limit + 1, after=after)
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = request.url.include_query_params(after=rows[-1][0].idx, limit=limit)
        response.headers["Link"] = f'<{nxt.path}?{nxt.query}>; rel="next"'
    return [FailedItem(index=e.idx, id=it.item_id, code=e.code, message=e.message) for e, it in rows]


@router.get("/{job_id}/histogram", response_model=Histogram)
def job_histogram(
    job_id: str, session: SessionDep, tenant: TenantDep, bins: Annotated[int, Query(ge=1, le=200)] = 40
) -> Histogram:
    """The score distribution in equal-width bins, computed in SQL (cheap on a million-item job)."""
    job = _load_job(session, job_id, tenant)
    return Histogram(job_id=job.id, **results.score_histogram(session, job_id=job.id, bins=bins))  # type: ignore[arg-type]


@router.get("/{job_id}/results", response_model=ResultPage)
def job_results(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    format: Annotated[
        Literal["json", "jsonl", "csv", "openai-batch"],
        Query(
            description="openai-batch: one OpenAI/vLLM batch output line per request of a job made from a batch file"
        ),
    ] = "json",
    sort: Annotated[Literal["index", "score", "-score"], Query()] = "index",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Results: one cursor page as JSON, or the whole job streamed as jsonl, csv or batch output. An export of a
    job that has not finished is marked partial: an `X-Rewardq-Partial: true` header and a last line saying so."""
    job = _load_job(session, job_id, tenant)
    partial = None
    headers: dict[str, str] = {}
    if job.status not in FINISHED:
        counts = _counts(session, [job])[job.id]
        partial = {"status": job.status, "done": counts.done, "failed": counts.failed, "total": job.n_items}
        headers = {"X-Rewardq-Partial": "true", "X-Rewardq-Progress": f"{counts.done + counts.failed}/{job.n_items}"}
    if format == "openai-batch":
        headers["Content-Disposition"] = f'attachment; filename="{job.id}.batch_output.jsonl"'
        return StreamingResponse(
            exports.stream_openai_batch(settings.database_url, job), media_type="application/x-ndjson", headers=headers
        )
    if format != "json":
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        headers["Content-Disposition"] = f'attachment; filename="{job.id}.{format}"'
        return StreamingResponse(
            exports.stream_rows(settings.database_url, job.id, sort, format, partial), media_type=media, headers=headers
        )
    try:
        rows, nxt = results.results_page(
            session, job_id=job.id, sort=sort, cursor=cursor, limit=limit, max_bytes=settings.max_page_bytes
        )
    except results.CursorError as exc:
        raise invalid([FieldError("cursor", str(exc))]) from exc
    stats, members = (
        registry.score_stats(session, version=job.model_version),
        registry.members(session, version=job.model_version),
    )
    return ResultPage(
        job_id=job.id,
        results=[ResultOut(**exports.result_row(r, it, stats, members)) for r, it in rows],
        next_cursor=nxt,
    )
