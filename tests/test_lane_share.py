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

from rewardq.api.lane import LANE_PAIRS
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
            while int(r.get(LANE_PAIRS + a) or 0) != 3000:  # A's request is on the lane: its share is held
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
            assert int(r.get(LANE_PAIRS + a) or 0) == 0
            again = c.post("/v1/score", json={"items": _items(2000, "a")}, headers=as_a)
            assert again.status_code == 504, again.text  # within its share again
    finally:
        for name in r.scan_iter(f"{queue}*"):
            r.delete(name)
        r.delete(LANE_PAIRS + a, LANE_PAIRS + b)


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
