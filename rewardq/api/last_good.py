"""The last good answer of the few lookups every scoring request makes (the version it scores with, that version's
kind, score statistics and ensemble members), served while the database is briefly out of reach.

A scoring request needs the database only to read these; the workers score it from Redis with models they already
hold. So through a connection cut (a restart, a failover) the API answers from what it read last, at most
REWARDQ_SCORE_STALE_S old, instead of 503. Nothing can change these rows while the database is unreachable, so an
answer is stale only by what changed in the seconds before the cut. A lookup that never succeeded in this process,
or whose last answer is older, still gets the 503. Per process, bounded, and only ever consulted when the database
raised: a healthy database is always read."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

T = TypeVar("T")

_SIZE = 4096  # (lookup, tenant, version) keys kept per process
_store: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
_lock = threading.Lock()


def read(session: Session, key: Hashable, fetch: Callable[[], T], max_age_s: float) -> T:
    """``fetch()``, remembered under ``key``; when it raises OperationalError (the database unreachable), the last
    answer remembered under ``key`` if it is at most ``max_age_s`` old, else the error. The session is rolled back
    after a failure, so the request can use it again once the database is back."""
    try:
        value = fetch()
    except OperationalError:
        try:
            session.rollback()
        except Exception:  # the connection is gone; the session starts afresh on next use
            pass
        with _lock:
            hit = _store.get(key)
        if hit is None or max_age_s <= 0 or time.monotonic() - hit[0] > max_age_s:
            raise
        return hit[1]  # type: ignore[no-any-return]
    with _lock:
        if value is None or max_age_s <= 0:
            # Nothing to serve later (an unknown or revoked key: its earlier answer goes, and a stream of made-up
            # keys cannot push the real ones out).
            _store.pop(key, None)
        else:
            _store[key] = (time.monotonic(), value)
            _store.move_to_end(key)
            while len(_store) > _SIZE:
                _store.popitem(last=False)
    return value


def forget() -> None:
    """Drop every remembered answer (tests)."""
    with _lock:
        _store.clear()
