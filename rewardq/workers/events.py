"""Job-finished notices over Redis pub/sub, so `GET /v1/jobs/{id}?wait=S` answers the moment its job ends; and the
replies of the interactive lane (POST /v1/score), pushed by workers onto a list the request waits on.

Whoever ends a job (a worker writing the last batch, a failure, a cancel) publishes on the job's
channel after the commit. One subscriber per API process listens to every job's channel and wakes the requests
waiting on that job; a request registers *before* it reads the job, so a notice cannot slip between the read and
the wait. Notices are a shortcut, never the record: SQL says whether a job has finished, and a waiter reads it
again now and then in case a notice was lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aredis

from rewardq.workers import metrics

log = logging.getLogger(__name__)


def channel(job_id: str) -> str:
    return f"rewardq:job-finished:{job_id}"


def publish_finished(url: str, job_id: str) -> None:
    try:
        metrics.client(url).publish(channel(job_id), b"1")
    except (redis.RedisError, OSError):
        log.debug("finish notice for job %s not sent: Redis unreachable", job_id)


class TooManyWaiters(Exception):
    """This API process already holds REWARDQ_MAX_WAITERS waiting requests."""


RECHECK_S = 15.0  # a waiter reads the job again this often, in case a notice was lost (a Redis restart)


class _Waiters:
    """Every waiting request of one API process (one event loop), served by one Redis subscriber: a pattern
    subscription to every job's channel, which wakes the requests waiting on that job."""

    def __init__(self, url: str):
        self.url = url
        self.events: dict[str, set[asyncio.Event]] = {}
        self.count = 0
        self.listening = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            client = aredis.Redis.from_url(self.url, socket_connect_timeout=2)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as sub:
                    await sub.psubscribe(channel("*"))
                    self.listening.set()
                    backoff = 0.5
                    while True:
                        msg = await sub.get_message(timeout=30)
                        if msg is not None:
                            name = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                            for ev in self.events.get(name.rsplit(":", 1)[-1], ()):
                                ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: waiters read the job every second until it is back
                self.listening.clear()
                log.debug("job-finished subscriber: %s; reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                await client.aclose()


_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Waiters]] = weakref.WeakKeyDictionary()


def waiting(url: str) -> int:
    """How many requests of this process wait on jobs now."""
    w = _waiters.get(asyncio.get_running_loop(), {}).get(url)
    return w.count if w else 0


async def wait_finished(
    url: str, job_id: str, finished: Callable[[], Awaitable[bool]], timeout: float, limit: int | None = None
) -> None:
    """Return once ``finished()`` is true or a notice for the job arrives, or after ``timeout`` seconds; raise
    TooManyWaiters when ``limit`` requests of this process wait already. ``finished()`` must hold no database
    connection when it returns: the wait holds none.

    One subscriber per process serves every waiter; the waiter registers before it reads the job, so a notice
    cannot slip between the read and the wait. Without Redis it reads ``finished()`` once a second."""
    per_loop = _waiters.setdefault(asyncio.get_running_loop(), {})
    w = per_loop.get(url) or per_loop.setdefault(url, _Waiters(url))
    if limit is not None and w.count >= limit:
        raise TooManyWaiters(f"{w.count} requests wait already")
    w.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ev = asyncio.Event()
    w.events.setdefault(job_id, set()).add(ev)
    w.count += 1
    try:
        if await finished():
            return
        while (left := deadline - loop.time()) > 0:
            step = RECHECK_S if w.listening.is_set() else 1.0
            try:
                await asyncio.wait_for(ev.wait(), timeout=min(left, step))
                return
            except asyncio.TimeoutError:
                if await finished():
                    return
    finally:
        w.count -= 1
        evs = w.events.get(job_id)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del w.events[job_id]


# -- replies of the interactive lane ---------------------------------------------------------------------------
# A request's parts are scored by whichever workers take them; each pushes its part's rows onto the request's
# reply list, which expires on its own, so a reply nobody waits for any more leaves nothing behind.

REPLY_TTL_S = 300


def reply_key(request_id: str) -> str:
    return f"rewardq:reply:{request_id}"


def push_reply(url: str, request_id: str, reply: dict[str, Any]) -> None:
    pipe = metrics.client(url).pipeline()
    pipe.rpush(reply_key(request_id), json.dumps(reply))
    pipe.expire(reply_key(request_id), REPLY_TTL_S)
    pipe.execute()


_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aredis.Redis]] = (
    weakref.WeakKeyDictionary()
)
BLOCK_S = 2.0  # each BLPOP blocks at most this long (under the client's 5 s socket timeout)


def async_client(url: str) -> aredis.Redis:
    """One asyncio Redis client (and connection pool) per URL and event loop, shared by every waiting request."""
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        per_loop[url] = aredis.Redis.from_url(url, socket_connect_timeout=2, max_connections=512)
    return per_loop[url]


async def await_replies(url: str, request_id: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """The ``n`` replies of a request, in the order they arrive; TimeoutError if they are not all there in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = async_client(url)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{len(out)} of {n} parts answered within {timeout:.0f}s")
        try:
            got = await client.blpop([reply_key(request_id)], timeout=min(max(left, 0.1), BLOCK_S))
        except redis.TimeoutError:
            continue  # the socket timed out before the server answered: block again until the deadline
        if got is not None:
            out.append(json.loads(got[1]))
    return out
