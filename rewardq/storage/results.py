"""Reading a job's outcome: score summaries computed in SQL, keyset pages of results, the error ledger."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any, Literal

from sqlalchemy import Integer, and_, cast, func, or_, select, update
from sqlalchemy.orm import Session

from rewardq.storage.models import Item, ItemError, Job, JobStatus, Result

Sort = Literal["index", "score", "-score"]


class CursorError(ValueError):
    """A results cursor that this sort order did not produce."""


def job_summary(session: Session, job: Job) -> dict[str, Any]:
    """The job's score summary: computed over its results (every one of them is read), and stored once the job has
    succeeded, when none can change any more, so later reads cost nothing (the caller commits). A cancelled or
    failed job's batches under way may still write, so theirs is computed each time."""
    if job.summary is not None:
        return job.summary
    summary = score_summary(session, job_id=job.id)
    if job.status == JobStatus.succeeded.value:
        session.execute(update(Job).where(Job.id == job.id, Job.summary.is_(None)).values(summary=summary))
    return summary


def score_summary(session: Session, *, job_id: str) -> dict[str, float | int | None]:
    n, mean, mean_sq, lo, hi = session.execute(
        select(
            func.count(Result.idx), func.avg(Result.score), func.avg(Result.score * Result.score),
            func.min(Result.score), func.max(Result.score),
        ).where(Result.job_id == job_id)
    ).one()  # fmt: skip
    out: dict[str, float | int | None] = {
        "count": int(n or 0),
        "mean": mean,
        "std": None,
        "min": lo,
        "max": hi,
    }
    if n:
        out["std"] = math.sqrt(max(float(mean_sq) - float(mean) ** 2, 0.0))
        qs = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
        if session.get_bind().dialect.name == "postgresql":
            # One ordered pass for all three (three OFFSET scans cost three times as much on a big job).
            vals = session.execute(
                select(*(func.percentile_disc(q).within_group(Result.score) for _, q in qs)).where(
                    Result.job_id == job_id
                )
            ).one()
            out.update({name: float(v) for (name, _), v in zip(qs, vals, strict=True)})
        else:
            # SQLite: by offset on the (job_id, score) index. Either way no rows leave the database.
            for name, q in qs:
                off = min(int(q * (n - 1) + 0.5), n - 1)
                out[name] = session.scalar(
                    select(Result.score).where(Result.job_id == job_id).order_by(Result.score).offset(off).limit(1)
                )
    return out


def _encode_cursor(sort: Sort, score: float, idx: int) -> str:
    raw = f"{idx}" if sort == "index" else f"{score!r}|{idx}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(sort: Sort, cursor: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if sort == "index":
            return 0.0, int(raw)
        s, i = raw.split("|")
        return float(s), int(i)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CursorError(f"cursor {cursor!r} is not valid for sort={sort}") from exc


def _row_bytes(item: Item) -> int:
    """About what a row costs in a response: its texts and id, and the fixed fields around them."""
    return len(item.prompt) + len(item.response) + len(item.item_id) + 256


def results_page(
    session: Session,
    *,
    job_id: str,
    sort: Sort = "index",
    cursor: str | None = None,
    limit: int = 1000,
    max_bytes: int | None = None,
) -> tuple[list[tuple[Result, Item]], str | None]:
    """One keyset page of (result, item) rows and the cursor of the next page (None at the end).

    The page ends after ``limit`` rows, or earlier once its texts reach ``max_bytes`` (always at least one row):
    rows are read from the database a few at a time, so a page of long texts never sits in memory whole."""
    q = select(Result, Item).join(Item, and_(Item.job_id == Result.job_id, Item.idx == Result.idx))
    q = q.where(Result.job_id == job_id)
    if sort == "index":
        q = q.order_by(Result.idx)
    elif sort == "score":
        q = q.order_by(Result.score, Result.idx)
    else:
        q = q.order_by(Result.score.desc(), Result.idx)
    if cursor:
        s, i = _decode_cursor(sort, cursor)
        if sort == "index":
            q = q.where(Result.idx > i)
        elif sort == "score":
            q = q.where(or_(Result.score > s, and_(Result.score == s, Result.idx > i)))
        else:
            q = q.where(or_(Result.score < s, and_(Result.score == s, Result.idx > i)))
    rows: list[tuple[Result, Item]] = []
    size, more = 0, False
    found = session.execute(q.limit(limit + 1).execution_options(yield_per=min(limit + 1, 256)))
    try:
        for r, it in found.tuples():
            cost = _row_bytes(it)
            if len(rows) == limit or (rows and max_bytes is not None and size + cost > max_bytes):
                more = True
                break
            rows.append((r, it))
            size += cost
    finally:
        found.close()
    nxt = None
    if more:
        last = rows[-1][0]
        nxt = _encode_cursor(sort, last.score, last.idx)
    return rows, nxt


