"""Cron expressions of retraining schedules: validation and the next firing time (UTC)."""

from __future__ import annotations

from datetime import datetime, timezone

from croniter import croniter


def is_valid(expr: str) -> bool:
    return len(expr.split()) in (5, 6) and bool(croniter.is_valid(expr))


def next_fire(expr: str, after: datetime) -> datetime:
    """The first firing strictly after ``after``; 6 fields means seconds come last."""
    if after.tzinfo is None:
        after = after.replace(tzinfo=timezone.utc)
    nxt: datetime = croniter(expr, after).get_next(datetime)
    return nxt.astimezone(timezone.utc)
