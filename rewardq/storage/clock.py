"""Time in UTC, the one zone the tables store: now, and any instant (with a zone or without) as UTC."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(t: datetime) -> datetime:
    """An instant in UTC. A time without a zone is UTC already: SQLite gives times back without theirs."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