def iter_results(
    session: Session, *, job_id: str, sort: Sort = "index", page: int = 2000, max_bytes: int | None = None
) -> Iterator[tuple[Result, Item]]:
    """Every result of a job in ``sort`` order, fetched page by page (each page at most ``max_bytes`` of text)."""
    cursor: str | None = None
    while True:
        rows, cursor = results_page(session, job_id=job_id, sort=sort, cursor=cursor, limit=page, max_bytes=max_bytes)
        yield from rows
        if cursor is None:
            return


def item_errors(
    session: Session, *, job_id: str, limit: int | None = 100, after: int = -1
) -> list[tuple[ItemError, Item]]:
    """Failed items in index order: the first ``limit`` after item index ``after``."""
    q = (
        select(ItemError, Item)
        .join(Item, and_(Item.job_id == ItemError.job_id, Item.idx == ItemError.idx))
        .where(ItemError.job_id == job_id, ItemError.idx > after)
        .order_by(ItemError.idx)
    )
    if limit is not None:
        q = q.limit(limit)
    return [(e, it) for e, it in session.execute(q).tuples()]


def iter_errors(session: Session, *, job_id: str, page: int = 2000) -> Iterator[tuple[ItemError, Item]]:
    """Every failed item in index order, page by page (a job whose every item failed never sits in memory)."""
    after = -1
    while True:
        rows = item_errors(session, job_id=job_id, limit=page, after=after)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1][0].idx


def error_counts(session: Session, *, job_id: str) -> dict[str, int]:
    q = select(ItemError.code, func.count()).where(ItemError.job_id == job_id).group_by(ItemError.code)
    return {code: int(n) for code, n in session.execute(q)}


def score_histogram(session: Session, *, job_id: str, bins: int = 40) -> dict[str, object]:
    """Counts of a job's scores in ``bins`` equal-width bins over [min, max], grouped in SQL.

    Two aggregate queries on the (job_id, score) index: nothing per row leaves the database,
    so a million-item job costs the same to draw as a ten-item one.
    """
    n, lo, hi = session.execute(
        select(func.count(Result.idx), func.min(Result.score), func.max(Result.score)).where(Result.job_id == job_id)
    ).one()
    if not n:
        return {"count": 0, "min": None, "max": None, "bins": []}
    lo, hi = float(lo), float(hi)
    width = (hi - lo) / bins if hi > lo else 1.0
    pos = (Result.score - lo) / width
    # Bin = floor(pos); SQLite's CAST truncates (pos >= 0), PostgreSQL's rounds, so it takes floor().
    idx = func.floor(pos) if session.get_bind().dialect.name != "sqlite" else cast(pos, Integer)
    counts = [0] * bins
    for b, c in session.execute(select(idx, func.count()).where(Result.job_id == job_id).group_by(idx)):
        counts[min(max(int(b), 0), bins - 1)] += int(c)  # the maximum lands in the last bin
    edges = [lo + i * width for i in range(bins + 1)]
    return {"count": int(n), "min": lo, "max": hi,
            "bins": [{"lo": edges[i], "hi": edges[i + 1], "count": counts[i]} for i in range(bins)]}  # fmt: skip
