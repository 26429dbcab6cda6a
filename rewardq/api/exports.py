"""Exports of a job's results: the row of a result or a failed item, and the whole job streamed as JSON Lines,
CSV (safe to open in a spreadsheet) or OpenAI batch output. The routes in routes/jobs.py serve them."""

from __future__ import annotations

import csv
import heapq
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from rewardq import conversations
from rewardq.client.formats import RESULT_FIELDS, batch_output
from rewardq.storage import registry, results
from rewardq.storage import repository as repo
from rewardq.storage.db import get_sessionmaker
from rewardq.storage.models import Item, Job, Result
from rewardq.storage.score_stats import place


def result_row(
    r: Result, it: Item, stats: dict[str, Any] | None = None, members: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A scored item as every export writes it (RESULT_FIELDS: its error fields are None); ``members``: the
    ensemble's, when the job's version is one (its member scores are then in components)."""
    z, pct = place(r.score, stats)
    return {
        "index": r.idx,
        "id": it.item_id,
        "prompt": conversations.shown(it.prompt),
        "response": it.response,
        "score": r.score,
        "score_z": z,
        "percentile": pct,
        "cos": r.cos,
        "model_version": r.model_version,
        "truncated": r.truncated,
        "n_tokens": r.n_tokens,
        "components": registry.components_of(r.components, members),
        "error_code": None,
        "error": None,
    }


_CSV_FIELDS = list(RESULT_FIELDS)


def _stats_of_job(session: Session, job_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The score distribution of the job's version, and its members if it is an ensemble."""
    job = repo.get_job(session, job_id=job_id)
    if job is None:
        return None, None
    version = job.model_version
    return registry.score_stats(session, version=version), registry.members(session, version=version)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a leading apostrophe (OWASP's
    advice against CSV injection); numbers are left as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def _failed_row(e: Any, it: Item) -> dict[str, Any]:
    return {
        "index": e.idx,
        "id": it.item_id,
        "prompt": conversations.shown(it.prompt),
        "response": it.response,
        "score": None,
        "score_z": None,
        "percentile": None,
        "cos": None,
        "model_version": None,
        "truncated": None,
        "n_tokens": None,
        "components": None,
        "error_code": e.code,
        "error": e.message,
    }


_EXPORT_PAGE_BYTES = 8 << 20  # an export reads this much text from the database at a time


def stream_openai_batch(url: str, job: Job) -> Iterator[str]:
    """One output line per batch-file request, its pairs' scored and failed rows merged in index order."""
    with get_sessionmaker(url)() as session:
        members = registry.members(session, version=job.model_version)
        scored = (
            result_row(r, it, None, members)
            for r, it in results.iter_results(session, job_id=job.id, sort="index", max_bytes=_EXPORT_PAGE_BYTES)
        )
        failed = (_failed_row(e, it) for e, it in results.iter_errors(session, job_id=job.id))
        rows = heapq.merge(scored, failed, key=lambda row: row["index"])
        buf: list[str] = []
        for line in batch_output(rows, job.model_version, job.id):
            buf.append(json.dumps(line, ensure_ascii=False) + "\n")
            if len(buf) >= 1000:
                yield "".join(buf)
                buf.clear()
        yield "".join(buf)


def _partial_line(partial: dict[str, Any], fmt: str) -> str:
    """The last line of an export of an unfinished job: says so, in the export's own format."""
    if fmt == "csv":
        return (
            f"# partial: job {partial['status']}, {partial['done']} of {partial['total']} items scored and "
            f"{partial['failed']} failed when this was exported\n"
        )
    return json.dumps({"partial": True, **partial}) + "\n"


def stream_rows(
    url: str, job_id: str, sort: results.Sort, fmt: str, partial: dict[str, Any] | None = None
) -> Iterator[str]:
    # A fresh session: the request's one is closed once the response starts streaming.
    with get_sessionmaker(url)() as session:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
        if fmt == "csv":
            writer.writeheader()
        n = 0
        stats, members = _stats_of_job(session, job_id)
        scored = (
            result_row(r, it, stats, members)
            for r, it in results.iter_results(session, job_id=job_id, sort=sort, max_bytes=_EXPORT_PAGE_BYTES)
        )
        # Failed items follow the scored ones, with no score and their reason code.
        failed = (_failed_row(e, it) for e, it in results.iter_errors(session, job_id=job_id))
        for row in itertools.chain(scored, failed):
            if fmt == "csv":
                for key in ("cos", "components"):  # lists as JSON in one cell
                    row[key] = json.dumps(row[key]) if row[key] is not None else ""
                writer.writerow({k: _cell(v) for k, v in row.items()})
            else:
                buf.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            if n % 1000 == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue() + (_partial_line(partial, fmt) if partial else "")
