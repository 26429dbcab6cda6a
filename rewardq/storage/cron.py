"""Cron expressions of retraining schedules: validation and the next firing time (UTC)."""

from __future__ import annotations

from datetime import datetime, timezone

from croniter import croniter

from rewardq.storage.clock import as_utc


def is_valid(expr: str) -> bool:
    return len(expr.split()) in (5, 6) and bool(croniter.is_valid(expr))


def next_fire(expr: str, after: datetime) -> datetime:
    """The first firing strictly after ``after``; 6 fields means seconds come last."""
    nxt: datetime = croniter(expr, as_utc(after)).get_next(datetime)
    return nxt.astimezone(timezone.utc)


def shortest_gap(expr: str, start: datetime, horizon_s: float = 8 * 86400, most: int = 5000) -> float:
    """The shortest time in seconds between two firings of ``expr`` over the next ``horizon_s`` (a week and a day
    covers every weekday), looking at ``most`` firings at most (enough for every 5 minutes over that time)."""
    start = as_utc(start)
    it = croniter(expr, start)
    prev: datetime = it.get_next(datetime)
    gap = float("inf")
    for _ in range(most):
        nxt: datetime = it.get_next(datetime)
        gap = min(gap, (nxt - prev).total_seconds())
        if (nxt - start).total_seconds() > horizon_s:
            break
        prev = nxt
    return gap
