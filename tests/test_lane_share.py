"""Issue #37, item 8: a tenant's share of the interactive lane. The lane is served before bulk work, so one tenant's
stream of 2,048-pair requests held every other tenant's requests, and all bulk work, behind it; persisted requests
went onto the lane past any limit. Forced: tenant A's large request is on the lane (no worker answers it, so it
stays there until its timeout); while it is, A's next request is refused with 429 and Retry-After, a persisted one
too, and tenant B's request is let through. Once A's request is over, A may send again."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import redis

from rewardq.api.lane import LANE_PAIRS, lane_held, lane_share
from tests.conftest import make_client

pytestmark = pytest.mark.usefixtures("redis_url")


def _items(n: int, tag: str) -> list[dict[str, str]]:
    return [{"prompt": f"{tag} q{i}", "response": f"r{i}"} for i in range(n)]


def test_one_tenant_cannot_take_the_whole_interactive_lane(db_url: str, redis_url: str):
    a, b = f"lane-a-{uuid.uuid4().hex[:6]}", f"lane-b-{uuid.uuid4().hex[:6]}"
    ka, kb = f"ka-{uuid.uuid4().hex}", f"kb-{uuid.uuid4().hex}"
    queue = f"test-lane-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    extra: dict[str, Any] = dict(api_keys=f"{a}:{ka},{b}:{kb}", interactive_timeout_s=4.0,
                                 interactive_max_items=5000, interactive_tenant_max_pairs=4096)  # fmt: skip
    try:
        with make_client(db_url, queue, **extra) as c:
            as_a, as_b = {"Authorization": f"Bearer {ka}"}, {"Authorization": f"Bearer {kb}"}
            out: dict[str, Any] = {}
            flood = threading.Thread(
                target=lambda: out.update(first=c.post("/v1/score", json={"items": _items(3000, "a")}, headers=as_a))
            )
            flood.start()
            deadline = time.monotonic() + 30
            while lane_held(r, a) != 3000:  # A's request is on the lane: its share is held
                assert time.monotonic() < deadline and flood.is_alive(), out
                time.sleep(0.02)
            more = c.post("/v1/score", json={"items": _items(2000, "a")}, headers=as_a)
            assert more.status_code == 429 and more.headers["Retry-After"] == "1", more.text
            assert "REWARDQ_INTERACTIVE_TENANT_MAX_PAIRS" in more.json()["detail"]
            persisted = c.post("/v1/score", json={"items": _items(2000, "a"), "persist": True}, headers=as_a)
            assert persisted.status_code == 429, persisted.text
            other = c.post("/v1/score", json={"items": _items(100, "b")}, headers=as_b)
            assert other.status_code == 504, other.text  # let through; no worker here to answer it
            flood.join(30)
            assert out["first"].status_code == 504  # no worker: it timed out, and gave its share back
            assert lane_held(r, a) == 0
            again = c.post("/v1/score", json={"items": _items(2000, "a")}, headers=as_a)
            assert again.status_code == 504, again.text  # within its share again
    finally:
        for name in r.scan_iter(f"{queue}*"):
            r.delete(name)
        r.delete(LANE_PAIRS + a, LANE_PAIRS + b)


_DEAD: list[Any] = []  # the share of an API process that died holding it: kept alive, never closed


@pytest.mark.one_backend("sqlite")  # the share is in Redis; the one-tenant test below runs on both
def test_a_dead_api_s_share_lapses_though_the_tenant_keeps_sending(db_url: str, redis_url: str):
    """An API process that dies while a request waits never gives its share back. It used to be one counter per
    tenant whose expiry every new request pushed back, so a tenant that kept sending (an RLHF loop) never got the
    dead request's pairs back. Forced: a request takes 3,000 of 4,096 pairs and its process "dies" (the share is
    entered and never left); the tenant then asks for 2,000 every half second. Refused while the dead request could
    still be waiting (2 x 1 s + 10 s), let through once it could not."""
    import asyncio

    from rewardq.storage.settings import Settings

    tenant, key = f"lane-d-{uuid.uuid4().hex[:6]}", f"kd-{uuid.uuid4().hex}"
    queue = f"test-lane-dead-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    limits: dict[str, Any] = dict(interactive_timeout_s=1.0, interactive_max_items=5000,
                                  interactive_tenant_max_pairs=4096)  # fmt: skip
    dead = lane_share(Settings(redis_url=redis_url, **limits), tenant, 3000)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()  # no asyncgen shutdown: nothing ever leaves the share
    loop.run_until_complete(dead.__aenter__())
    _DEAD.append((dead, loop))
    t0 = time.monotonic()
    codes = []
    try:
        with make_client(db_url, queue, api_keys=f"{tenant}:{key}", **limits) as c:
            headers = {"Authorization": f"Bearer {key}"}
            while time.monotonic() - t0 < 25:
                resp = c.post("/v1/score", json={"items": _items(2000, "d")}, headers=headers)
                codes.append((round(time.monotonic() - t0, 1), resp.status_code))
                if resp.status_code != 429:
                    break
                time.sleep(0.5)
        assert codes[0][1] == 429 and len(codes) > 10, codes  # held while the dead request could still wait
        assert codes[-1][1] == 504, codes  # then let through (no worker here: it times out)
        assert codes[-1][0] >= 10, codes  # not before its deadline
    finally:
        for name in r.scan_iter(f"{queue}*"):
            r.delete(name)
        r.delete(LANE_PAIRS + tenant)


def test_a_request_waiting_for_the_workers_holds_no_database_connection(db_url: str, redis_url: str):
    """The version lookup took a pooled connection and the request kept it while the workers scored: three
    clients of 1,500-pair requests held three, and a database cut in the wait turned the answer into a 503. Forced:
    no worker answers, so the request waits on the lane while the pool is read."""
    from rewardq.storage.db import get_engine

    queue = f"test-lane-conn-{uuid.uuid4().hex[:8]}"
    tenant, key = f"lane-c-{uuid.uuid4().hex[:6]}", f"kc-{uuid.uuid4().hex}"
    r = redis.Redis.from_url(redis_url)
    try:
        with make_client(db_url, queue, api_keys=f"{tenant}:{key}", interactive_timeout_s=4.0) as c:
            pool = get_engine(db_url).pool
            headers = {"Authorization": f"Bearer {key}"}
            out: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: out.update(resp=c.post("/v1/score", json={"items": _items(10, "c")}, headers=headers))
            )
            t.start()
            deadline = time.monotonic() + 30
            while not r.llen(f"{queue}-interactive"):  # its parts are on the lane: the API is waiting for replies
                assert time.monotonic() < deadline and t.is_alive(), out
                time.sleep(0.02)
            held = pool.checkedout()  # type: ignore[attr-defined]
            t.join(30)
        assert held == 0, f"{held} pooled connection(s) held while the request waited for the workers"
        assert out["resp"].status_code == 504, out["resp"].text  # no worker here: it timed out
    finally:
        for name in r.scan_iter(f"{queue}*"):
            r.delete(name)
        r.delete(LANE_PAIRS + tenant)
