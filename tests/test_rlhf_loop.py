"""The RLHF loop against a live API process and the stack's worker: OpenRLHF's own reward client on /get_reward, a
real TRL GRPOTrainer rewarded by rewardq, vLLM batch files, and the data formats RLHF teams keep pairs in."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import SECRET, Live

pytestmark = pytest.mark.slow

PAIRS = [
    ("What is the capital of France? ", "Paris is the capital."),
    ("Tell me a joke. ", "No."),
    ("2+2? ", "4"),
    ("2+2? ", "5"),
]


def _lane_scores(live: Live, pairs: list[tuple[str, str]]) -> list[float]:
    with live.client() as c:
        return [r["score"] for r in c.score(pairs)["results"]]


@pytest.mark.one_backend("postgresql")  # OpenRLHF's client and the protocol; storage runs on both elsewhere
def test_openrlhf_reward_client_gets_rewardq_scores(live: Live):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    host = live.url.removeprefix("http://")
    queries, prompts = [p + r for p, r in PAIRS], [p for p, _ in PAIRS]
    # OpenRLHF's own HTTP path: the key rides in the URL's credentials (it sends no header of its own).
    executor = SingleTurnAgentExecutor(remote_rm_url=f"http://rewardq:{SECRET}@{host}/get_reward")
    [reply] = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, [None] * len(queries)))
    want = _lane_scores(live, PAIRS)
    assert reply["rewards"] == reply["scores"] and len(reply["rewards"]) == len(PAIRS)
    assert max(abs(a - b) for a, b in zip(reply["rewards"], want, strict=True)) < 1e-6
    assert reply["extra_logs"]["rewardq_truncated"] == [0.0] * len(PAIRS)
    # The prefixed route, and no key: 401 (never open by default).
    resp = httpx.post(f"{live.url}/openrlhf/get_reward", json={"query": queries, "prompts": prompts})
    assert resp.status_code == 401
    resp = httpx.post(
        f"{live.url}/openrlhf/get_reward", json={"query": queries, "prompts": prompts}, auth=("anyone", SECRET)
    )
    assert resp.status_code == 200 and resp.json()["rewards"] == reply["rewards"]
    resp = httpx.post(f"{live.url}/get_reward", json={"query": ["abc"], "prompts": ["zzz"]}, auth=("x", SECRET))
    assert resp.status_code == 422 and resp.json()["errors"][0] == {
        "field": "prompts",
        "index": 0,
        "message": "the prompt is not part of its query",
    }


def _tiny_policy(path: Path) -> Path:
    from tests.tiny_models import save_gpt2_lm

    return save_gpt2_lm(path, seed=1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing of it is stored: one database is enough
def test_trl_grpo_trainer_logs_rewardq_rewards(live: Live, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rewardq.api.integrations import trl_reward_func

    policy = _tiny_policy(tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = Dataset.from_list([{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-5,
        seed=0,
        dataloader_num_workers=0,
    )
    reward = trl_reward_func(live.url, SECRET, batch_size=3)  # 3: each call is split into several requests
    trainer = GRPOTrainer(
        model=str(policy), reward_funcs=[reward], args=args, train_dataset=prompts, processing_class=tokenizer
    )
    trainer.train()
    logged = trainer._logs  # the last generation batch TRL logged: prompts, completions, per-function rewards
    pairs = list(zip(logged["prompt"], logged["completion"], strict=True))
    rewards = list(logged["rewards"]["rewardq"])
    assert len(pairs) == len(rewards) >= 4
    want = _lane_scores(live, [(p, c) for p, c in pairs])
    assert max(abs(a - b) for a, b in zip(rewards, want, strict=True)) < 1e-5
    means = [h["rewards/rewardq/mean"] for h in trainer.state.log_history if "rewards/rewardq/mean" in h]
    assert len(means) == 2 and abs(means[-1] - sum(want) / len(want)) < 1e-5


def test_trl_conversational_format(live: Live):
    from rewardq.api.integrations import trl_reward_func

    reward = trl_reward_func(live.url, SECRET)
    convo = reward(
        prompts=[[{"role": "user", "content": p}] for p, _ in PAIRS],
        completions=[[{"role": "assistant", "content": r}] for _, r in PAIRS],
    )
    plain = reward(prompts=[p for p, _ in PAIRS], completions=[r for _, r in PAIRS])
    assert convo == plain and len(plain) == len(PAIRS)


def test_normalised_rewards_on_request(live: Live):
    """Issue #38, item 4: the README recommends score_z for RLHF, but /get_reward, vLLM's /score and the TRL reward
    function returned raw scores only. normalize=z asks each for the z-score /v1/score reports beside each score."""
    from rewardq.api.integrations import trl_reward_func

    with live.client() as c:
        want = [r["score_z"] for r in c.score(PAIRS)["results"]]
    assert all(z is not None for z in want) and len(set(want)) > 1
    auth = ("rewardq", SECRET)
    body = {"query": [p + r for p, r in PAIRS], "prompts": [p for p, _ in PAIRS]}
    got = httpx.post(f"{live.url}/get_reward", params={"normalize": "z"}, json=body, auth=auth).json()["rewards"]
    raw = httpx.post(f"{live.url}/get_reward", json=body, auth=auth).json()["rewards"]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6 and got != raw
    body = {"text_1": [p for p, _ in PAIRS], "text_2": [r for _, r in PAIRS]}
    data = httpx.post(f"{live.url}/score", params={"normalize": "z"}, json=body, auth=auth).json()["data"]
    assert max(abs(d["score"] - w) for d, w in zip(data, want, strict=True)) < 1e-6
    reward = trl_reward_func(live.url, SECRET, normalize="z")
    assert max(abs(a - b) for a, b in zip(reward(prompts=[p for p, _ in PAIRS], completions=[r for _, r in PAIRS]),
                                          want, strict=True)) < 1e-6  # fmt: skip
    bad = httpx.post(f"{live.url}/score", params={"normalize": "minmax"}, json=body, auth=auth)
    assert bad.status_code == 422


def test_v1_score_takes_vllms_body_beside_rewardqs_own(live: Live):
    """Issue #38, item 3: vLLM serves its score API at /v1/score too, and rewardq refused its body there
    (``model: unknown field``). A body with text_1/text_2 (and no items) is vLLM's: answered in vLLM's ScoreResponse
    shape, as POST /score answers it; {"items": [...]} stays rewardq's own."""
    auth = ("rewardq", SECRET)
    body = {"text_1": [p for p, _ in PAIRS], "text_2": [r for _, r in PAIRS]}
    v1 = httpx.post(f"{live.url}/v1/score", json=body, auth=auth)
    plain = httpx.post(f"{live.url}/score", json=body, auth=auth)
    assert v1.status_code == plain.status_code == 200, v1.text
    got, want = v1.json(), plain.json()
    # vLLM's ScoreResponse: id, object "list", created, model, data [{index, object "score", score}], usage.
    assert set(got) == {"id", "object", "created", "model", "data", "usage"} and got["object"] == "list"
    assert set(got["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    assert [set(d) for d in got["data"]] == [{"index", "object", "score"}] * len(PAIRS)
    assert [d["score"] for d in got["data"]] == [d["score"] for d in want["data"]] == _lane_scores(live, PAIRS)
    one_to_many = httpx.post(f"{live.url}/v1/score", json={"text_1": "2+2? ", "text_2": ["4", "5"]}, auth=auth)
    assert [d["score"] for d in one_to_many.json()["data"]] == _lane_scores(live, PAIRS[2:])
    both = httpx.post(f"{live.url}/v1/score", json={"items": [], "text_1": "x", "text_2": "y"}, auth=auth)
    assert both.status_code == 422  # rewardq's shape, with unknown fields: refused


def _cli(live: Live, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "REWARDQ_API_URL": live.url, "REWARDQ_API_KEY": SECRET}
    return subprocess.run(
        [sys.executable, "-m", "rewardq", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def _results(live: Live, job_id: str) -> dict[str, dict]:
    with live.client() as c:
        return {r["id"]: r for r in c.results(job_id)}


def test_openai_batch_file_in_and_out(live: Live, tmp_path: Path):
    requests = [
        {
            "custom_id": "one-to-many",
            "method": "POST",
            "url": "/score",
            "body": {"text_1": "What is the capital of France?", "text_2": ["Paris.", "Berlin.", "Rome."]},
        },
        {
            "custom_id": "zipped",
            "method": "POST",
            "url": "/score",
            "body": {"text_1": ["2+2?", "3+3?"], "text_2": ["4", "6"]},
        },
    ]
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    out = _cli(live, "submit", str(src), "--wait")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    dest = tmp_path / "out.jsonl"
    assert _cli(live, "results", job_id, "--format", "openai-batch", "-o", str(dest)).returncode == 0
    lines = [json.loads(x) for x in dest.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["one-to-many", "zipped"] and all(x["error"] is None for x in lines)
    body = lines[0]["response"]["body"]
    assert lines[0]["response"]["status_code"] == 200 and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    with live.client() as c:
        direct = httpx.post(
            f"{live.url}/score", headers={"Authorization": f"Bearer {SECRET}"}, json=requests[0]["body"]
        ).json()
        assert [d["score"] for d in body["data"]] == [d["score"] for d in direct["data"]]
        assert c.job(job_id)["progress"]["done"] == 5


def test_data_formats_in_and_parquet_out(live: Live, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"q": p, "a": r, "key": f"k{i}"} for i, (p, r) in enumerate(PAIRS)]
    want = {f"k{i}": s for i, s in enumerate(_lane_scores(live, PAIRS))}
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("key,q,a\n" + "".join(f'{x["key"]},"{x["q"]}","{x["a"]}"\n' for x in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "pairs.json").write_text(json.dumps(rows, indent=2))  # pretty-printed: a JSON array
    conv = [
        {"key": x["key"], "messages": [{"role": "user", "content": x["q"]}, {"role": "assistant", "content": x["a"]}]}
        for x in rows
    ]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "conversations.parquet")
    cases = [
        (csv_path, "a"),
        (tmp_path / "pairs.parquet", "a"),
        (tmp_path / "hf", "a"),
        (tmp_path / "pairs.json", "a"),
        (tmp_path / "conversations.parquet", "messages"),
    ]
    for path, response_col in cases:
        out = _cli(
            live, "submit", str(path), "--prompt-col", "q", "--response-col", response_col, "--id-col", "key", "--wait"
        )
        assert out.returncode == 0, (path, out.stderr[-2000:])
        got = _results(live, out.stdout.splitlines()[0].strip())
        assert {k: r["score"] for k, r in got.items()} == pytest.approx(want, abs=1e-6), path
    dest = tmp_path / "out.parquet"
    assert (
        _cli(live, "results", out.stdout.splitlines()[0].strip(), "--format", "parquet", "-o", str(dest)).returncode
        == 0
    )
    table = pq.read_table(dest)
    assert table.num_rows == len(PAIRS) and set(table.column("id").to_pylist()) == set(want)
    bad = tmp_path / "notes.txt"
    bad.write_text("just some text\n")
    out = _cli(live, "submit", str(bad))
    assert out.returncode != 0 and "JSON Lines, a JSON array, CSV, Parquet" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing of it is stored: one database is enough
def test_get_reward_scores_a_query_as_openrlhf_serve_rm_does(live: Live, tmp_path: Path):
    """Issue #38, item 2: OpenRLHF's serve_rm tokenizes each query as it is and ignores prompts; rewardq required
    prompts and templated the pair again, so an already-templated query scored 1.950 against 1.981. Now a query
    alone, or one whose prompt went through the template already, scores as serve_rm scores it; a plain prompt
    still gets the model's template (TRL's input)."""
    from transformers import AutoTokenizer

    from rewardq.workers.models.classifier import chat_messages
    from tests.test_openrlhf_models import serve_rm
    from tests.tiny_models import save_openrlhf_rm

    folder = save_openrlhf_rm(tmp_path / "rm")
    resp = live.stack.client.post(
        "/v1/models/import", json={"path": str(folder), "kind": "classifier", "name": f"rm-{uuid.uuid4().hex[:8]}"}
    )
    assert resp.status_code in (200, 201), resp.text
    version, auth = resp.json()["version"], ("rewardq", SECRET)
    tok = AutoTokenizer.from_pretrained(folder)
    templated = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p, _ in PAIRS]  # fmt: skip
    queries = [t + r for t, (_, r) in zip(templated, PAIRS, strict=True)]  # OpenRLHF --apply_chat_template

    def rewards(body: dict[str, object]) -> list[float]:
        url = f"{live.url}/get_reward"
        got = httpx.post(url, params={"model_version": version}, json=body, auth=auth, timeout=120)  # a first load
        assert got.status_code == 200, got.text
        return list(got.json()["rewards"])

    want = serve_rm(folder, queries, normalize=False)
    for body in ({"query": queries}, {"query": queries, "prompts": templated}):
        assert max(abs(a - b) for a, b in zip(rewards(body), want, strict=True)) < 1e-5
    plain = rewards({"query": [p + r for p, r in PAIRS], "prompts": [p for p, _ in PAIRS]})
    trl = [tok.apply_chat_template(chat_messages(p, r), tokenize=False) for p, r in PAIRS]
    assert max(abs(a - b) for a, b in zip(plain, serve_rm(folder, trl, normalize=False), strict=True)) < 1e-5
    # A sim-exp version scores a pair: a query alone is refused with what to send.
    resp = httpx.post(f"{live.url}/get_reward", json={"query": queries}, auth=auth, timeout=60)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "prompts", resp.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing of it is stored: one database is enough
def test_vllm_classify_and_pooling_in_vllms_shapes(live: Live, tmp_path: Path):
    """Issue #38, item 3: /classify and /pooling (what verl's reward loop calls on a vLLM reward server) for a
    classifier version: each input text scored as it is, in the shapes of vLLM's protocol definitions
    (ClassificationResponse: data [{index, label, probs, num_classes}]; PoolingResponse: data [{index, object
    "pooling", data}]; UsageInfo), equal to transformers on the same text."""
    import math

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.tiny_models import save_llama_classifier

    folder = save_llama_classifier(tmp_path / "rm")
    resp = live.stack.client.post(
        "/v1/models/import", json={"path": str(folder), "kind": "classifier", "name": f"rm-{uuid.uuid4().hex[:8]}"}
    )
    assert resp.status_code in (200, 201), resp.text
    version, auth = resp.json()["version"], ("rewardq", SECRET)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in PAIRS]  # fmt: skip
    net = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        want = [net(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item() for t in texts]

    def post(route: str, body: dict[str, object]) -> dict:
        got = httpx.post(f"{live.url}{route}", json={"model": version, **body}, auth=auth, timeout=120)
        assert got.status_code == 200, got.text
        doc = got.json()
        assert set(doc) == {"id", "object", "created", "model", "data", "usage"} and doc["object"] == "list"
        assert doc["model"] == version and doc["usage"]["prompt_tokens"] > 0
        assert set(doc["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
        return doc

    classified = post("/classify", {"input": texts})
    assert classified["id"].startswith("classify-")
    assert [set(d) for d in classified["data"]] == [{"index", "label", "probs", "num_classes"}] * len(texts)
    assert [d["index"] for d in classified["data"]] == list(range(len(texts)))
    probs = [d["probs"][0] for d in classified["data"]]
    assert max(abs(p - 1 / (1 + math.exp(-w))) for p, w in zip(probs, want, strict=True)) < 1e-5
    raw = post("/v1/classify", {"input": texts, "use_activation": False})["data"]
    assert max(abs(d["probs"][0] - w) for d, w in zip(raw, want, strict=True)) < 1e-4
    pooled = post("/pooling", {"input": texts[0]})  # one text: one row
    assert pooled["id"].startswith("pool-") and [set(d) for d in pooled["data"]] == [{"index", "object", "data"}]
    assert pooled["data"][0]["object"] == "pooling" and abs(pooled["data"][0]["data"][0] - want[0]) < 1e-4
    # vLLM's chat form: one conversation, through the model's template (the same text as texts[0]).
    chat = [{"role": "user", "content": PAIRS[0][0]}, {"role": "assistant", "content": PAIRS[0][1]}]
    assert abs(post("/classify", {"messages": chat, "use_activation": False})["data"][0]["probs"][0] - want[0]) < 1e-4
    # The default version is sim-exp: it scores pairs, so a text alone is refused with where to send pairs.
    resp = httpx.post(f"{live.url}/classify", json={"input": texts}, auth=auth, timeout=60)
    assert resp.status_code == 422 and "/score" in resp.json()["errors"][0]["message"]
    resp = httpx.post(f"{live.url}/pooling", json={"model": version, "input": [1, 2, 3]}, auth=auth, timeout=60)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "input"
    assert httpx.post(f"{live.url}/classify", json={"input": texts}, timeout=60).status_code == 401


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # what is stored is the prompt text: one database
def test_conversations_reach_a_chat_reward_model_through_the_pipeline(live: Live, tmp_path: Path):
    """Issue #38, item 1: system prompts and multi-turn conversations, from the TRL reward function and in a job's
    items, are scored by the reward model's own chat template over the real conversation (within 1e-4 of
    transformers); the results show the conversation."""
    from rewardq.api.integrations import trl_reward_func
    from tests.support import wait_job
    from tests.test_conversations import ANSWER, SYSTEM, TURNS, transformers_reward
    from tests.tiny_models import save_llama_classifier

    folder = save_llama_classifier(tmp_path / "rm")
    resp = live.stack.client.post(
        "/v1/models/import", json={"path": str(folder), "kind": "classifier", "name": f"rm-{uuid.uuid4().hex[:8]}"}
    )
    assert resp.status_code in (200, 201), resp.text
    version = resp.json()["version"]
    prompts = [TURNS, [SYSTEM, {"role": "user", "content": "Tell me a joke."}]]
    completions = [[{"role": "assistant", "content": ANSWER}], [{"role": "assistant", "content": "No."}]]
    want = [transformers_reward(folder, p + c) for p, c in zip(prompts, completions, strict=True)]
    reward = trl_reward_func(live.url, SECRET, model_version=version)
    got = reward(prompts=prompts, completions=completions)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, (got, want)

    headers = {"Authorization": f"Bearer {SECRET}"}
    items = [{"id": "a", "messages": [*TURNS, {"role": "assistant", "content": ANSWER}]},
             {"id": "b", "prompt": prompts[1], "response": "No."}]  # fmt: skip
    with httpx.Client(base_url=live.url, headers=headers, timeout=60) as c:
        resp = c.post("/v1/jobs", json={"items": items, "model_version": version})
        assert resp.status_code == 202, resp.text
        job = wait_job(c, resp.json()["job_id"])  # type: ignore[arg-type]
        assert job["status"] == "succeeded", job
        rows = {r["id"]: r for r in c.get(f"/v1/jobs/{job['job_id']}/results").json()["results"]}
    assert abs(rows["a"]["score"] - want[0]) < 1e-4 and abs(rows["b"]["score"] - want[1]) < 1e-4
    assert json.loads(rows["a"]["prompt"]) == TURNS and rows["a"]["response"] == ANSWER


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the client's side; storage: tests/test_ensembles.py
def test_trl_reward_weights_score_one_ensemble(live: Live):
    """Issue #38, item 6: TRL's reward_weights as one rewardq ensemble. The base and a version trained on its encoder
    (heads only) share one encoding on the worker; the reward is their weighted sum, and /v1/score through the
    Python client keeps each member's score."""
    import torch

    from rewardq.api.integrations import trl_reward_func
    from rewardq.storage import registry
    from rewardq.storage.db import get_sessionmaker
    from rewardq.workers import artifacts
    from rewardq.workers.models.sim_exp import Heads, SimExpModel
    from rewardq.workers.registry import resolve_encoder

    path, _ = resolve_encoder("")
    model = SimExpModel("heads", path)
    torch.manual_seed(1)
    model.heads = Heads(model.dim, n_heads=2, trained=True, init_noise=0.5)
    version, where, config = artifacts.save_version(
        model, Path(live.stack.env["REWARDQ_ARTIFACTS_DIR"]), base_model="MiniLM", base_encoder=None,
        train_layers=0, params={},
    )  # fmt: skip
    with get_sessionmaker(live.stack.db_url)() as s:
        registry.register(s, version=version, kind="sim_exp", base_model="MiniLM", path=where.name, config=config)
        base = registry.default_version(s)
        s.commit()
    assert base is not None and config["encoder"] is None  # the base's encoder: the two share it
    weights = {base: 0.25, version: 1.0}
    reward = trl_reward_func(live.url, SECRET, reward_weights=weights)
    got = reward(prompts=[p for p, _ in PAIRS], completions=[r for _, r in PAIRS])
    with live.client() as c:
        alone = {v: [r["score"] for r in c.score(PAIRS, model_version=v)["results"]] for v in weights}
        mixed = c.score(PAIRS, model_version=weights)
    for i, g in enumerate(got):
        assert abs(g - (0.25 * alone[base][i] + alone[version][i])) < 1e-5
        parts = mixed["results"][i]["components"]
        assert [p["version"] for p in parts] == [base, version]
        assert [p["score"] for p in parts] == pytest.approx([alone[base][i], alone[version][i]], abs=1e-5)
    assert mixed["kind"] == "ensemble" and len(set(got)) > 1
    with pytest.raises(ValueError, match="not both"):
        trl_reward_func(live.url, SECRET, model_version=base, reward_weights=weights)
