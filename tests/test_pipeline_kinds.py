"""Every model kind through the whole pipeline (API -> Redis -> Celery worker -> SQL) on SQLite (Triton kernel
under the interpreter) and PostgreSQL (torch path): imported classifier and likelihood models score exactly as
transformers does, and a classifier trained by a run is a tenant's own version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests import tiny_models
from tests.conftest import make_client
from tests.support import Stack, wait_job
from tests.test_model_kinds import PROMPTS, RESPONSES, _direct_classifier, _direct_likelihood

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "bert": tiny_models.save_bert_classifier(root / "bert-rm"),
        "llama-rm": tiny_models.save_llama_classifier(root / "llama-rm"),
        "gpt2": tiny_models.save_gpt2_lm(root / "gpt2"),
        "llama": tiny_models.save_llama_lm(root / "llama"),
    }


def _import(client: TestClient, path: Path, kind: str, **options: object) -> str:
    resp = client.post("/v1/models/import", json={"path": str(path), "kind": kind, **options})
    assert resp.status_code in (200, 201), resp.text
    return str(resp.json()["version"])


def _score(
    client: TestClient, version: str, prompts: list[str], responses: list[str], headers: dict[str, str] | None = None
) -> dict[str, dict]:
    items = [
        {"id": str(i), "prompt": p, "response": r} for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    resp = client.post("/v1/jobs", json={"items": items, "model_version": version}, headers=headers)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"], headers=headers)
    assert job["model_version"] == version and job["status"] == "succeeded", job
    rows = client.get(f"/v1/jobs/{job['job_id']}/results", params={"limit": 1000}, headers=headers).json()["results"]
    return {r["id"]: r for r in rows} | {"_job": job}


@pytest.mark.parametrize(
    ("which", "kind", "options"),
    [
        ("bert", "classifier", {}),
        ("llama-rm", "classifier", {"name": "llama rm"}),
        ("gpt2", "likelihood", {}),
        ("llama", "likelihood", {"reduction": "sum"}),
    ],
)
def test_imported_models_score_exactly_through_the_pipeline(stack: Stack, folders, which, kind, options):
    c = stack.client
    version = _import(c, folders[which], kind, **options)
    assert _import(c, folders[which], kind, **options) == version  # content-addressed: the same version again
    listed = {m["version"]: m for m in c.get("/v1/models").json()["models"]}[version]
    assert listed["kind"] == kind and listed["owner"] == "shared" and not listed["active"]
    assert listed["settings"]["truncation_side"] == "left" and str(folders[which]) not in str(listed)
    got = _score(c, version, PROMPTS, RESPONSES)
    if kind == "classifier":
        want = _direct_classifier(folders[which])
    else:
        want = _direct_likelihood(folders[which], options.get("reduction", "mean"))
    for i, w in enumerate(want):
        row = got[str(i)]
        assert abs(row["score"] - w) < 1e-4 and row["model_version"] == version and row["cos"] == []
        assert (row["n_tokens"] or 0) > 0 if kind == "likelihood" else row["n_tokens"] is None


def test_likelihood_item_without_response_tokens_fails_alone(stack: Stack, folders):
    version = _import(stack.client, folders["gpt2"], "likelihood")
    items = [{"id": "a", "prompt": "q", "response": "an answer"}, {"id": "b", "prompt": "q", "response": ""}]
    resp = stack.client.post("/v1/jobs", json={"items": items, "model_version": version})
    job = wait_job(stack.client, resp.json()["job_id"])
    assert job["status"] == "succeeded" and job["progress"]["done"] == 1 and job["progress"]["failed"] == 1
    assert job["error_counts"] == {"empty_response": 1}


def test_classifier_run_trains_a_cross_encoder_the_tenant_owns(stack: Stack, tmp_path):
    from rewardq.client.samples import load_sts

    sts = load_sts("train", limit=48)
    assert sts is not None
    tenant_key = "clf-owner:key-clf-owner-0123456789abcdef0123456"
    other_key = "clf-other:key-clf-other-0123456789abcdef0123456"
    artifacts = stack.env["REWARDQ_ARTIFACTS_DIR"]
    with make_client(
        stack.db_url,
        stack.queue,
        f"{stack.queue}-training",
        artifacts_dir=artifacts,
        api_keys=f"{tenant_key},{other_key}",
    ) as c:
        me = {"Authorization": "Bearer " + tenant_key.split(":")[1]}
        other = {"Authorization": "Bearer " + other_key.split(":")[1]}
        c.post(
            "/v1/feedback",
            headers=me,
            json=[{"prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in sts],
        )
        resp = c.post(
            "/v1/training-runs",
            headers=me,
            json={"kind": "classifier", "epochs": 1, "batch_size": 8, "max_length": 64, "gate_margin": 0},
        )
        assert resp.status_code == 202, resp.text
        assert resp.json()["params"]["lr"] == 1e-4  # the classifier's defaults, resolved and shown on the run
        run_id = resp.json()["run_id"]
        from rewardq.api.procs import wait_for

        box: dict = {}

        def ended() -> bool:
            box["run"] = c.get(f"/v1/training-runs/{run_id}", headers=me).json()
            return box["run"]["status"] in ("succeeded", "rejected", "failed")

        wait_for(ended, 300, f"classifier run {run_id}")
        run = box["run"]
        assert run["status"] in ("succeeded", "rejected"), run
        version = run["result_version"]
        assert run["metrics"]["candidate"]["pairwise_accuracy"] is not None and run["loss_curve"]
        mine = {m["version"]: m for m in c.get("/v1/models", headers=me).json()["models"]}
        assert mine[version]["kind"] == "classifier" and mine[version]["owner"] == "own"
        assert version not in {m["version"] for m in c.get("/v1/models", headers=other).json()["models"]}
        assert (c.get("/v1/models", headers=me).json()["active"] == version) == (run["status"] == "succeeded")
        # Scored through the pipeline exactly as transformers scores the saved folder.
        items = [{"id": str(i), "prompt": x["prompt"], "response": x["response"]} for i, x in enumerate(sts[:6])]
        resp = c.post("/v1/jobs", headers=me, json={"items": items, "model_version": version})
        job_id = resp.json()["job_id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}", headers=me).json()["status"] == "succeeded", 120, "job")
        rows = c.get(f"/v1/jobs/{job_id}/results", headers=me).json()["results"]
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(artifacts) / version
        tok = AutoTokenizer.from_pretrained(folder)
        net = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        import torch

        for row in rows:
            enc = tok(row["prompt"], row["response"], return_tensors="pt", truncation=True, max_length=64)
            with torch.no_grad():
                assert abs(net(**enc).logits[0, 0].item() - row["score"]) < 1e-4
        resp = c.post("/v1/jobs", headers=other, json={"items": items, "model_version": version})
        assert resp.status_code == 422  # another tenant cannot score with it


def _run(c: TestClient, auth: dict[str, str], body: dict[str, object]) -> dict:
    from rewardq.api.procs import wait_for

    resp = c.post("/v1/training-runs", headers=auth, json=body)
    assert resp.status_code == 202, resp.text
    run_id, box = resp.json()["run_id"], {}

    def ended() -> bool:
        box["run"] = c.get(f"/v1/training-runs/{run_id}", headers=auth).json()
        return box["run"]["status"] in ("succeeded", "rejected", "failed")

    wait_for(ended, 300, f"training run {run_id}")
    return box["run"]


def _tenant_client(stack: Stack, name: str) -> tuple[TestClient, dict[str, str]]:
    key = f"key-{name}-0123456789abcdef0123456789"
    c = make_client(stack.db_url, stack.queue, f"{stack.queue}-training",
                    artifacts_dir=stack.env["REWARDQ_ARTIFACTS_DIR"], api_keys=f"{name}:{key}")  # fmt: skip
    return c, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # registry and runs: both backends elsewhere
def test_a_sentence_transformers_encoder_imports_scores_and_trains_through_the_pipeline(stack: Stack, tmp_path):
    """Issue #39, item 3: a sentence-transformers folder (CLS pooling) is a sim-exp version: scored through the
    pipeline as SentenceTransformer.encode + the formula, and a run started from it keeps its encoder and pooling."""
    import json

    from rewardq.client.samples import load_sts
    from tests.test_sim_exp_import import PROMPTS, RESPONSES, _sentence_transformers

    folder = tiny_models.save_st_encoder(tmp_path / "st-cls", "cls")
    version = _import(stack.client, folder, "sim_exp")
    got = _score(stack.client, version, PROMPTS, RESPONSES)
    for i, want in enumerate(_sentence_transformers(folder)):
        assert abs(got[str(i)]["score"] - want) < 1e-5, (got[str(i)], want)
    listed = {m["version"]: m for m in stack.client.get("/v1/models").json()["models"]}[version]
    assert listed["settings"] == {"max_length": 64, "pooling": "cls"} and listed["kind"] == "sim_exp"

    sts = load_sts("train", limit=48)
    assert sts is not None
    c, me = _tenant_client(stack, "enc-user")
    with c:
        rows = [{"prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in sts]
        assert c.post("/v1/feedback", headers=me, json=rows).status_code == 201
        active = c.get("/v1/models", headers=me).json()["active"]
        run = _run(c, me, {"start_version": version, "epochs": 1, "train_layers": 1, "gate_margin": 0})
        assert run["status"] in ("succeeded", "rejected"), run
        assert run["start_version"] == version and run["base_version"] == active  # trained from; gated against
        config = json.loads(
            (Path(stack.env["REWARDQ_ARTIFACTS_DIR"]) / run["result_version"] / "rewardq.json").read_text()
        )
        assert config["encoder"] and config["pooling"] == "cls" and config["max_length"] == 64
        assert config["params"]["start_version"] == version
        trained = _score(c, run["result_version"], PROMPTS, RESPONSES, me)  # its own encoder copy, CLS pooled
        assert trained["_job"]["status"] == "succeeded"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_imported_classifier_is_retrained_from_its_own_weights_and_promoted(stack: Stack, folders):
    """Issue #39, item 2: with an imported TRL-format classifier active, a classifier run fine-tunes it (not a new
    cross-encoder on MiniLM), the gate promotes it, and its scores move toward the tenant's preferences."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    imported = _import(stack.client, folders["bert"], "classifier")
    prefs = [
        {"prompt": f"question number {i}", "chosen": f"a careful helpful answer {i}", "rejected": f"go away {i}"}
        for i in range(96)
    ]

    def margins(folder: Path) -> list[float]:
        tok = AutoTokenizer.from_pretrained(folder)
        net = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            score = [
                net(**tok([p["prompt"]] * 2, [p["chosen"], p["rejected"]], return_tensors="pt", padding=True))
                .logits[:, 0]
                .tolist()
                for p in prefs
            ]
        return [ch - rj for ch, rj in score]

    c, me = _tenant_client(stack, "clf-retrainer")
    with c:
        assert c.post("/v1/feedback", headers=me, json=prefs).status_code == 201
        assert c.post(f"/v1/models/{imported}/activate", headers=me).json()["active"] == imported
        body = {"kind": "classifier", "epochs": 6, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2, "gate_margin": 0}
        run = _run(c, me, body)
        assert run["status"] == "succeeded", run
        assert run["start_version"] == imported and run["base_version"] == imported
        new = run["result_version"]
        assert c.get("/v1/models", headers=me).json()["active"] == new
        before, after = margins(folders["bert"]), margins(Path(stack.env["REWARDQ_ARTIFACTS_DIR"]) / new)
        # Chosen above rejected: about half the pairs before (a random head), nearly all of them after.
        assert sum(m > 0 for m in after) >= 0.95 * len(prefs) > sum(m > 0 for m in before) + 0.2 * len(prefs)
        assert sum(after) > sum(before), (sum(before), sum(after))
        settings = {m["version"]: m for m in c.get("/v1/models", headers=me).json()["models"]}[new]["settings"]
        assert settings["max_length"] == 512 and settings["truncation_side"] == "left"  # the imported version's
