"""Engine and session factory, one per database URL and process."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from rewardq.storage.settings import get_settings

log = logging.getLogger(__name__)

# SQLite's default page cache, 2 MiB per connection, unless the process asks for more (use_sqlite_cache).
_sqlite_cache_kib = 2000


def use_sqlite_cache(mib: int) -> None:
    """A larger SQLite page cache for this process's connections opened from now on. Workers ask for one: the result
    indexes of a job of a few hundred thousand items outgrow the default, and each insert then reads its index pages
    again from the OS. The API keeps the default: its pool holds up to 15 connections, and a cache fills as a long
    upload writes, so a large one would make an upload's memory grow with its size."""
    global _sqlite_cache_kib
    _sqlite_cache_kib = max(1, mib) * 1024


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout queues writers instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA cache_size=-{_sqlite_cache_kib}")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: the configured database), created once per process."""
    return _engine(url or get_settings().database_url)


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # A database host that vanishes (cut off, not closed) must fail a query within a minute, not after the
        # kernel's 15 minutes of retransmissions: a worker stuck there would keep its heartbeat and its batch.
        cut_off = dict(connect_timeout=10, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        cut_off["tcp_user_timeout"] = 60_000  # ms of unacknowledged data
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=cut_off)
    # A forked child (Celery's pool processes) must never use a connection its parent opened: two processes on one
    # socket interleave their messages (PostgreSQL: "connection in transaction status INTRANS", a closed server
    # connection, a job failed). The child drops the inherited pool without closing the parent's connections.
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    return _sessionmaker(url or get_settings().database_url)


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(_engine(url), expire_on_commit=False)


# session.info: {key: step(session)}, what must follow the commit of the session's transaction, in a transaction of
# its own (session_scope runs them): a job's closing after a write on PostgreSQL (repository.advance_job).
AFTER_COMMIT = "rewardq.after_commit"


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error; then the steps its writes asked to
    follow their commit (AFTER_COMMIT) run in one more transaction. Those are best effort: should they fail, the
    first transaction's writes stand, the failure is logged, and the caller goes on as after any successful write
    (a step's work has a backstop: the sweeper closes a job its last write did not). Raising would make the caller
    retry or fail a write that has committed."""
    with get_sessionmaker(url)() as session:
        with session.begin():
            yield session
        steps = session.info.pop(AFTER_COMMIT, None)
        if steps:
            try:
                with session.begin():
                    for step in steps.values():
                        step(session)
            except Exception:
                log.warning("steps after a commit failed: %s; the sweeper will finish them", list(steps), exc_info=True)
