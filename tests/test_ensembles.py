"""Weighted reward ensembles (issue #38, item 6): a tenant's version that sums several versions, R = sum w_m R_m.

Through the whole pipeline (API -> Redis -> Celery worker -> SQL): two imported classifiers and the sim-exp base,
every member score kept with the result and equal to what the member scores alone; sim-exp members on one encoder
encode a batch once; the registry refuses what cannot be an ensemble, and never deletes a version one names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests import tiny_models
from tests.support import Stack
from tests.test_model_kinds import PROMPTS, RESPONSES, _direct_classifier
from tests.test_pipeline_kinds import _import, _score, _tenant_client


def _create(client, members: list[tuple[str, float]], name: str | None = None, headers=None):  # type: ignore[no-untyped-def]
    body: dict[str, object] = {"members": [{"version": v, "weight": w} for v, w in members]}
    if name:
        body["name"] = name
    return client.post("/v1/models/ensemble", json=body, headers=headers)


@pytest.mark.one_backend("postgresql")  # the ensemble's scores; its registry rows run on both below
@pytest.mark.slow
def test_two_imported_classifiers_and_the_sim_exp_base_as_one_ensemble(stack: Stack, tmp_path: Path):
    c = stack.client
    bert = _import(c, tiny_models.save_bert_classifier(tmp_path / "bert-rm", seed=1), "classifier", name="ens-bert")
    llama = _import(c, tiny_models.save_llama_classifier(tmp_path / "llama-rm", seed=2), "classifier", name="ens-ll")
    base = c.get("/v1/models").json()["default"]
    members = [("ens-bert", 0.5), (llama, -0.25), (base, 2.0)]

    resp = _create(c, members, name="mix")
    assert resp.status_code == 201, resp.text
    mix = resp.json()
    assert mix["kind"] == "ensemble" and mix["owner"] == "own" and mix["name"] == "mix"
    weights = [0.5, -0.25, 2.0]
    want = [{"version": v, "weight": w} for v, w in zip([bert, llama, base], weights, strict=True)]
    assert mix["settings"]["members"] == want
    again = _create(c, members, name="mix")  # the same members and weights: the same version
    assert again.status_code == 200 and again.json()["version"] == mix["version"]

    named = c.post("/v1/jobs", json={"items": [{"prompt": "q", "response": "a"}], "model_version": "mix"})
    assert named.status_code == 202 and named.json()["model_version"] == mix["version"]  # by name, as any version
    got = _score(c, mix["version"], PROMPTS, RESPONSES)
    alone = {
        bert: _direct_classifier(tmp_path / "bert-rm"),
        llama: _direct_classifier(tmp_path / "llama-rm"),
        base: [r["score"] for _, r in sorted(_score(c, base, PROMPTS, RESPONSES).items()) if _ != "_job"],
    }
    for i in range(len(PROMPTS)):
        row = got[str(i)]
        parts = row["components"]
        assert [p["version"] for p in parts] == [bert, llama, base] and [p["weight"] for p in parts] == weights
        for p in parts:  # each member scores as it does alone (transformers for the classifiers)
            assert abs(p["score"] - alone[p["version"]][i]) < 1e-4, (p, alone[p["version"]][i])
        assert math.isclose(row["score"], sum(p["weight"] * p["score"] for p in parts), abs_tol=1e-9)
        assert row["cos"] == [] and row["model_version"] == mix["version"]

    # Every export carries the components: JSON Lines, CSV (a JSON cell) and Parquet.
    job_id = got["_job"]["job_id"]
    lines = c.get(f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}).text.splitlines()
    assert json.loads(lines[0])["components"][2]["version"] == base
    csv_text = c.get(f"/v1/jobs/{job_id}/results", params={"format": "csv"}).text
    assert '""version"": ' in csv_text and "components" in csv_text.splitlines()[0]
    import pyarrow.parquet as pq

    from rewardq.client.formats import write_parquet

    write_parquet(lines, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert table[0]["components"] == json.loads(lines[0])["components"]

    # The interactive lane answers with the components too, and the protocols with the weighted sum.
    one = [{"prompt": PROMPTS[0], "response": RESPONSES[0]}]
    now = c.post("/v1/score", json={"items": one, "model_version": "mix"})
    assert now.status_code == 200, now.text
    assert now.json()["kind"] == "ensemble" and abs(now.json()["results"][0]["score"] - got["0"]["score"]) < 1e-5
    assert len(now.json()["results"][0]["components"]) == 3
    body = {"query": [PROMPTS[0] + RESPONSES[0]], "prompts": [PROMPTS[0]]}
    rm = c.post("/get_reward", json=body, params={"model_version": "mix"})
    assert rm.status_code == 200, rm.text
    assert abs(rm.json()["rewards"][0] - got["0"]["score"]) < 1e-5

    # Another tenant neither sees it nor can name it, nor build one on it.
    other, auth = _tenant_client(stack, "ens-other")
    with other:
        assert all(m["version"] != mix["version"] for m in other.get("/v1/models", headers=auth).json()["models"])
        items = [{"prompt": "q", "response": "a"}]
        refused = other.post("/v1/jobs", headers=auth, json={"items": items, "model_version": mix["version"]})
        assert refused.status_code == 422
        nested = _create(other, [(mix["version"], 1.0), (bert, 1.0)], headers=auth)
        assert nested.status_code == 422 and "unknown model version" in nested.text


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("nope", 1.0), ("*base*", 1.0)], "unknown model version 'nope'"),
        ([("*base*", 1.0), ("*base*", 2.0)], "is named twice"),
        ([("*base*", 1.0), ("*other*", 0.0)], "has weight 0: leave it out"),
        ([("*base*", 1.0), ("*other*", 1e9)], "less than or equal to 1000000"),
        ([("*base*", 1.0)], "at least 2"),
        ([("*base*", 1.0)] * 9, "at most 8"),
    ],
)
def test_what_cannot_be_an_ensemble_is_refused(api, db_url, members, message):
    base = api.get("/v1/models").json()["default"]
    other = _second_version(db_url)
    named = [(base if v == "*base*" else other if v == "*other*" else v, w) for v, w in members]
    resp = _create(api, named)
    assert resp.status_code == 422 and message in resp.text, resp.text


def test_an_ensemble_cannot_be_a_member_and_names_are_unique(api, db_url):
    base, other = api.get("/v1/models").json()["default"], _second_version(db_url)
    first = _create(api, [(base, 1.0), (other, 0.5)], name="pair")
    assert first.status_code in (200, 201), first.text
    nested = _create(api, [("pair", 1.0), (base, 1.0)])
    assert nested.status_code == 422 and "is an ensemble" in nested.text
    clash = _create(api, [(base, 1.0), (other, 0.25)], name="pair")
    assert clash.status_code == 409 and "already named 'pair'" in clash.text
    renamed = _create(api, [(base, 1.0), (other, 0.5)], name="another")
    assert renamed.status_code == 409 and "exists already" in renamed.text
    reordered = _create(api, [(other, 0.5), (base, 1.0)])  # the same members and weights in another order
    assert reordered.status_code == 200 and reordered.json()["version"] == first.json()["version"]
    bad = api.post(
        "/v1/models/ensemble",
        content=json.dumps({"members": [{"version": base, "weight": math.nan}, {"version": other, "weight": 1}]}),
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 422
    huge = json.dumps({"members": [{"version": base, "weight": 1}] * 2, "name": "x" * (70 << 10)})
    too_big = api.post("/v1/models/ensemble", content=huge, headers={"content-type": "application/json"})
    assert too_big.status_code == 413  # read no further than 64 KiB: never parsed
    form = api.post("/v1/models/ensemble", content="members=a", headers={"content-type": "text/plain"})
    assert form.status_code == 415


def test_a_member_of_an_ensemble_is_never_collected(api, db_url):
    from rewardq.storage import lifecycle
    from rewardq.storage.db import get_sessionmaker

    base, other = api.get("/v1/models").json()["default"], _second_version(db_url)
    made = _create(api, [(base, 1.0), (other, 3.0)])
    assert made.status_code in (200, 201)
    with get_sessionmaker(db_url)() as s:
        assert not lifecycle.delete_version(s, version=other)  # the ensemble names it
        s.commit()
    assert any(m["version"] == other for m in api.get("/v1/models").json()["models"])


def test_own_ensembles_are_deleted_unless_in_use_and_runs_refuse_an_active_one(api, db_url):
    base, other = api.get("/v1/models").json()["default"], _second_version(db_url)
    made = _create(api, [(base, 1.0), (other, -1.0)], name="to-go")
    assert made.status_code in (200, 201), made.text
    version = made.json()["version"]
    assert api.delete(f"/v1/models/{base}").status_code == 409  # not an ensemble of yours
    assert api.delete("/v1/models/nope").status_code == 404

    # While it is active, no run: the gate would replace it with one model.
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "rating": i % 5} for i in range(4)]
    assert api.post("/v1/feedback", json=rows).status_code == 201
    assert api.post(f"/v1/models/{version}/activate").status_code == 200
    try:
        run = api.post("/v1/training-runs", json={})
        assert run.status_code == 409 and "is an ensemble" in run.text, run.text
        assert api.delete("/v1/models/to-go").status_code == 409  # active
    finally:
        api.delete("/v1/models/active")
    resp = api.post("/v1/jobs", json={"items": [{"prompt": "q", "response": "a"}], "model_version": version})
    assert resp.status_code == 202
    in_use = api.delete("/v1/models/to-go")
    assert in_use.status_code == 409 and "job" in in_use.text  # the job keeps its version
    assert api.delete(f"/v1/jobs/{resp.json()['job_id']}").status_code == 200
    assert api.delete("/v1/models/to-go").status_code == 200
    assert all(m["version"] != version for m in api.get("/v1/models").json()["models"])
    from sqlalchemy import select

    from rewardq.storage.db import get_sessionmaker
    from rewardq.storage.models import EnsembleMember

    with get_sessionmaker(db_url)() as s:  # its members are free again (the rows went with it)
        assert s.scalars(select(EnsembleMember).where(EnsembleMember.ensemble == version)).all() == []


def _second_version(db_url: str) -> str:
    """A second shared sim-exp version to combine with the base (rows only: nothing here scores with it)."""
    from rewardq.storage import registry
    from rewardq.storage.db import get_sessionmaker

    with get_sessionmaker(db_url)() as s:
        registry.register(s, version="ens-test-other", kind="sim_exp", base_model="x", path=None, config={})
        s.commit()
    return "ens-test-other"


def test_sim_exp_members_on_one_encoder_encode_a_batch_once(tmp_path: Path):
    """The base and a version trained on top of its encoder (heads only) share one encoding of the batch: the
    ensemble encodes as many tokens as one member alone, and each member's score is the one it gives alone."""
    from rewardq.workers.models.ensemble import EnsembleModel, _heads_only
    from rewardq.workers.models.sim_exp import Heads, SimExpModel
    from rewardq.workers.registry import resolve_encoder

    path, _ = resolve_encoder("")
    base = SimExpModel("base", path)
    torch.manual_seed(0)
    tuned = SimExpModel("tuned", path, heads=Heads(base.dim, n_heads=3, trained=True, init_noise=0.3))
    tuned.heads.alpha.data.uniform_(0.5, 2.0)
    want_base, want_tuned = base.score(PROMPTS, RESPONSES), tuned.score(PROMPTS, RESPONSES)
    alone = base.take_stats()
    tuned.take_stats()
    assert base.shares_with == tuned.shares_with

    ensemble = EnsembleModel("ens", ["base", "tuned"], [1.0, 0.5], [base, _heads_only(base, tuned)])
    assert len(ensemble.groups) == 1 and len(ensemble.groups[0].heads) == 2  # one encoder, two heads
    assert ensemble.n_models == 1  # as the worker's model cache counts it
    got = ensemble.score(PROMPTS, RESPONSES)
    stats = ensemble.take_stats()
    assert stats["tokens"] == alone["tokens"] and stats["encoder_batches"] == alone["encoder_batches"]
    assert got.components is not None
    for i, (a, b) in enumerate(zip(want_base.reward, want_tuned.reward, strict=True)):
        assert got.components[i] == pytest.approx([a, b], abs=1e-6)
        assert got.reward[i] == pytest.approx(a + 0.5 * b, abs=1e-6)


