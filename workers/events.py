"""Job-finished notices over Redis pub/sub, so `GET /v1/jobs/{id}?wait=S` answers the moment its job ends.

Whoever ends a job (a worker writing the last batch, a failure, a cancel) publishes on the job's
channel after the commit. A waiting request subscribes *before* it reads the job, so a notice
cannot slip between the read and the wait. Notices are a shortcut, never the record: SQL says
whether a job has finished, and a lost notice only means the request waits out its timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

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
