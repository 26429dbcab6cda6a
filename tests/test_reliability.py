"""Reliability and security on real services: poison items, limits, hostile input, tenants, idempotency."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from rewardq.storage.db import get_sessionmaker, session_scope
from rewardq.storage.models import Item, Job
from tests.conftest import POISON, Ledger, make_client
from tests.support import Stack, delete_queue, queued_messages, take_messages, wait_job

GOOD = {"prompt": "p", "response": "r"}


def _backend(url: str) -> str:
    return "PostgreSQL" if url.startswith("postgresql") else "SQLite"


def _counts(db_url: str) -> tuple[int, int]:
    with get_sessionmaker(db_url)() as s:
        return s.query(Job).count(), s.query(Item).count()


@pytest.mark.slow
def test_poison_item_is_isolated_the_rest_is_scored(stack: Stack, ledger: Ledger):
    items = [{"id": f"i{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(64)]
    items[37]["response"] = f"bad {POISON} text"
    resp = stack.client.post("/v1/jobs", json={"items": items})
    job = wait_job(stack.client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": 63, "failed": 1, "total": 64, "fraction": 1.0}
    assert job["error_counts"] == {"injected_fault": 1}
    assert [(f["index"], f["id"], f["code"]) for f in job["failed_items"]] == [(37, "i37", "injected_fault")]
    results = stack.client.get(f"/v1/jobs/{job['job_id']}/results").json()["results"]
    assert len(results) == 63 and "i37" not in {r["id"] for r in results}
    export = stack.client.get(f"/v1/jobs/{job['job_id']}/results", params={"format": "jsonl"}).text
    lines = [json.loads(x) for x in export.splitlines()]
    assert len(lines) == 64 and lines[-1]["id"] == "i37" and lines[-1]["error_code"] == "injected_fault"
    assert lines[-1]["score"] is None
    errors = stack.client.get(f"/v1/jobs/{job['job_id']}/errors").json()
    assert [e["index"] for e in errors] == [37]
    ledger.add(
        "poison",
        "1 failing item in a 64-item batch",
        _backend(stack.db_url),
        "batch split until the item was alone; 63 scored, 1 in the error ledger; job succeeded",
    )

    bad = [{"prompt": POISON, "response": "x"} for _ in range(3)]
    job = wait_job(stack.client, stack.client.post("/v1/jobs", json={"items": bad}).json()["job_id"])
    assert job["status"] == "failed" and job["progress"]["failed"] == 3 and job["error"]
    ledger.add("poison", "a job whose every item fails", _backend(stack.db_url), "job failed, 3 items in the ledger")


HOSTILE = [
    ("lone surrogate", b'{"items": [{"prompt": "\\ud800", "response": "r"}]}', "application/json", 422, "prompt"),
    ("invalid UTF-8", b'{"items": [{"prompt": "\xff\xfe", "response": "r"}]}', "application/json", 422, "body"),
    ("NUL byte", b'{"items": [{"prompt": "a\\u0000b", "response": "r"}]}', "application/json", 422, "prompt"),
    ("NaN", b'{"items": [{"prompt": "p", "response": "r"}], "metadata": {"x": NaN}}', "application/json", 422,
     "body"),
    ("Infinity in ndjson", b'{"prompt": "p", "response": Infinity}', "application/x-ndjson", 422, "line"),
    ("number as text", b'{"items": [{"prompt": 1.5, "response": "r"}]}', "application/json", 422, "prompt"),
    ("duplicate ids", b'{"items": [{"id": 1, "prompt": "p", "response": "r"}, {"id": "1", "prompt": "p", '
     b'"response": "r"}]}', "application/json", 422, "id"),
    ("XML body", b"<items/>", "application/xml", 415, "content-type"),
    ("no content type", b'{"items": []}', "", 415, "content-type"),
    ("JSON array instead of object", b"[]", "application/json", 422, "body"),
    ("deeply nested JSON", b"[" * 100000 + b"]" * 100000, "application/json", 422, "body"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "body", "ctype", "status", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_4xx_never_5xx(api: TestClient, db_url: str, ledger: Ledger, what, body, ctype, status,
                                          field):  # fmt: skip
    before = _counts(db_url)
    headers = {"Content-Type": ctype} if ctype else {}
    resp = api.post("/v1/jobs", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["errors"][0]["field"] == field
    assert _counts(db_url) == before
    ledger.add("bad input", what, _backend(db_url), f"{status}, names `{field}`, no job created")


def test_size_limits(db_url: str, redis_url: str, ledger: Ledger):
    with make_client(db_url, "test-limits", max_body_bytes=2048, max_json_bytes=2048, max_items_per_job=5,
                     max_text_chars=100) as c:  # fmt: skip
        before = _counts(db_url)
        big = json.dumps({"items": [{"prompt": "x" * 90, "response": "y"}] * 30}).encode()
        resp = c.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["errors"][0]["field"] == "body"

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            for _ in range(10):
                yield b'{"prompt": "' + b"x" * 300 + b'", "response": "r"}\n'

        resp = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/x-ndjson"})
        assert resp.status_code == 413
        resp = c.post("/v1/jobs", json={"items": [GOOD] * 6})
        assert resp.status_code == 413 and resp.json()["errors"][0]["field"] == "items"
        resp = c.post("/v1/jobs", json={"items": [GOOD, {"prompt": "x" * 101, "response": "r"}]})
        assert resp.status_code == 422 and resp.json()["errors"][0] == {
            "field": "prompt", "index": 1, "message": "longer than 100 characters"}  # fmt: skip
        assert _counts(db_url) == before
    for what, outcome in (("JSON body over REWARDQ_MAX_JSON_BYTES (Content-Length)", "413 before parsing"),
                          ("chunked body over the limit", "413 while streaming"),
                          ("more items than REWARDQ_MAX_ITEMS_PER_JOB", "413, names `items`"),
                          ("text over REWARDQ_MAX_TEXT_CHARS", "422, names the field and index")):  # fmt: skip
        ledger.add("limit", what, _backend(db_url), outcome)


def test_idempotency_key(api: TestClient, db_url: str, ledger: Ledger):
    body = {"items": [GOOD, {"prompt": "q", "response": "s"}]}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    before = _counts(db_url)
    other = api.post("/v1/jobs", json={"items": [GOOD]}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert _counts(db_url) == before
    ledger.add(
        "idempotency",
        "same Idempotency-Key twice, then with another body",
        _backend(db_url),
        "same job (200); 409, nothing created",
    )


def test_tenants_are_isolated_and_keys_are_checked(db_url: str, redis_url: str, ledger: Ledger):
    from rewardq.storage.db import session_scope
    from rewardq.storage.keys import create_key

    with session_scope(db_url) as s:
        key_c = create_key(s, tenant="tenant-c")  # a key stored hashed in SQL
    try:
        key_a, key_b = "key-a-" + "a" * 32, "key-b-" + "b" * 32
        with make_client(db_url, "test-tenants", api_keys=f"tenant-a:{key_a},tenant-b:{key_b}") as c:
            a = {"Authorization": f"Bearer {key_a}"}
            b = {"Authorization": f"Bearer {key_b}"}
            assert c.get("/v1/jobs").status_code == 401
            assert c.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
            job_a = c.post("/v1/jobs", json={"items": [GOOD]}, headers=a).json()["job_id"]
            paths = [("GET", f"/v1/jobs/{job_a}"), ("GET", f"/v1/jobs/{job_a}/results"),
                     ("GET", f"/v1/jobs/{job_a}/errors"), ("POST", f"/v1/jobs/{job_a}/cancel")]  # fmt: skip
            for method, path in paths:
                assert c.request(method, path, headers=b).status_code == 404, path
            assert c.get(f"/v1/jobs/{job_a}", headers=a).status_code == 200
            assert job_a not in [j["job_id"] for j in c.get("/v1/jobs", headers=b).json()["jobs"]]
            assert job_a in [j["job_id"] for j in c.get("/v1/jobs", headers=a).json()["jobs"]]
            c.post("/v1/feedback", json=[{"prompt": "p", "chosen": "a", "rejected": "b"}], headers=a)
            assert c.get("/v1/feedback", headers=b).json()["total"] == 0
            assert c.get("/v1/feedback", headers=a).json()["total"] == 1
            c_hdr = {"Authorization": f"Bearer {key_c}"}
            assert c.get("/v1/jobs", headers=c_hdr).status_code == 200
            assert c.get(f"/v1/jobs/{job_a}", headers=c_hdr).status_code == 404
        ledger.add(
            "tenancy", "tenant B reads, cancels, lists tenant A's job", _backend(db_url), "404; lists show own only"
        )
        ledger.add(
            "auth",
            "no key, a wrong key, a hashed key from `rewardq keys create`",
            _backend(db_url),
            "401, 401, accepted with its own tenant",
        )
        token = f"k-{uuid.uuid4().hex}"  # a fresh key: its counter starts at zero
        with make_client(db_url, "test-rate", api_keys=f"t:{token}", rate_limit_per_minute=3) as c:
            auth = {"Authorization": f"Bearer {token}"}
            codes = [c.get("/v1/jobs", headers=auth).status_code for _ in range(5)]
            # Three in a window; a window can turn over mid-test, so allow one more success, never a 5xx.
            assert codes.count(429) >= 1 and set(codes) <= {200, 429} and codes[:3] == [200, 200, 200]
            resp = c.get("/v1/jobs", headers=auth)
            if resp.status_code == 200:
                resp = c.get("/v1/jobs", headers=auth)
            assert 1 <= int(resp.headers["Retry-After"]) <= 61
        ledger.add("rate limit", "6 requests a minute on a key limited to 3", _backend(db_url), "429 with Retry-After")
    finally:
        from rewardq.storage.models import ApiKey

        with session_scope(db_url) as s:
            s.query(ApiKey).delete()  # other tests run without auth


def test_streamed_ndjson_duplicate_across_chunks_leaves_no_job(api: TestClient, db_url: str, ledger: Ledger):
    from rewardq.api.ingest import CHUNK

    lines = [json.dumps({"id": f"x{i}", "prompt": "p", "response": "r"}) for i in range(CHUNK + 3)]
    lines.append(json.dumps({"id": "x2", "prompt": "p", "response": "r"}))  # duplicates an id of the first chunk
    before = _counts(db_url)
    resp = api.post("/v1/jobs", content="\n".join(lines).encode(), headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == "id" and resp.json()["errors"][0]["index"] in (2, CHUNK + 3)
    assert _counts(db_url) == before
    ledger.add(
        "bad input",
        f"a duplicate id {CHUNK + 1} lines after the first, in a streamed ndjson body",
        _backend(db_url),
        "422, names `id`, nothing of the streamed chunks left",
    )


def test_backpressure_keeps_redis_below_the_high_water_mark(db_url: str, redis_url: str, ledger: Ledger):
    import redis as redis_lib

    from rewardq.storage.models import Batch, Job
    from rewardq.storage.settings import Settings
    from rewardq.workers.feeder import feed

    # The feeder serves every live job in the database, oldest first. Jobs that earlier tests left on
    # queues no worker reads would take this job's window: close them so only this job is live.
    with session_scope(db_url) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running"))).update({"status": "cancelled"})
    queue = f"test-backpressure-{uuid.uuid4().hex[:8]}"
    r = redis_lib.Redis.from_url(redis_url)
    try:
        with make_client(db_url, queue, queue_high_water=3, batch_size=4) as c:
            job_id = c.post("/v1/jobs", json={"items": [GOOD] * 41}).json()["job_id"]  # 11 batches
        assert len(queued_messages(r, queue)) == 3

        def unqueued() -> int:
            with get_sessionmaker(db_url)() as s:
                return s.query(Batch).filter_by(job_id=job_id).filter(Batch.enqueued_at.is_(None)).count()

        assert unqueued() == 8
        settings = Settings(database_url=db_url, redis_url=redis_url, scoring_queue=queue, queue_high_water=3)
        assert feed(settings) == 0  # full: nothing more
        assert len(take_messages(r, queue, 2)) == 2  # a worker takes two
        assert feed(settings) == 2 and len(queued_messages(r, queue)) == 3 and unqueued() == 6
    finally:
        delete_queue(r, queue)
    ledger.add(
        "load",
        "an 11-batch job with REWARDQ_QUEUE_HIGH_WATER=3",
        _backend(db_url),
        "3 messages in Redis, 8 batches waiting in SQL; each one taken lets one more in",
    )


@pytest.mark.slow
def test_a_slow_ndjson_upload_never_holds_sqlites_write_lock(tmp_path, redis_url: str, ledger: Ledger):
    """Forced: an ndjson upload to a real API process stops halfway through its body (the client stalls). Meanwhile
    another writer (a worker saving a batch) must get SQLite's write lock at once; the old API held it from the
    upload's first line to its commit. Then the upload completes, whole."""
    import sqlite3
    import threading

    import httpx

    from rewardq.api.procs import free_port, start_api
    from tests.conftest import _reset_settings, migrated, worker_env

    path = tmp_path / "upload.db"
    before = os.environ.get("REWARDQ_DATABASE_URL")
    db_url = migrated(f"sqlite:///{path}")
    os.environ.pop("REWARDQ_DATABASE_URL")  # migrated() pointed this process at it; the next tests use theirs
    os.environ.update({"REWARDQ_DATABASE_URL": before} if before else {})
    _reset_settings()
    port = free_port()
    api = start_api(worker_env(db_url, f"test-idle-{uuid.uuid4().hex[:8]}"), tmp_path / "api.log", port)
    lines = [json.dumps({"id": f"u{i}", "prompt": f"p{i}", "response": f"r{i}"}).encode() + b"\n" for i in range(600)]
    halfway, resume = threading.Event(), threading.Event()
    reply: list[httpx.Response] = []

    def body():  # type: ignore[no-untyped-def]
        yield b"".join(lines[:300])
        halfway.set()
        resume.wait(60)
        yield b"".join(lines[300:])

    def upload() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            reply.append(c.post("/v1/jobs", content=body(), headers={"Content-Type": "application/x-ndjson"}))

    sender = threading.Thread(target=upload)
    try:
        sender.start()
        assert halfway.wait(30)
        time.sleep(1.0)  # the API has the first half (the old API had its job row written, and the lock, by now)
        other = sqlite3.connect(path, timeout=2.0)
        try:
            t0 = time.monotonic()
            other.execute("BEGIN IMMEDIATE")  # the write lock, as a worker's save takes it
            waited = time.monotonic() - t0
            other.rollback()
        finally:
            other.close()
        resume.set()
        sender.join(60)
        assert reply and reply[0].status_code == 202, reply[0].text if reply else "no reply"
        assert _counts(db_url)[1] >= 600
        with get_sessionmaker(db_url)() as s:
            assert s.get(Job, reply[0].json()["job_id"]).n_items == 600
    finally:
        resume.set()
        api.stop()
    assert waited < 1.0
    outcome = f"another writer took the write lock in {waited * 1000:.0f} ms; the upload then landed whole"
    ledger.add("limit", "an ndjson upload stalled halfway", "SQLite", outcome)
