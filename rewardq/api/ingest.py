"""Streaming job creation: an ndjson body is spooled as it arrives (memory, then disk), then goes into SQL chunk
by chunk, so a million-item job never sits in the API's memory and a slow upload holds no database connection;
one transaction, so a bad line or a dropped connection leaves no job behind."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.parsing import loads, validate_feedback, validate_item
from rewardq.storage import repository as repo
from rewardq.storage import training_repository as trepo
from rewardq.storage.models import Job
from rewardq.storage.repository import NewItem
from rewardq.storage.settings import Settings

CHUNK = 5000
SPOOL_IN_MEMORY = 8 << 20  # an ndjson body stays in memory up to this size while it arrives, then goes to disk
JSON_LIMIT_HINT = (
    "application/json bodies are parsed in memory and capped at REWARDQ_MAX_JSON_BYTES: send larger ones as "
    "application/x-ndjson, one object per line, which is streamed (rewardq submit and rewardq feedback add do)"
)
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


class Upload:
    """A request body received in full before any database work: spooled in memory up to SPOOL_IN_MEMORY, then on
    disk, with its hash. A slow client holds no pooled connection and no transaction while it uploads (on
    PostgreSQL as on SQLite), and an upload of any size takes a bounded amount of memory."""

    def __init__(self, spool: IO[bytes], digest: str, size: int):
        self.spool, self.digest, self.size = spool, digest, size

    def lines(self, block: int = 1 << 20) -> Iterator[list[bytes]]:
        """The body's lines, a block's worth at a time (blocking: call it from a worker thread)."""
        self.spool.seek(0)
        pending = b""
        while data := self.spool.read(block):
            *lines, pending = (pending + data).split(b"\n")
            if lines:
                yield lines
        yield [pending]

    def close(self) -> None:
        self.spool.close()


async def receive(request: Request, settings: Settings, ctype: str) -> Upload:
    """The streamed body, refused with 413 past REWARDQ_MAX_BODY_BYTES, spooled; its hash covers ``ctype`` too."""
    digest = hashlib.sha256(ctype.encode() + b"\0")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise _too_large(settings)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    size = 0
    try:
        async for data in request.stream():
            size += len(data)
            if size > settings.max_body_bytes:
                raise _too_large(settings)
            digest.update(data)
            if spool.tell() + len(data) > SPOOL_IN_MEMORY:
                await run_in_threadpool(spool.write, data)  # on disk from here on
            else:
                spool.write(data)
    except BaseException:
        spool.close()
        raise
    return Upload(spool, digest.hexdigest(), size)


def _too_large(settings: Settings) -> ApiError:
    return ApiError(
        413, f"request body exceeds the limit of {settings.max_body_bytes} bytes", [FieldError("body", "too large")]
    )


def ingest_ndjson(upload: Upload, session: Session, settings: Settings, *, tenant: str, model_version: str) -> Job:
    """Create the job's rows from the received body, chunk by chunk (blocking: call it from a worker thread);
    returns the (uncommitted) job."""
    job = repo.begin_job(session, tenant=tenant, model_version=model_version)
    chunker = _Chunker(session, job, settings)
    for lines in upload.lines():
        _consume(chunker, lines)
    chunker.flush()
    if chunker.n == 0:
        raise invalid([FieldError("items", "must contain at least one entry")])
    repo.finish_job(session, job=job, n_items=chunker.n, batch_size=settings.batch_size, request_hash=None)
    return job


def _consume(chunker: _Chunker, lines: list[bytes]) -> None:
    for raw in lines:
        chunker.line(raw)
        if len(chunker.chunk) >= CHUNK:
            chunker.flush()


def ingest_feedback(upload: Upload, session: Session, settings: Settings, *, tenant: str) -> tuple[int, int]:
    """Add the received ndjson feedback, validated and written CHUNK rows at a time in the session's one
    transaction (blocking: call it from a worker thread); returns (rows, preferences). Nothing is kept when a line
    is bad: the caller rolls back."""
    n = prefs = lineno = 0
    objs: list[Any] = []

    def flush() -> None:
        nonlocal n, prefs
        if objs:
            rows = validate_feedback(objs, max_items=CHUNK, max_chars=settings.max_text_chars, offset=n)
            trepo.add_feedback(session, tenant=tenant, rows=rows)
            n += len(rows)
            prefs += sum(r["kind"] == "preference" for r in rows)
            objs.clear()

    for lines in upload.lines():
        for raw in lines:
            lineno += 1
            if not raw.strip():
                continue
            try:
                objs.append(loads(raw))
            except (ValueError, UnicodeDecodeError) as exc:
                raise invalid([FieldError("line", f"line {lineno} is not valid JSON: {exc}", n + len(objs))]) from exc
            if n + len(objs) > settings.max_items_per_job:
                raise invalid([FieldError("items", f"at most {settings.max_items_per_job} items per request")], 413)
            if len(objs) >= CHUNK:
                flush()
    flush()
    if n == 0:
        raise invalid([FieldError("feedback", "must contain at least one entry")])
    return n, prefs