@pytest.mark.one_backend("sqlite")  # the registry's rows only; the loading is the same on either
def test_an_ensembles_members_on_one_encoder_folder_read_and_hold_it_once(db_url: str, monkeypatch):
    """load_ensemble, as a worker loads an ensemble version: two sim-exp versions on the bundled encoder read its
    weights once and hold one encoder module (before, each member loaded a copy and the second was then dropped: a
    second read of the files, and two copies in memory while loading)."""
    from transformers import AutoModel

    from rewardq.storage import registry
    from rewardq.storage.db import get_sessionmaker
    from rewardq.storage.settings import get_settings
    from rewardq.workers.models.ensemble import load_ensemble

    with get_sessionmaker(db_url)() as s:
        for v in ("ens-load-a", "ens-load-b"):
            registry.register(s, version=v, kind="sim_exp", base_model="x", path=None, config={})
        s.commit()
    reads: list[str] = []
    real = AutoModel.from_pretrained

    def counted(*args, **kwargs):
        reads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", counted)
    members = [{"version": "ens-load-a", "weight": 1.0}, {"version": "ens-load-b", "weight": 0.5}]
    ensemble = load_ensemble("ens-load", {"members": members}, get_settings())
    assert len(reads) == 1, reads
    assert len(ensemble.groups) == 1 and len(ensemble.groups[0].heads) == 2
    alone = load_ensemble("ens-load-alone", {"members": members[:1]}, get_settings())  # another load reads again
    assert len(reads) == 2 and alone.groups[0].model.encoder is not ensemble.groups[0].model.encoder
    got, want = ensemble.score(PROMPTS, RESPONSES), alone.score(PROMPTS, RESPONSES)
    for i, x in enumerate(want.reward):
        assert got.reward[i] == pytest.approx(1.5 * x, abs=1e-5)  # the same untrained heads, weights 1 and 0.5


