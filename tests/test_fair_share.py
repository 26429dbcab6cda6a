"""Fair share: tenants are fed round robin and a tenant with few batches in flight goes ahead of a large job's queued
backlog, so a small job never waits for another tenant's large one (benchmarks/benchmark_fair_share.py measures it
with a real worker)."""

from __future__ import annotations

import json
import uuid

import redis

from rewardq.storage import ledger, registry
from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.models import Job
from rewardq.storage.settings import Settings
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
    from rewardq.workers.feeder import feed, queue_depth

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
        # Its second batch (one in flight now) joins the queue in order, behind the big job's 7 waiting: only a
        # tenant's first batch in flight jumps the queue.
        assert feed(settings) == 1
        order = [_owner(m) for m in take_messages(r, queue, 8)]
        assert [t for t, _ in order] == [big] * 7 + [small], order
        assert [b for t, b in order if t == big] == sorted(b for t, b in order if t == big)  # the big job in order
    finally:
        delete_queue(r, queue)
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_((big, small))).update({"status": "cancelled"})


def test_a_tenants_small_job_does_not_wait_behind_its_own_big_job(db_url: str, redis_url: str):
    """Issue #37, item 9: fair share was between tenants only, so one tenant's three 2-item jobs waited 18 minutes
    behind its own 50k job. Now a tenant's own jobs are fed round robin too: the small job made after the big one
    filled the queue gets the next free slots (its batch 0, then its batch 1), not the big job's remaining 92."""
    from rewardq.workers.feeder import feed

    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    queue = f"test-own-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url, scoring_queue=queue, queue_high_water=8)
    tenant = f"own-{uuid.uuid4().hex[:6]}"
    try:
        big = _job(db_url, tenant, 200)  # 100 batches
        assert feed(settings) == 8
        small = _job(db_url, tenant, 4)  # 2 batches, made after the big job filled the queue
        fed = []
        for _ in range(2):
            take_messages(r, queue, 1)  # a worker takes one: room for one more
            assert feed(settings) == 1
            with session_scope(db_url) as s:
                fed += [(b.job_id, b.batch_no) for b in repo.job_batches(s, job_id=small) if b.enqueued_at]
        assert fed == [(small, 0), (small, 0), (small, 1)], fed  # after the first feed, then after the second
        with session_scope(db_url) as s:
            assert sum(b.enqueued_at is not None for b in repo.job_batches(s, job_id=big)) == 8
    finally:
        delete_queue(r, queue)
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant == tenant).update({"status": "cancelled"})


def test_tenants_are_fed_round_robin(db_url: str):
    """With room for 6, three tenants with work get 2 each (the least busy first), whatever the jobs' ages."""
    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    names = [f"rr{k}-{uuid.uuid4().hex[:6]}" for k in range(3)]
    try:
        for name, n in zip(names, (40, 10, 10), strict=True):
            _job(db_url, name, n)
        with session_scope(db_url) as s:
            picked = [tenant for _, _, tenant in ledger.unqueued_batches(s, limit=6)]
        assert sorted(picked) == sorted(names * 2) and picked[:3] == names  # one each, then again
    finally:
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_(names)).update({"status": "cancelled"})


def test_two_large_jobs_share_the_workers_and_neither_starves(db_url: str, redis_url: str):
    """Forced schedule of a worker: take the next message, finish its batch, feed; 48 times. Tenant B's large job
    arrives while A's fills the queue. A must never go 8 batches without one, and once A's backlog is through, both
    share. Two earlier rules starved A here: B's later batches ranked by B's few batches in flight, and "jump when
    nothing is in flight" (a single worker finishes B's batch before the next feed, so B jumped every time)."""
    from rewardq.storage.models import Batch
    from rewardq.workers.feeder import feed
    from rewardq.workers.messages import note_served

    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    queue = f"test-share-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url, scoring_queue=queue, queue_high_water=8)
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    jobs = {}
    try:
        jobs[a] = _job(db_url, a, 200)
        assert feed(settings) == 8
        jobs[b] = _job(db_url, b, 200)
        served = []
        for _ in range(48):
            [message] = take_messages(r, queue, 1)
            tenant, batch_no = _owner(message)
            served.append(tenant)
            with session_scope(db_url) as s:  # the worker finished it, as workers.engine does
                s.query(Batch).filter_by(job_id=jobs[tenant], batch_no=batch_no).update({"done": True})
            note_served(redis_url, tenant)
            feed(settings)
        assert all(a in served[i : i + 8] for i in range(len(served) - 7)), served
        assert served.count(b) >= 12 and served[-16:].count(a) >= 6 and served[-16:].count(b) >= 6, served
    finally:
        delete_queue(r, queue)
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_((a, b))).update({"status": "cancelled"})


def test_a_stream_of_small_jobs_never_starves_a_large_one(db_url: str, redis_url: str):
    """Forced: tenant B submits a one-batch job each time its last one is done, while A's large job fills the queue
    (one worker, so nothing else finishes in between). B's batches jump the queue only when another tenant's batch
    was finished since B's last one: A keeps at least every other batch, and B never waits longer than the queue."""
    from rewardq.storage.models import Batch
    from rewardq.workers.feeder import feed
    from rewardq.workers.messages import note_served

    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    queue = f"test-stream-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url, scoring_queue=queue, queue_high_water=8)
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    job_of: dict[tuple[str, int], str] = {}
    try:
        big = _job(db_url, a, 200)
        assert feed(settings) == 8
        served = []
        for _ in range(40):
            with session_scope(db_url) as s:
                b_live = s.query(Job).filter(Job.tenant == b, Job.status.in_(("queued", "running"))).count()
            if not b_live:
                small = _job(db_url, b, 2)  # one batch
                job_of[(b, 0)] = small
            feed(settings)
            [message] = take_messages(r, queue, 1)
            tenant, batch_no = _owner(message)
            served.append(tenant)
            job_id = big if tenant == a else job_of[(b, 0)]
            with session_scope(db_url) as s:
                s.query(Batch).filter_by(job_id=job_id, batch_no=batch_no).update({"done": True})
                if tenant == b:
                    s.query(Job).filter_by(id=job_id).update({"status": "succeeded"})
            note_served(redis_url, tenant)
        assert served.count(a) >= 20, served  # A keeps at least every other batch
        assert all(b in served[i : i + 9] for i in range(len(served) - 8)), served  # B waits at most the queue
    finally:
        delete_queue(r, queue)
        with session_scope(db_url) as s:
            s.query(Job).filter(Job.tenant.in_((a, b)), Job.status.in_(("queued", "running"))).update(
                {"status": "cancelled"}
            )
