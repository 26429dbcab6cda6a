"""Worker liveness: each process that takes work keeps a Redis key alive from a thread; a batch records who took
it, and the sweeper queues again the batches whose worker's key has expired (killed, frozen or cut off), without
waiting for a deadline that must exceed the longest batch."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

import redis

from rewardq.workers import metrics

log = logging.getLogger(__name__)

PREFIX = "rewardq:worker:"
IDLE = "idle"
WRITING = "@write"  # a batch scored, its results being written (workers.writer): not what a death is counted on
LAST_WORDS = ":last"  # a beat's value kept long after the heartbeat expires: what a dead worker was doing
LAST_WORDS_TTL_S = 3600
_lock = threading.Lock()
_started_in: int | None = None  # the pid whose heartbeat thread runs (a forked child starts its own)
_doing: set[str] = set()  # what this process works on now (a batch or a run)
_beat_lock = threading.Lock()  # a beat writes what _doing says at that moment, never an older value


_token: tuple[int, str] | None = None  # (pid, random) of this process: a forked child makes its own


def worker_id() -> str:
    """This process, as batches record it: host, pid and a random token of the process, so a restarted worker that
    gets the same host name and pid (pid 1 in a container) is never taken for the one that died."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), secrets.token_hex(4))
    return f"{socket.gethostname()}:{os.getpid()}:{_token[1]}"


def _beat_into(pipe: Any, key: str, ttl_s: float) -> None:
    """The beat's two writes, queued on ``pipe`` (the caller holds _beat_lock): the heartbeat, which expires with the
    TTL, and the last words, which outlive it, so the sweeper can tell a batch a dead worker was scoring (a death,
    counted) from one whose results it was writing when it died (not counted: the next batch may have killed it)."""
    value = ",".join(sorted(_doing)) or IDLE
    pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
    pipe.set(key + LAST_WORDS, value, ex=LAST_WORDS_TTL_S)


def _beat(client: redis.Redis, key: str, ttl_s: float, also: Callable[[Any], None] | None = None) -> list[Any] | None:
    """One beat, with the commands ``also`` adds after it in the same round trip; their replies, or None when Redis
    did not answer."""
    try:
        with _beat_lock:
            pipe = client.pipeline(transaction=False)
            _beat_into(pipe, key, ttl_s)
            if also is not None:
                also(pipe)
            return list(pipe.execute()[2:])
    except (redis.RedisError, OSError):
        return None


def ensure_heartbeat(url: str, ttl_s: float) -> str:
    """Start this process's heartbeat (once per process) and return its id. The first beat is written before this
    returns, so a batch this process claims next is never seen without one."""
    global _started_in
    wid = worker_id()
    key = PREFIX + wid
    with _lock:
        if _started_in == os.getpid():
            return wid
        client = metrics.client(url)
        _beat(client, key, ttl_s)
        stop = threading.Event()

        def run() -> None:
            # A third of the TTL: two beats may fail (a Redis blip) before the key expires.
            while not stop.wait(ttl_s / 3):
                if _beat(client, key, ttl_s) is None:
                    log.warning("heartbeat to Redis failed; retrying")

        threading.Thread(target=run, name="rewardq-heartbeat", daemon=True).start()
        _started_in = os.getpid()
        return wid


def working_on(
    url: str, ttl_s: float, what: str, done: bool = False, also: Callable[[Any], None] | None = None
) -> list[Any] | None:
    """Say in this process's heartbeat, at once, that it works on ``what`` (a batch or a run) now, or (``done``) no
    longer: a batch or run that its live worker no longer works on (a retry waiting in memory, a message lost with
    it) is then taken back by the sweeper, not left to the deadline. ``also`` adds commands to the same round trip
    (after the beat), whose replies are returned; None when Redis did not answer (the heartbeat thread says it
    again)."""
    with _beat_lock:
        if done:
            _doing.discard(what)
            _doing.discard(what + WRITING)
        else:
            _doing.add(what)
    return _beat(metrics.client(url), PREFIX + worker_id(), ttl_s, also)


def writing(what: str) -> None:
    """``what`` is scored and its results are being written: said with the next beat (the next take's, or the
    heartbeat thread's), not at once, so it costs no round trip."""
    with _beat_lock:
        _doing.discard(what)
        _doing.add(what + WRITING)


