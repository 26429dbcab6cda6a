"""The interactive lane (POST /v1/score) through the real worker: the same scores as bulk jobs, nothing written
unless asked, limits and tenancy, vLLM's /score, and interactive work taken before queued bulk work (forced with
a paused worker)."""

from __future__ import annotations

import signal
import threading
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rewardq.storage.db import get_sessionmaker
from rewardq.storage.models import Item, Job
from tests.conftest import make_client
from tests.support import Stack, job_done, wait_job

pytestmark = pytest.mark.slow

PAIRS = [("What is the capital of France?", "Paris."), ("Tell me a joke.", "No."), ("2+2?", "4"), ("2+2?", "5")]


def _counts(db_url: str) -> tuple[int, int]:
    with get_sessionmaker(db_url)() as s:
        return s.query(Job).count(), s.query(Item).count()


@pytest.mark.one_backend("sqlite")  # the lane's scores; the queued path's storage runs on both elsewhere
def test_interactive_scores_equal_bulk_scores_and_write_nothing(stack: Stack):
    c = stack.client
    items = [{"id": f"p{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(PAIRS)]
    before = _counts(stack.db_url)
    resp = c.post("/v1/score", json={"items": items})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert _counts(stack.db_url) == before  # answer-only: no job, no item, nothing half-written
    assert out["kind"] == "sim_exp" and out["job_id"] is None
    assert [r["id"] for r in out["results"]] == ["p0", "p1", "p2", "p3"]
    job = c.post("/v1/jobs", json={"items": items}).json()
    assert wait_job(c, job["job_id"])["status"] == "succeeded"
    bulk = {r["id"]: r for r in c.get(f"/v1/jobs/{job['job_id']}/results").json()["results"]}
    for row in out["results"]:
        assert abs(row["score"] - bulk[row["id"]]["score"]) < 1e-6 and len(row["cos"]) == 1
    assert out["model_version"] == job["model_version"]


def test_persist_makes_a_job_through_the_interactive_queue(stack: Stack):
    c = stack.client
    resp = c.post(
        "/v1/score",
        json={"items": [{"prompt": p, "response": r} for p, r in PAIRS], "persist": True, "metadata": {"step": 7}},
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["job_id"] and out["status"] == "succeeded" and all(r["score"] is not None for r in out["results"])
    job = c.get(f"/v1/jobs/{out['job_id']}").json()
    assert job["progress"]["done"] == 4 and job["metadata"] == {"step": 7, "lane": "interactive"}
    stored = [r["score"] for r in c.get(f"/v1/jobs/{out['job_id']}/results").json()["results"]]
    assert stored == [r["score"] for r in out["results"]]
    # The same fields as an answer-only request (issue #38, item 5: kind was '', score_z and percentile None).
    answer = c.post("/v1/score", json={"items": [{"prompt": p, "response": r} for p, r in PAIRS]}).json()
    assert out["kind"] == answer["kind"] == "sim_exp"
    for mine, theirs in zip(out["results"], answer["results"], strict=True):
        assert set(mine) == set(theirs) and mine["percentile"] is not None
        assert abs(mine["score_z"] - theirs["score_z"]) < 1e-6 and abs(mine["percentile"] - theirs["percentile"]) < 1e-3


def test_limits_validation_and_tenancy(stack: Stack):
    with make_client(stack.db_url, stack.queue, interactive_max_items=3, max_json_bytes=4096) as c:
        one = {"prompt": "p", "response": "r"}
        assert c.post("/v1/score", json={"items": [one] * 4}).status_code == 413
        big = {"prompt": "p" * 5000, "response": "r"}  # one pair, but a body over REWARDQ_MAX_JSON_BYTES
        for path, body in (("/v1/score", {"items": [big]}), ("/score", {"text_1": big["prompt"], "text_2": "r"}),
                           ("/get_reward", {"query": [big["prompt"]], "prompts": ["p"]})):  # fmt: skip
            assert c.post(path, json=body).status_code == 413, path
        resp = c.post("/v1/score", json={"items": [one, {"prompt": "p"}]})
        assert resp.status_code == 422 and resp.json()["errors"][0] == {
            "field": "response",
            "index": 1,
            "message": "field required",
        }
        assert c.post("/v1/score", json={"items": [one], "model_version": "nope"}).status_code == 422
        assert c.post("/v1/score", json={"items": [one], "extra": 1}).json()["errors"][0]["field"] == "extra"
        assert c.post("/v1/score", content=b"p,r", headers={"Content-Type": "text/csv"}).status_code == 415
        assert c.post("/v1/score", json={"items": []}).status_code == 422
    key = "lane-a:key-lane-a-0123456789abcdef0123456789"
    with make_client(stack.db_url, stack.queue, api_keys=key) as c:
        assert c.post("/v1/score", json={"items": [one]}).status_code == 401
        assert c.post("/score", json={"text_1": "a", "text_2": "b"}).status_code == 401
        assert c.post("/get_reward", json={"query": ["ab"], "prompts": ["a"]}).status_code == 401


def test_vllm_score_one_to_many_and_zipped(stack: Stack):
    c = stack.client
    one = c.post("/score", json={"text_1": "What is the capital of France?", "text_2": ["Paris.", "Berlin."]}).json()
    assert one["object"] == "list" and [d["index"] for d in one["data"]] == [0, 1]
    assert {d["object"] for d in one["data"]} == {"score"} and one["usage"]["prompt_tokens"] >= 0
    zipped = c.post("/score", json={"text_1": ["2+2?", "2+2?"], "text_2": ["4", "5"]}).json()
    lane = c.post(
        "/v1/score", json={"items": [{"prompt": "2+2?", "response": "4"}, {"prompt": "2+2?", "response": "5"}]}
    ).json()
    assert [d["score"] for d in zipped["data"]] == [r["score"] for r in lane["results"]]
    assert zipped["model"] == lane["model_version"]
    resp = c.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "text_2"
    assert c.post("/score", json={"text_1": 3, "text_2": "x"}).json()["errors"][0]["field"] == "text_1"


def _score_while_paused(stack: Stack, c: TestClient, items: list[dict], job_id: str, parts: int) -> tuple[Any, int]:
    """With the worker paused (the caller sent SIGSTOP): POST /v1/score from a thread, wait until its ``parts`` are
    queued, resume the worker. Returns the response and how many of the bulk job's pairs were stored when it came."""
    import redis

    from rewardq.api.procs import wait_for

    box: dict = {}

    def interactive() -> None:
        box["resp"] = c.post("/v1/score", json={"items": items})
        with get_sessionmaker(stack.db_url)() as s:
            box["bulk_done_then"] = job_done(s, job_id)[1]

    t = threading.Thread(target=interactive)
    t.start()
    try:
        r = redis.Redis.from_url(stack.env["REWARDQ_REDIS_URL"])
        wait_for(lambda: r.llen(f"{stack.queue}-interactive") == parts, 30, f"the {parts} interactive part(s) queued")
    finally:
        stack.worker.kill(signal.SIGCONT)
    t.join(120)
    return box["resp"], box["bulk_done_then"]


@pytest.mark.one_backend("postgresql")  # the queues' order: no database in it
def test_interactive_work_is_taken_before_queued_bulk_work(stack: Stack):
    """Forced interleaving: the worker is paused while a 10-batch bulk job and then a 3-part interactive request
    are queued. Resumed, it must take every interactive part before the bulk batches (at most the one bulk
    message it may already hold), not alternate between the queues."""
    tag = uuid.uuid4().hex  # texts no cache holds, so a bulk batch takes real encoder time
    with make_client(stack.db_url, stack.queue, batch_size=48) as c:
        bulk = [
            {"prompt": f"bulk prompt {i} {tag} " * 3, "response": f"bulk response {i} {tag} " * 3} for i in range(480)
        ]
        stack.worker.kill(signal.SIGSTOP)
        try:
            job_id = c.post("/v1/jobs", json={"items": bulk}).json()["job_id"]
            items = [{"prompt": f"live {i} {tag}", "response": f"answer {i}"} for i in range(144)]
            resp, bulk_done_then = _score_while_paused(stack, c, items, job_id, parts=3)
        finally:
            stack.worker.kill(signal.SIGCONT)
        assert resp.status_code == 200, resp.text
        assert bulk_done_then <= 48, f"{bulk_done_then} bulk pairs were scored before the request"
        assert wait_job(c, job_id)["status"] == "succeeded"


@pytest.mark.one_backend("sqlite")  # preemption inside the worker (the test above runs on PostgreSQL)
def test_a_bulk_batch_under_way_stops_for_interactive_work_and_resumes(stack: Stack):
    """Forced interleaving: the worker is paused in the middle of a 256-pair bulk batch (taken, not done), a
    request arrives, and the worker resumes. It must answer the request before it finishes any bulk batch (the
    batch stops between encoder passes and goes back to the queue), and the job must still end with every pair
    scored as it would be alone. Without preemption the request waits for the whole batch."""
    from rewardq.storage.models import Batch

    tag = uuid.uuid4().hex  # texts no cache holds: each bulk batch is 512 encoder inputs, several passes
    bulk = [
        {"prompt": f"bulk question {i} about {tag}, asked at some length", "response": f"a long answer {i} {tag}"}
        for i in range(512)
    ]
    with make_client(stack.db_url, stack.queue, batch_size=256) as c:
        job_id = c.post("/v1/jobs", json={"items": bulk}).json()["job_id"]
        Session = get_sessionmaker(stack.db_url)

        def under_way() -> bool:
            with Session() as s:
                return any(b.started_at is not None for b in s.query(Batch).filter_by(job_id=job_id))

        from rewardq.api.procs import wait_for

        wait_for(under_way, 120, "a bulk batch taken")
        stack.worker.kill(signal.SIGSTOP)
        try:
            with Session() as s:
                assert job_done(s, job_id)[1] == 0, "a bulk batch finished before the pause: texts too short"
            resp, bulk_done_then = _score_while_paused(stack, c, bulk[:16], job_id, parts=1)
        finally:
            stack.worker.kill(signal.SIGCONT)
        assert resp.status_code == 200, resp.text
        assert bulk_done_then == 0, f"{bulk_done_then} bulk pairs were scored before the request"
        assert wait_job(c, job_id)["status"] == "succeeded"
        stored = {x["index"]: x["score"] for x in c.get(f"/v1/jobs/{job_id}/results").json()["results"]}
        assert len(stored) == 512
        for x in resp.json()["results"]:  # the same pairs, scored alone and in a stopped-then-resumed batch
            assert abs(stored[x["index"]] - x["score"]) < 1e-5
        with Session() as s:
            assert s.query(Batch).filter_by(job_id=job_id).count() == 2  # handed back whole, never split


def test_a_protocol_answer_names_the_first_pair_that_could_not_be_scored():
    """/get_reward, vLLM's /score, /classify and /pooling answer all or nothing: Scored.scores raises a 422 naming
    the request's field and the first failed pair's index, with its code and message."""
    from rewardq.api.errors import ApiError
    from rewardq.api.lane import Scored

    ok = {"score": 1.5, "error": None}
    bad = {"score": None, "error": {"code": "empty_response", "message": "the response has no tokens to score"}}
    assert Scored("v", "likelihood", [ok, ok]).scores("query") == [1.5, 1.5]
    with pytest.raises(ApiError) as err:
        Scored("v", "likelihood", [ok, bad, bad]).scores("query")
    assert err.value.status == 422 and [(e.field, e.index, e.message) for e in err.value.errors] == [
        ("query", 1, "empty_response: the response has no tokens to score")
    ]


def test_another_tenants_version_does_not_exist_for_classify_and_pooling(db_url: str, redis_url: str):
    """The vLLM routes resolve ``model`` within the caller's tenant: bob's classifier, by id or by name, is as
    unknown to alice as a version that does not exist (nothing is scored, so no worker is needed)."""
    import uuid

    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from tests.conftest import make_client

    tag = uuid.uuid4().hex[:8]
    with session_scope(db_url) as s:
        registry.register(s, version=f"clf-{tag}", kind="classifier", base_model="t", path=f"clf-{tag}", config={},
                          name=f"bob-rm-{tag}", owner="bob")  # fmt: skip
    key = f"key-alice-{tag}-0123456789abcdef0123"
    with make_client(db_url, f"test-vllm-tenancy-{tag}", api_keys=f"alice:{key}") as c:
        for route in ("/classify", "/pooling", "/v1/classify"):
            for model in (f"clf-{tag}", f"bob-rm-{tag}"):
                resp = c.post(route, json={"model": model, "input": "x"}, headers={"Authorization": f"Bearer {key}"})
                assert resp.status_code == 422, resp.text
                assert resp.json()["errors"][0]["field"] == "model_version" and "unknown" in resp.text
