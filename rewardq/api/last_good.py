"""The last good answer of the few lookups every scoring request makes (the version it scores with, that version's
kind, score statistics and ensemble members, a stored key's tenant), served while the database is out of reach.

A scoring request needs the database only to read these; the workers score it from Redis with models they already
hold. So through a connection cut (a restart, a failover) the API answers from what it read last, at most
REWARDQ_SCORE_STALE_S old, instead of 503. Nothing can change these rows while the database is unreachable, so an
answer is stale only by what changed in the seconds before the cut.

- Only an unreachable database counts (a refused or dropped connection, an administrator's shutdown): a statement
  timeout, a deadlock or a locked SQLite file is the database answering, and is raised as before.
- A lookup that never succeeded in this process, whose last answer is older, or whose last answer was "none" (an
  unknown or revoked key, a version that is gone) still gets the error.
- After an unreachable error, for OUTAGE_HOLD_S, lookups with a remembered answer take it without asking the
  database again: on a silent network cut each ask waits for its connect timeout, and a request makes several.
- Per process, bounded (only answers worth serving take room), and each reader gets its own copy."""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

T = TypeVar("T")

_SIZE = 4096  # answers kept per process
OUTAGE_HOLD_S = 5.0
_GONE = object()  # the database said "none" after an answer was kept: a slower, older read must not bring it back
_store: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
_lock = threading.Lock()
_down_until = 0.0


def unreachable(exc: OperationalError) -> bool:
    """Whether the database is out of reach, as opposed to answering with an error: a connection that failed or
    was cut (PostgreSQL gives no SQLSTATE then), connection exceptions (class 08) and an administrator's or
    crash shutdown (57P01-57P03). SQLite's errors ("database is locked") are the database answering."""
    if exc.connection_invalidated:
        return True
    if not hasattr(exc.orig, "sqlstate"):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    return state is None or str(state).startswith("08") or state in ("57P01", "57P02", "57P03")


def _remembered(key: Hashable, max_age_s: float) -> tuple[bool, Any]:
    with _lock:
        hit = _store.get(key)
    if hit is None or hit[1] is _GONE or max_age_s <= 0 or time.monotonic() - hit[0] > max_age_s:
        return False, None
    return True, copy.deepcopy(hit[1])


def _keep(key: Hashable, started: float, value: Any, max_age_s: float) -> None:
    with _lock:
        old = _store.get(key)
        if old is not None and old[0] > started:
            return  # a read that began later already said what holds now
        if value is None or max_age_s <= 0:
            # Nothing to serve later. A kept answer becomes a marker, so a read that began before this one cannot
            # restore it; a key never kept takes no room (a stream of made-up keys cannot push real ones out).
            if old is not None:
                _store[key] = (started, _GONE)
            return
        _store[key] = (started, copy.deepcopy(value))
        _store.move_to_end(key)
        while len(_store) > _SIZE:
            _store.popitem(last=False)


def read(session: Session, key: Hashable, fetch: Callable[[], T], max_age_s: float) -> T:
    """``fetch()``, remembered under ``key``; when the database is unreachable (unreachable()), the last answer
    remembered under ``key`` if it is at most ``max_age_s`` old, else the error. Any other error forgets the key
    (the database answered: a version gone, for one) and is raised. The session is rolled back after a failure, so
    the request can use it again once the database is back."""
    global _down_until
    if max_age_s > 0 and time.monotonic() < _down_until:
        found, value = _remembered(key, max_age_s)
        if found:
            return value  # type: ignore[no-any-return]
    started = time.monotonic()
    try:
        value = fetch()
    except OperationalError as exc:
        try:
            session.rollback()
        except Exception:  # the connection is gone; the session starts afresh on next use
            pass
        if not unreachable(exc):
            _keep(key, started, None, max_age_s)
            raise
        _down_until = time.monotonic() + OUTAGE_HOLD_S
        found, value = _remembered(key, max_age_s)
        if not found:
            raise
        return value  # type: ignore[no-any-return]
    except BaseException:
        _keep(key, started, None, max_age_s)
        raise
    _keep(key, started, value, max_age_s)
    return value


def forget() -> None:
    """Drop every remembered answer and the outage hold (tests)."""
    global _down_until
    with _lock:
        _store.clear()
        _down_until = 0.0