def doing(url: str, workers: Iterable[str]) -> dict[str, str]:
    """What each of these workers with a live heartbeat says it works on (absent: its heartbeat expired)."""
    ids = sorted(set(workers))
    if not ids:
        return {}
    found = metrics.client(url).mget([PREFIX + w for w in ids])
    return {w: v.decode() if isinstance(v, bytes) else str(v) for w, v in zip(ids, found, strict=True) if v is not None}


def abandoned(beat: str | None, what: str) -> bool:
    """A live worker whose heartbeat names other work (or none) than ``what`` it took (scoring it, or writing its
    results). A heartbeat from before workers said what they do ('1') never counts as abandoning."""
    return beat is not None and beat != "1" and not {what, what + WRITING} & set(beat.split(","))


def last_words(url: str, workers: Iterable[str]) -> dict[str, str]:
    """What each of these workers said in its last beat (kept an hour after its heartbeat expired)."""
    ids = sorted(set(workers))
    if not ids:
        return {}
    found = metrics.client(url).mget([PREFIX + w + LAST_WORDS for w in ids])
    return {w: v.decode() if isinstance(v, bytes) else str(v) for w, v in zip(ids, found, strict=True) if v is not None}


def died_writing(words: str | None, what: str) -> bool:
    """Whether a dead worker's last words say it was writing ``what``'s results, not scoring it: its death is not
    ``what``'s doing (the next batch, or something else, killed it)."""
    return words is not None and what + WRITING in words.split(",")


def trusted(url: str, ttl_s: float) -> bool:
    """Whether missing heartbeats mean anything yet: a Redis that restarted has lost every heartbeat, and live
    workers write theirs again within a third of the TTL, so they count once it has been up for two beats. A Redis
    that does not tell its uptime (INFO refused by an ACL, a proxy) is trusted, as before this check."""
    try:
        uptime = metrics.client(url).info("server").get("uptime_in_seconds")
    except redis.ResponseError:
        return True
    except (redis.RedisError, OSError):
        return False
    return uptime is None or float(uptime) >= ttl_s * 2 / 3


# Which queues live workers consume: one sorted set per queue, a member per `rewardq worker` (its main process),
# scored with Redis's own clock at its last beat, so hosts whose clocks differ still compare.
CONSUMERS = "rewardq:consumers:"


def _redis_now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return float(sec) + usec / 1e6


def _consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def withdraw(url: str, queues: Iterable[str]) -> None:
    """This process no longer consumes ``queues`` (a worker that stops cleanly)."""
    try:
        pipe = metrics.client(url).pipeline(transaction=False)
        for q in queues:
            pipe.zrem(CONSUMERS + q, _consumer())
        pipe.execute()
    except (redis.RedisError, OSError):
        pass


def advertise(url: str, queues: Iterable[str], ttl_s: float) -> threading.Event:
    """Say, every third of ``ttl_s`` from a daemon thread, that this process consumes ``queues``; set the returned
    event to stop (the entry then goes at once; a killed worker's entry is stale after ``ttl_s``)."""
    client = metrics.client(url)
    member = _consumer()
    keys = [CONSUMERS + q for q in queues]
    stop = threading.Event()

    def beat() -> None:
        try:
            now = _redis_now(client)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.zadd(key, {member: now})
                pipe.zremrangebyscore(key, "-inf", now - 3600)  # entries of workers gone for an hour
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not advertise the queues this worker consumes: %s", exc)

    def run() -> None:
        while not stop.wait(ttl_s / 3):
            beat()

    beat()
    threading.Thread(target=run, name="rewardq-consumer-beat", daemon=True).start()
    return stop


def live_consumers(url: str, queue: str, ttl_s: float) -> int:
    """How many workers beat for ``queue`` within the last ``ttl_s`` seconds (by Redis's clock)."""
    client = metrics.client(url)
    now = _redis_now(client)
    return int(client.zcount(CONSUMERS + queue, now - ttl_s, "+inf"))


def no_worker_notice(url: str, queue: str, ttl_s: float, waiting: str) -> str | None:
    """What to tell a user whose ``waiting`` (a job, a run) sits on ``queue`` that no live worker consumes; None
    when one does, or when Redis cannot say."""
    try:
        if live_consumers(url, queue, ttl_s):
            return None
    except (redis.RedisError, OSError):
        return None
    return (
        f"no live worker consumes queue {queue!r}, so {waiting} waits: start one with `rewardq worker` "
        f"(with the same REWARDQ_REDIS_URL and REWARDQ_DATABASE_URL; `-Q` must include {queue})"
    )