def test_members_that_resume_after_a_stop_are_scored_first():
    """A stop for interactive work (Preempted) is taken only between a sim-exp member's encoder passes, which its
    embedding cache keeps: so sim-exp members go first, and no finished pass of a member that cannot resume (a
    classifier's, a likelihood model's) is thrown away by a later stop."""
    from rewardq.workers.models.base import RewardModel, Scores
    from rewardq.workers.models.ensemble import EnsembleModel
    from rewardq.workers.models.sim_exp import SimExpModel
    from rewardq.workers.registry import resolve_encoder

    class Constant(RewardModel):  # a member of another kind, scored after the sim-exp one
        kind = "classifier"
        device = torch.device("cpu")
        token_budget = 0

        def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            return Scores(reward=[2.0] * len(prompts), cos=[[] for _ in prompts], truncated=[False] * len(prompts))

    sim = SimExpModel("base", resolve_encoder("")[0])
    ensemble = EnsembleModel("ens", ["c", "base"], [1.0, 1.0], [Constant(), sim])
    assert ensemble.groups[0].model is sim and ensemble.n_models == 2
    got = ensemble.score(PROMPTS[:2], RESPONSES[:2])
    assert got.components is not None and [c[0] for c in got.components] == [2.0, 2.0]  # members keep their order


