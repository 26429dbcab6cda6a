"""Streaming job creation: an ndjson body goes into SQL chunk by chunk as it arrives (on SQLite, once it has
arrived), so a million-item job never sits in the API's memory; one transaction, so a bad line or a dropped
connection leaves no job behind."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.parsing import loads, validate_item
from rewardq.storage import repository as repo
from rewardq.storage.models import Job
from rewardq.storage.repository import NewItem
from rewardq.storage.settings import Settings

CHUNK = 5000
SPOOL_IN_MEMORY = 8 << 20  # an ndjson body spooled for SQLite stays in memory up to this size, then goes to disk
JSONL_HINT = 'JSON Lines expected: one {"prompt": ..., "response": ...} object per line'
JSON_ARRAY_HINT = (
    'this looks like a JSON array: send it as application/json {"items": [...]}, or one object per line '
    "(rewardq submit converts arrays, CSV and Parquet itself)"
)


class _Chunker:
    """Validates lines into items and writes them to the job in chunks."""

    def __init__(self, session: Session, job: Job, settings: Settings):
        self.session, self.job, self.settings = session, job, settings
        self.n = 0  # items so far (the index of the next one)
        self.lineno = 0
        self.chunk: list[NewItem] = []
        self.ids: dict[str, int] = {}

    def line(self, raw: bytes) -> None:
        self.lineno += 1
        if not raw.strip():
            return
        try:
            obj = loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            hint = JSON_ARRAY_HINT if raw.lstrip().startswith(b"[") else JSONL_HINT
            raise invalid(
                [FieldError("line", f"line {self.lineno} is not valid JSON ({exc}); {hint}", self.n)]
            ) from exc
        if not isinstance(obj, dict):
            hint = JSON_ARRAY_HINT if isinstance(obj, list) else JSONL_HINT
            raise invalid(
                [FieldError("line", f"line {self.lineno} holds a {type(obj).__name__}, not an object; {hint}", self.n)]
            )
        if self.n >= self.settings.max_items_per_job:
            raise invalid([FieldError("items", f"at most {self.settings.max_items_per_job} items per job")], 413)
        errors: list[FieldError] = []
        item = validate_item(obj, self.n, self.settings.max_text_chars, errors)
        if item is None:
            raise invalid(errors)
        if item.item_id in self.ids:
            first = self.ids[item.item_id]
            raise invalid([FieldError("id", f"duplicate id {item.item_id!r} (first at index {first})", self.n)])
        self.ids[item.item_id] = self.n
        self.chunk.append(item)
        self.n += 1

    def flush(self) -> None:
        if not self.chunk:
            return
        start = self.n - len(self.chunk)
        try:
            with self.session.begin_nested():
                repo.add_items(self.session, job_id=self.job.id, start_idx=start, items=self.chunk)
        except IntegrityError as exc:
            # A duplicate of an id from an earlier chunk: the unique index caught it; name the item.
            dup = repo.first_duplicate_id(self.session, job_id=self.job.id, item_ids=list(self.ids))
            index = self.ids.get(dup or "", start)
            raise invalid([FieldError("id", f"duplicate id {dup!r} (seen in an earlier chunk)", index)]) from exc
        self.chunk.clear()
        self.ids.clear()


async def ingest_ndjson(
    request: Request, session: Session, settings: Settings, *, tenant: str, model_version: str, ctype: str
) -> tuple[Job, str]:
    """Create the job's rows from the streamed body; returns the (uncommitted) job and the body's hash.

    On SQLite, which has one writer at a time, the body is spooled first (memory, then a temporary file), so the
    write lock is taken only once the whole upload is here: a slow client never holds workers up."""
    digest = hashlib.sha256(ctype.encode() + b"\0")
    body = _limited(request, settings, digest)
    if session.get_bind().dialect.name == "sqlite":
        body = _replay(await _spool(body))
    job = await run_in_threadpool(lambda: repo.begin_job(session, tenant=tenant, model_version=model_version))
    chunker = _Chunker(session, job, settings)
    pending = b""
    async for data in body:
        *lines, pending = (pending + data).split(b"\n")
        if lines:
            await run_in_threadpool(_consume, chunker, lines)
    await run_in_threadpool(_consume, chunker, [pending], True)
    if chunker.n == 0:
        raise invalid([FieldError("items", "must contain at least one entry")])
    await run_in_threadpool(
        lambda: repo.finish_job(session, job=job, n_items=chunker.n, batch_size=settings.batch_size, request_hash=None)
    )
    return job, digest.hexdigest()


async def _limited(request: Request, settings: Settings, digest: Any) -> AsyncIterator[bytes]:
    """The body as it arrives, hashed, refused past REWARDQ_MAX_BODY_BYTES."""
    size = 0
    async for data in request.stream():
        size += len(data)
        if size > settings.max_body_bytes:
            raise ApiError(
                413,
                f"request body exceeds the limit of {settings.max_body_bytes} bytes",
                [FieldError("body", "too large")],
            )
        digest.update(data)
        yield data


async def _spool(body: AsyncIterator[bytes]) -> IO[bytes]:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # closed by _replay
    try:
        async for data in body:
            if spool.tell() + len(data) > SPOOL_IN_MEMORY:
                await run_in_threadpool(spool.write, data)  # on disk from here on
            else:
                spool.write(data)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


async def _replay(spool: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while data := await run_in_threadpool(spool.read, 1 << 20):
            yield data
    finally:
        spool.close()


def _consume(chunker: _Chunker, lines: list[bytes], last: bool = False) -> None:
    for raw in lines:
        chunker.line(raw)
        if len(chunker.chunk) >= CHUNK:
            chunker.flush()
    if last:
        chunker.flush()
