"""The worker's last stage: a scored batch's results are written on a thread of their own (write-behind), so the
task thread acks the message and takes and scores the next one while SQL commits this one.

The loop of a worker process has three stages: the take (a compare-and-set that hands the batch a fencing token,
its lease), the device passes, and the write. The first two run on Celery's task thread; the write runs here, in one
transaction (fenced on the lease, as before) and one Redis pipeline (the counters, the tenant served, the job's
finish notice, the heartbeat, the queue's depth).

What a message's early ack changes, and why nothing is lost or counted twice:

- the batch stays taken, with this worker named on it and in its heartbeat (``batch@write``), until its results
  commit. If the process dies first, its heartbeat expires and the sweeper queues the batch again; its last words
  (liveness.LAST_WORDS) say it was writing, so no death is counted on it (the next batch may be the killer);
- a write that fails for a transient reason (the database gone) is tried again with backoff, its scores kept; past
  engine.WRITE_RETRY_S it hands the batch back and queues it again, as the task's own retry did; a write that fails
  otherwise fails the job, as the task's failure did;
- a warm shutdown waits for the writes in hand (worker_process_shutdown, tasks); at most ``DEPTH`` writes wait
  behind the one in progress, so a slow database slows the task thread down rather than piling results up in
  memory.

REWARDQ_WRITE_BEHIND: ``auto`` (the default) writes behind on PostgreSQL and on the task thread on SQLite, ``on`` and
``off`` say which everywhere. Measured (docs/performance.md): on PostgreSQL a write is mostly waits on the server,
which release the GIL and overlap the next message; SQLite takes one writer at a time, so the next take waits on the
write's lock, and the write's Python half competes with the task thread for the GIL: no gain there.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewardq.storage.settings import Settings

log = logging.getLogger(__name__)

DEPTH = 1  # writes that may wait behind the one in progress


class WriteBehind:
    """One thread that runs the writes handed to it, in order."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._q: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="rewardq-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None]) -> None:
        """Hand a write over; blocks while ``depth`` writes wait already."""
        self._q.put(write)

    def pending(self) -> int:
        """Writes handed over and not finished (waiting or in progress)."""
        return self._q.unfinished_tasks

    def drain(self, timeout_s: float) -> bool:
        """Wait until every write handed over has finished; False if some had not after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while True:
            write = self._q.get()
            try:
                write()
            except BaseException:  # a write handles its own failures; this keeps the thread alive for the next
                log.exception("a write-behind write failed")
            finally:
                self._q.task_done()


def wanted(settings: Settings) -> bool:
    """Whether a worker process with these settings writes behind (REWARDQ_WRITE_BEHIND)."""
    if settings.write_behind == "auto":
        return settings.database_url.startswith("postgresql")
    return settings.write_behind == "on"


_writer: tuple[int, WriteBehind] | None = None
_lock = threading.Lock()


def start() -> WriteBehind:
    """This process's writer (a forked child starts its own)."""
    global _writer
    with _lock:
        if _writer is None or _writer[0] != os.getpid():
            _writer = (os.getpid(), WriteBehind())
        return _writer[1]


def current() -> WriteBehind | None:
    """This process's writer, if it started one (a Celery worker's pool process does; a direct call writes inline)."""
    w = _writer
    return w[1] if w is not None and w[0] == os.getpid() else None


def drain(timeout_s: float) -> bool:
    w = current()
    return True if w is None else w.drain(timeout_s)


def stop(timeout_s: float = 30.0) -> bool:
    """Finish the writes in hand, then write inline again (tests that start a writer in their own process)."""
    global _writer
    done = drain(timeout_s)
    with _lock:
        _writer = None
    return done


def pending() -> int:
    w = current()
    return 0 if w is None else w.pending()