def test_a_job_or_a_score_request_names_its_ensemble_inline(api, db_url):
    """`model_version: {version: weight, ...}` in a job or a /v1/score body: the tenant's ensemble of those versions,
    made on first use and the same one after (as POST /v1/models/ensemble makes it)."""
    base, other = api.get("/v1/models").json()["default"], _second_version(db_url)
    items = [{"prompt": "q", "response": "a"}]
    first = api.post("/v1/jobs", json={"items": items, "model_version": {base: 0.25, other: 4}})
    assert first.status_code == 202, first.text
    version = first.json()["model_version"]
    assert version.startswith("ens-")
    again = api.post("/v1/jobs", json={"items": items, "model_version": {other: 4.0, base: 0.25}})
    assert again.status_code == 202 and again.json()["model_version"] == version
    listed = {m["version"]: m for m in api.get("/v1/models").json()["models"]}[version]
    assert listed["kind"] == "ensemble" and listed["settings"]["members"][0] == {"version": base, "weight": 0.25}
    for bad, message in [
        ({"nope": 1, base: 1}, "unknown model version 'nope'"),
        ({base: 1}, "at least 2"),
        ({base: "x", other: 1}, "valid number"),
    ]:
        for route in ("/v1/jobs", "/v1/score"):
            resp = api.post(route, json={"items": items, "model_version": bad})
            assert resp.status_code == 422 and message in resp.text, (route, bad, resp.text)


def test_another_tenant_s_ensemble_is_not_found_by_any_route(db_url, redis_url):
    """Deleting, naming as a member, naming inline, activating: another tenant's ensemble is unknown (404 or 422), as a
    version that does not exist, and is left as it was."""
    import uuid

    from tests.conftest import make_client

    a, b = f"ens-a-{uuid.uuid4().hex[:6]}", f"ens-b-{uuid.uuid4().hex[:6]}"
    ka, kb = f"ka-{uuid.uuid4().hex}", f"kb-{uuid.uuid4().hex}"
    with make_client(db_url, f"test-ens-{uuid.uuid4().hex[:8]}", api_keys=f"{a}:{ka},{b}:{kb}") as c:
        as_a, as_b = {"Authorization": f"Bearer {ka}"}, {"Authorization": f"Bearer {kb}"}
        base, other = c.get("/v1/models", headers=as_a).json()["default"], _second_version(db_url)
        made = _create(c, [(base, 1.0), (other, 2.0)], name="mine", headers=as_a)
        assert made.status_code == 201, made.text
        version = made.json()["version"]
        for ref in (version, "mine"):
            assert c.delete(f"/v1/models/{ref}", headers=as_b).status_code == 404
            assert c.post(f"/v1/models/{ref}/activate", headers=as_b).status_code == 404
            member = _create(c, [(ref, 1.0), (base, 1.0)], headers=as_b)
            assert member.status_code == 422 and "unknown model version" in member.text
            items = [{"prompt": "q", "response": "a"}]
            inline = c.post("/v1/jobs", headers=as_b, json={"items": items, "model_version": {ref: 1, base: 1}})
            assert inline.status_code == 422 and "unknown model version" in inline.text
        assert any(m["version"] == version for m in c.get("/v1/models", headers=as_a).json()["models"])
