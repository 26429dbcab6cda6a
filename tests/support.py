"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rewardq.api.procs import Proc, wait_for

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; the browser tests and benchmark never download one
# As the machine's notes advise: no first-run, no background traffic to hosts this network cannot reach.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def wait_js(page: Any, expression: str, timeout: float = 30_000) -> Any:
    """Playwright's wait_for_function without its in-page eval, which the dashboard's CSP (no 'unsafe-eval')
    refuses: the expression is polled from here through page.evaluate (the DevTools protocol, outside the CSP)
    until it is truthy, for ``timeout`` milliseconds."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            value = page.evaluate(expression)
        except Error as exc:  # a navigation replaced the page meanwhile: ask the new one
            if "context was destroyed" not in str(exc):
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression!r} still false after {timeout / 1000:.0f} s")
        page.wait_for_timeout(25)


def need(ok: bool, what: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is required under CI=true")
        pytest.skip(f"{what} not available")


SECRET = "key-live-0123456789abcdef0123456789abcdef"  # the live API's key (tenant "live")


@dataclass
class Stack:
    db_url: str
    queue: str
    client: TestClient
    worker: Proc
    env: dict[str, str]


@dataclass
class Live:
    """A real API process (uvicorn) over the stack's database and queues, with one key: for clients that need a
    socket (the CLI, OpenRLHF's aiohttp client, a TRL trainer, a separate venv)."""

    url: str
    proc: Proc
    stack: Stack

    def client(self):  # type: ignore[no-untyped-def]
        from rewardq.client.client import Client

        return Client(self.url, SECRET)


def wait_job(
    client: TestClient, job_id: str, timeout: float = 180, headers: dict[str, str] | None = None
) -> dict[str, object]:
    box: dict[str, dict[str, object]] = {}

    def done() -> bool:
        box["job"] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return box["job"]["status"] in ("succeeded", "failed", "cancelled")

    wait_for(done, timeout, f"job {job_id}")
    return box["job"]


class TcpProxy:
    """A loopback TCP proxy that can drop every connection and refuse new ones: a database outage on demand."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        import socket
        import threading

        self.target = (target_host, target_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.up = True
        self.closed = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def outage(self) -> None:
        """Drop every open connection and refuse new ones until restore()."""
        import socket

        self.up = False
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.outage()
        self.server.close()


def seed_scored_job(url: str, *, tenant: str, n: int, model_version: str, seed: int = 0) -> str:
    """A finished job of ``n`` items with synthetic scores, written straight to SQL (COPY on PostgreSQL).

    For measuring what reading a huge job costs (dashboard, summaries) without scoring a million
    pairs on this CPU. The job is `succeeded` and its one batch done, so the feeder never picks it up.
    """
    import json
    import random
    from datetime import datetime, timezone

    from sqlalchemy import insert

    from rewardq.storage import repository as repo
    from rewardq.storage.db import get_sessionmaker
    from rewardq.storage.models import Batch, Result

    rng = random.Random(seed)
    chunk = 50_000
    with get_sessionmaker(url)() as s:
        job = repo.begin_job(s, tenant=tenant, model_version=model_version, metadata={"synthetic": True})
        for lo in range(0, n, chunk):
            items = [repo.NewItem(f"s{i}", f"synthetic prompt {i % 1000}", f"synthetic response {i}")
                     for i in range(lo, min(lo + chunk, n))]  # fmt: skip
            repo.add_items(s, job_id=job.id, start_idx=lo, items=items)
        repo.finish_job(s, job=job, n_items=n, batch_size=max(n, 1), request_hash=None)
        for lo in range(0, n, chunk):
            rows = []
            for i in range(lo, min(lo + chunk, n)):
                c = rng.uniform(-0.2, 1.0)
                rows.append((job.id, i, math.exp(-c), [c]))
            if s.get_bind().dialect.name == "postgresql":
                raw = s.connection().connection.driver_connection
                assert raw is not None
                with raw.cursor() as cur, cur.copy("COPY results (job_id, idx, score, cos, model_version, truncated, "
                                                   "created_at) FROM STDIN") as cp:  # fmt: skip
                    now = datetime.now(timezone.utc)
                    for jid, i, sc, cs in rows:
                        cp.write_row((jid, i, sc, json.dumps(cs), model_version, False, now))
            else:
                s.execute(insert(Result), [{"job_id": jid, "idx": i, "score": sc, "cos": cs,
                                            "model_version": model_version} for jid, i, sc, cs in rows])  # fmt: skip
        now = datetime.now(timezone.utc)
        job.status, job.n_done, job.started_at, job.finished_at = "succeeded", n, now, now
        s.execute(Batch.__table__.update().where(Batch.job_id == job.id).values(done=True, done_at=now))
        s.commit()
        return job.id


def queued_messages(r: Any, queue: str) -> list[bytes]:
    """Every message waiting in ``queue``, over its priority steps (fair share puts bulk batches in several lists)."""
    from rewardq.workers.celery_app import queue_lists

    return [m for name in queue_lists(queue) for m in r.lrange(name, 0, -1)]


def payloads(messages: list[bytes]) -> list[dict[str, Any]]:
    """The task payload of each Celery message (a scoring message's job_id, batch_no, texts, ...)."""
    import base64
    import json

    return [json.loads(base64.b64decode(json.loads(m)["body"]))[1]["payload"] for m in messages]


def take_messages(r: Any, queue: str, n: int) -> list[bytes]:
    """Take ``n`` messages as a worker would: the first-served step first, oldest first."""
    from rewardq.workers.celery_app import queue_lists

    out: list[bytes] = []
    for name in queue_lists(queue):
        while len(out) < n and (m := r.rpop(name)) is not None:
            out.append(m)
    return out


def drop_message(r: Any, queue: str, message: bytes) -> None:
    """Lose one message (as a Redis restart or a dead worker's prefetch would)."""
    from rewardq.workers.celery_app import queue_lists

    for name in queue_lists(queue):
        r.lrem(name, 1, message)


def delete_queue(r: Any, queue: str) -> None:
    from rewardq.workers.celery_app import queue_lists

    r.delete(*queue_lists(queue))


def enqueued_job(db_url: str, pairs: list[tuple[str, str]], tenant: str) -> Any:
    """A job of one batch of ``pairs`` (tenant ``tenant`` plus a random suffix), enqueued by the feeder's claim; its
    message, built as the worker will receive it (a ScoreBatch)."""
    import uuid

    from rewardq.storage import ledger, registry
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.workers.messages import build_messages

    with session_scope(db_url) as s:
        version = registry.default_version(s)
        assert version is not None
        items = [repo.NewItem(f"i{i}", p, r) for i, (p, r) in enumerate(pairs)]
        job = repo.create_job(s, tenant=f"{tenant}-{uuid.uuid4().hex[:6]}", items=items, model_version=version,
                              batch_size=len(pairs))  # fmt: skip
        job_id = job.id
    with session_scope(db_url) as s:
        assert ledger.claim_requeue(s, job_id=job_id, batch_no=0, seen=None)
        [msg] = build_messages(s, job_id=job_id, model_version=version, batches=[repo.BatchRef(0, 0, len(pairs))])
    return msg


def job_done(session: Any, job_id: str) -> tuple[str, int, int]:
    """A job's status and its done and failed counts as the API reports them: its row's and its progress rows'
    (a live job's counts are in its progress rows until it closes)."""
    from rewardq.storage import repository as repo
    from rewardq.storage.models import Job

    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    counts = repo.job_counts(session, job_ids=[job_id])[job_id]
    return job.status, counts.done, counts.failed
