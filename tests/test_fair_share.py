"""Fair share: tenants are fed round robin and a tenant with few batches in flight goes ahead of a large job's queued
backlog, so a small job never waits for another tenant's large one (benchmarks/benchmark_fair_share.py measures it
with a real worker)."""

from __future__ import annotations

import json
import uuid

import redis

from storage import registry
from storage import repository as repo
from storage.db import session_scope
from storage.models import Job
from storage.settings import Settings
from tests.support import delete_queue, take_messages


def _job(db_url: str, tenant: str, n: int) -> str:
    with session_scope(db_url) as s:
        version = registry.default_version(s)
        items = [repo.NewItem(f"{tenant}{i}", f"p{i}", f"r{i}") for i in range(n)]
        return repo.create_job(s, tenant=tenant, items=items, model_version=str(version), batch_size=2).id


def _owner(message: bytes) -> tuple[str, int]:
    kwargs = json.loads(message)["headers"]["kwargsrepr"]
    return kwargs.split("'tenant': '")[1].split("'")[0], int(kwargs.split("'batch_no': ")[1].split(",")[0])


def test_a_small_job_goes_ahead_of_another_tenants_queued_backlog(db_url: str, redis_url: str):
    from workers.feeder import feed, queue_depth

    with session_scope(db_url) as s:  # the feeder serves every live job: only this test's may be live
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    queue = f"test-fair-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url, scoring_queue=queue, queue_high_water=8)
    big, small = f"big-{uuid.uuid4().hex[:6]}", f"small-{uuid.uuid4().hex[:6]}"
    try:
        _job(db_url, big, 200)  # 100 batches
        assert feed(settings) == 8 and queue_depth(redis_url, queue) == 8  # all the big tenant's
        _job(db_url, small, 4)  # 2 batches, made after the big job (oldest-first would put them after its 92 others)
        assert feed(settings) == 0  # full
        take_messages(r, queue, 1)  # a worker finishes one: room for one more
        assert feed(settings) == 1
        # The small tenant's batch is next out of Redis, ahead of the big tenant's 7 still waiting.
        assert _owner(take_messages(r, queue, 1)[0]) == (small, 0)
        # Its second batch (one in flight now) ranks with the big job's second to fourth (enqueued when it had as
        # few in flight): it comes out among the next four, ahead of the big job's backlog of later batches.
        assert feed(settings) == 1
        order = [_owner(m) for m in take_messages(r, queue, 8)]
        assert (small, 1) in order[:4] and len(order) == 8, order
        assert [b for t, b in order if t == big] == sorted(b for t, b in order if t == big)  # the big job in order
    finally:
        delete_queue(r, queue)
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_((big, small))).update({"status": "cancelled"})


def test_tenants_are_fed_round_robin(db_url: str):
    """With room for 6, three tenants with work get 2 each (the least busy first), whatever the jobs' ages."""
    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    names = [f"rr{k}-{uuid.uuid4().hex[:6]}" for k in range(3)]
    try:
        for name, n in zip(names, (40, 10, 10), strict=True):
            _job(db_url, name, n)
        with session_scope(db_url) as s:
            picked = [tenant for _, _, tenant in repo.unqueued_batches(s, limit=6)]
        assert sorted(picked) == sorted(names * 2) and picked[:3] == names  # one each, then again
    finally:
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_(names)).update({"status": "cancelled"})
