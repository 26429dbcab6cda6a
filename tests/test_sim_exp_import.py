"""Issue #39, items 2 and 3: a sentence-transformers folder imports as a sim-exp version and scores as
``SentenceTransformer(DIR).encode`` + the sim-exp formula does (fp32, within 1e-5), with its own pooling and token
limit; what it cannot reproduce is refused with the reason. A run names the version it starts from: a version the
tenant cannot see, or of a kind no run trains, is refused when the run is asked for."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from rewardq.storage import registry
from rewardq.storage.db import session_scope
from rewardq.storage.settings import get_settings
from rewardq.workers.importer import ImportRefused, import_folder
from rewardq.workers.models import load_model
from rewardq.workers.registry import default_encoder_path
from tests import tiny_models
from tests.conftest import make_client

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "word " * 120, "same text"]
RESPONSES = ["Paris is the capital of France.", "Why did the chicken cross the road? " * 12, "short", "same text"]


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    return {pool: tiny_models.save_st_encoder(root / f"st-{pool}", pool) for pool in ("cls", "mean")}


def _load(tmp_path: Path, folder: Path, **options: object):  # type: ignore[no-untyped-def]
    done = import_folder(folder, "sim_exp", tmp_path / "artifacts", dict(options))
    settings = get_settings().model_copy(update={"artifacts_dir": tmp_path / "artifacts"})
    return done, load_model("sim_exp", done.version, done.directory.name, done.config, settings)


def _sentence_transformers(folder: Path) -> list[float]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    emb_p = st.encode(PROMPTS, convert_to_tensor=True)
    emb_r = st.encode(RESPONSES, convert_to_tensor=True)
    return torch.exp(-torch.nn.functional.cosine_similarity(emb_p, emb_r)).tolist()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_a_sentence_transformers_folder_scores_as_sentence_transformers_does(st_folders, pool, tmp_path):
    done, model = _load(tmp_path, st_folders[pool])
    assert done.version.startswith("enc-") and done.config["pooling"] == pool and done.config["max_length"] == 64
    got = model.score(PROMPTS, RESPONSES)
    want = _sentence_transformers(st_folders[pool])
    assert max(abs(a - b) for a, b in zip(got.reward, want, strict=True)) < 1e-5, (got.reward, want)
    assert got.truncated == [False, True, True, False]  # cut at the folder's max_seq_length (64), as ST cuts
    # The pooling is what makes the figures: the same encoder pooled the other way is far from them.
    model.pooling = "mean" if pool == "cls" else "cls"
    model.shared = None
    model._cache.clear()  # embeddings of the right pooling, kept for the next batch
    assert max(abs(a - b) for a, b in zip(model.score(PROMPTS, RESPONSES).reward, want, strict=True)) > 1e-3


def test_the_bundled_minilm_imported_scores_as_the_base_version(tmp_path):
    """A folder saved by sentence-transformers before v6 (boolean pooling keys, max_seq_length in
    sentence_bert_config.json): the bundled MiniLM, imported, is the base version's formula exactly."""
    from rewardq.workers.models.sim_exp import load_sim_exp

    done, model = _load(tmp_path, Path(default_encoder_path()))
    assert done.config["pooling"] == "mean" and done.config["max_length"] == 256
    base = load_sim_exp("base", None, get_settings())
    assert model.score(PROMPTS, RESPONSES).reward == base.score(PROMPTS, RESPONSES).reward


def _edited(src: Path, dest: Path, rel: str, change: dict[str, object]) -> Path:
    shutil.copytree(src, dest)
    path = dest / rel
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **change}) if isinstance(data, dict) else json.dumps(change))
    return dest


def test_what_a_sim_exp_version_cannot_reproduce_is_refused(st_folders, tmp_path):
    src = st_folders["mean"]
    dense = _edited(src, tmp_path / "dense", "modules.json", {})
    modules = json.loads((src / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    cases = {
        "Transformer -> Pooling -> Dense": dense,
        "the pooling is max": _edited(src, tmp_path / "max", "1_Pooling/config.json", {"pooling_mode": "max"}),
        "the pooling is cls + mean": _edited(
            src, tmp_path / "two", "1_Pooling/config.json", {"pooling_mode": ["cls", "mean"]}
        ),
        "do_lower_case": _edited(src, tmp_path / "lower", "sentence_bert_config.json", {"do_lower_case": True}),
        "default_prompt_name 'query'": _edited(
            src, tmp_path / "prompt", "config_sentence_transformers.json", {"default_prompt_name": "query"}
        ),
    }
    pickled = shutil.copytree(src, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases["no safetensors weights"] = pickled
    for reason, folder in cases.items():
        with pytest.raises(ImportRefused, match=reason.replace("+", r"\+")):
            import_folder(folder, "sim_exp", tmp_path / "artifacts")
    with pytest.raises(ImportRefused, match="truncation_side: not a setting of a sim_exp version"):
        import_folder(src, "sim_exp", tmp_path / "artifacts", {"truncation_side": "right"})


def test_a_run_names_the_version_it_starts_from(db_url: str, redis_url: str):
    tag = uuid.uuid4().hex[:8]
    lm, enc, theirs = f"lm-{tag}", f"enc-{tag}", f"enc-b-{tag}"
    with session_scope(db_url) as s:
        registry.register(s, version=lm, kind="likelihood", base_model="t", path=None, config={}, name=f"lm {tag}")
        registry.register(s, version=enc, kind="sim_exp", base_model="t", path=None, config={}, name=f"enc {tag}")
        registry.register(s, version=theirs, kind="sim_exp", base_model="t", path=None, config={}, owner="bob")
    key = f"key-{tag}-0123456789abcdef0123456789"
    with make_client(db_url, f"test-start-{tag}", api_keys=f"t-{tag}:{key}") as c:
        auth = {"Authorization": f"Bearer {key}"}
        c.post("/v1/feedback", headers=auth, json=[{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)

        def refused(body: dict[str, object], field: str, message: str, route: str = "/v1/training-runs") -> None:
            resp = c.post(route, headers=auth, json=body)
            assert resp.status_code == 422, resp.text
            error = resp.json()["errors"][0]
            assert error["field"] == field and message in error["message"], error

        refused({"start_version": lm}, "start_version", "runs cannot train")
        refused({"start_version": f"lm {tag}"}, "start_version", "runs cannot train")  # by its name too
        refused({"start_version": theirs}, "start_version", "unknown model version")  # another tenant's
        refused({"start_version": enc, "kind": "classifier"}, "kind", "cannot start from it")
        refused({"cron": "0 3 * * *", "params": {"start_version": lm}}, "start_version", "runs cannot train",
                route="/v1/schedules")  # fmt: skip
        resp = c.post("/v1/training-runs", headers=auth, json={"start_version": f"enc {tag}", "epochs": 1})
        assert resp.status_code == 202, resp.text
        assert resp.json()["params"]["start_version"] == enc and resp.json()["params"]["kind"] == "sim_exp"
