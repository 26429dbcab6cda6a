"""Job-finished notices over Redis pub/sub, so `GET /v1/jobs/{id}?wait=S` answers the moment its job ends; and the
replies of the interactive lane (POST /v1/score), pushed by workers onto a list the request waits on.

Whoever ends a job (a worker writing the last batch, a failure, a cancel) publishes on the job's
channel after the commit. A waiting request subscribes *before* it reads the job, so a notice
cannot slip between the read and the wait. Notices are a shortcut, never the record: SQL says
whether a job has finished, and a lost notice only means the request waits out its timeout.
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

from workers import metrics

log = logging.getLogger(__name__)


def channel(job_id: str) -> str:
    return f"rewardq:job-finished:{job_id}"


def publish_finished(url: str, job_id: str) -> None:
    try:
        metrics.client(url).publish(channel(job_id), b"1")
    except (redis.RedisError, OSError):
        log.debug("finish notice for job %s not sent: Redis unreachable", job_id)


async def wait_finished(url: str, job_id: str, finished: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Return once ``finished()`` is true or a notice for the job arrives, or after ``timeout`` seconds.

    Without Redis it falls back to reading ``finished()`` once a second.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = aredis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        async with client.pubsub(ignore_subscribe_messages=True) as sub:
            await sub.subscribe(channel(job_id))
            if await finished():
                return
            while (left := deadline - loop.time()) > 0:
                if await sub.get_message(timeout=left) is not None:
                    return
    except (redis.RedisError, OSError):
        log.debug("no finish notices for job %s: Redis unreachable; reading the job instead", job_id)
        while (left := deadline - loop.time()) > 0 and not await finished():
            await asyncio.sleep(min(1.0, left))
    finally:
        await client.aclose()


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
