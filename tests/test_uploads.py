"""Uploads take bounded memory and no database connection while they arrive (issue #37, items 5 and 6), on SQLite
and PostgreSQL.

- application/json bodies of POST /v1/jobs and /v1/feedback are parsed in memory, so they are capped at
  REWARDQ_MAX_JSON_BYTES (32 MiB), not at the 256 MiB of streamed ndjson: a 28.6 MiB JSON body grew the API's
  RSS by 715 MiB. The 413 says to send ndjson instead.
- ndjson feedback is validated and written in chunks, as ndjson jobs are: its memory does not grow with the body.
- A slow upload holds no pooled connection and no transaction: the body is spooled before any database work, on
  PostgreSQL as on SQLite. The interleaving is forced: the body's generator stops half way, and the pool is
  inspected while it waits. Before, on PostgreSQL, the job's version lookup checked a connection out before the
  body was read, so 15 slow clients exhausted the pool."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from rewardq.api.procs import free_port, start_api
from rewardq.storage.db import get_engine
from tests.conftest import make_client

pytestmark = pytest.mark.usefixtures("redis_url")
NDJSON = "application/x-ndjson"


def _pad(obj: dict[str, Any], width: int) -> bytes:
    line = json.dumps(obj)
    return (line[:-1] + " " * max(0, width - len(line)) + "}\n").encode()  # JSON allows the spaces


def test_json_bodies_are_capped_at_max_json_bytes_and_ndjson_is_streamed(db_url: str):
    from rewardq.storage.settings import Settings

    assert Settings().max_json_bytes == 32 * 1024 * 1024 < Settings().max_body_bytes
    queue = f"test-json-cap-{uuid.uuid4().hex[:8]}"
    with make_client(db_url, queue, max_body_bytes=8192, max_json_bytes=2048, max_text_chars=100) as c:
        c.headers["Authorization"] = "Bearer ignored-without-keys"
        item = {"prompt": "p" * 90, "response": "r" * 90}
        big = json.dumps({"items": [item] * 12}).encode()  # ~2.6 KB: over the JSON cap, under the body cap
        assert 2048 < len(big) < 8192
        resp = c.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["errors"][0]["field"] == "body"
        assert "application/x-ndjson" in resp.json()["detail"]
        ndjson = b"".join(json.dumps({**item, "id": f"i{i}"}).encode() + b"\n" for i in range(12))
        resp = c.post("/v1/jobs", content=ndjson, headers={"Content-Type": "application/x-ndjson"})
        assert resp.status_code == 202, resp.text
        assert resp.json()["n_items"] == 12
        rows = [{"prompt": "p" * 90, "chosen": "c" * 90, "rejected": "x" * 90}] * 8
        resp = c.post("/v1/feedback", content=json.dumps(rows), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and "application/x-ndjson" in resp.json()["detail"]
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        resp = c.post("/v1/feedback", content=lines, headers={"Content-Type": "application/x-ndjson"})
        assert resp.status_code == 201 and resp.json()["added"] == 8 and resp.json()["preferences"] == 8
        bad = lines + b'{"prompt": "p", "chosen": 3, "rejected": "x"}\n'
        before = c.get("/v1/feedback").json()["total"]
        resp = c.post("/v1/feedback", content=bad, headers={"Content-Type": "application/x-ndjson"})
        assert resp.status_code == 422 and resp.json()["errors"][0] == {
            "field": "chosen", "index": 8, "message": "must be a string, got int"}  # fmt: skip
        assert c.get("/v1/feedback").json()["total"] == before  # nothing of it kept


def _peak_rss(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def test_ndjson_feedback_memory_does_not_grow_with_the_body(db_url: str, tmp_path: Path):
    """A real API process takes a 64 MB ndjson feedback upload (128k rows) over HTTP: its peak RSS may grow by a
    chunk of rows and the spool's first 8 MiB, not by the body (the old route held the body, then every parsed row
    beside it)."""
    import httpx

    from rewardq.storage import lifecycle
    from tests.conftest import TEST_REDIS_URL

    rows, width = 128_000, 500
    body = b"".join(
        _pad({"prompt": f"prompt {i}", "response": f"response {i}", "rating": i % 5}, width) for i in range(rows)
    )
    tenant, key = f"mem-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    env = {**os.environ, "REWARDQ_DATABASE_URL": db_url, "REWARDQ_REDIS_URL": TEST_REDIS_URL,
           "REWARDQ_API_KEYS": f"{tenant}:{key}", "REWARDQ_MAX_FEEDBACK_PER_TENANT": str(10 * rows)}  # fmt: skip
    port = free_port()
    api = start_api(env, tmp_path / "api.log", port)
    try:
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        small = b"".join(_pad({"prompt": "p", "response": "r", "rating": 1}, width) for _ in range(1000))
        for _ in range(2):  # warm: the route's imports, the pool, a first chunk's worth of rows
            resp = httpx.post(f"{url}/v1/feedback", content=small, headers={**auth, "Content-Type": NDJSON})
            assert resp.status_code == 201, resp.text
        before = _peak_rss(api.pid)
        blocks = (body[i : i + (1 << 16)] for i in range(0, len(body), 1 << 16))  # as a client streams it
        resp = httpx.post(f"{url}/v1/feedback", content=blocks, headers={**auth, "Content-Type": NDJSON}, timeout=300)
        grew = _peak_rss(api.pid) - before
        assert resp.status_code == 201, resp.text
        assert resp.json()["added"] == rows and resp.json()["total"] == rows + 2000
        assert grew < 0.5 * len(body), f"peak RSS grew {grew / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB body"
    finally:
        api.stop()
        lifecycle.delete_feedback(db_url, tenant=tenant)


def test_a_slow_upload_holds_no_database_connection(db_url: str):
    queue = f"test-slow-upload-{uuid.uuid4().hex[:8]}"
    paused, resume = threading.Event(), threading.Event()

    def slow_body():  # a client on a slow link: half the body, then a long wait
        for i in range(5):
            yield json.dumps({"id": f"a{i}", "prompt": "q", "response": f"r{i}"}).encode() + b"\n"
        paused.set()
        assert resume.wait(30)
        for i in range(5):
            yield json.dumps({"id": f"b{i}", "prompt": "q", "response": f"s{i}"}).encode() + b"\n"

    with make_client(db_url, queue) as c:
        pool = get_engine(db_url).pool
        assert c.get("/v1/jobs").status_code == 200  # the app and its pool are up
        out: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: out.update(
                resp=c.post("/v1/jobs", content=slow_body(), headers={"Content-Type": "application/x-ndjson"})
            )
        )
        t.start()
        try:
            assert paused.wait(30)
            held = pool.checkedout()  # type: ignore[attr-defined]
        finally:
            resume.set()
            t.join(60)
        assert held == 0, f"{held} pooled connection(s) held while the upload waited"
        assert out["resp"].status_code == 202 and out["resp"].json()["n_items"] == 10
