"""Issue #38, item 2: a reward model saved by OpenRLHF (its RewardModel class: a base model and a value head named
by value_head_prefix; the mean and std in config.json) imports as a classifier and scores as OpenRLHF's serve_rm
scores the same templated query: the value at the last attended position, normalized on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rewardq.storage.settings import get_settings
from rewardq.workers.importer import ImportRefused, import_folder
from rewardq.workers.models import load_model
from rewardq.workers.models.classifier import chat_messages
from tests import tiny_models

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "hi", "Summarise: " + "words and more words " * 8]
RESPONSES = ["Paris.", "Why did the chicken cross the road? To get to the other side.", "hello there", "Words."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_openrlhf_rm(tmp_path_factory.mktemp("orlhf") / "rm", prefix="value_head")


def serve_rm(folder: Path, queries: list[str], normalize: bool) -> list[float]:
    """What OpenRLHF's serve_rm computes, written out from openrlhf/cli/serve_rm.py and openrlhf/models/model.py
    (its RewardModel.forward; openrlhf itself needs deepspeed to import): left-padded, no special tokens added,
    positions counted over the mask, the value head at the last attended position, then (r - mean) / std."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    head = load_file(str(folder / "model.safetensors"))[f"{config['value_head_prefix']}.weight"]
    batch = tok(queries, return_tensors="pt", add_special_tokens=False, padding=True, truncation=True, max_length=2048)
    mask = batch["attention_mask"]
    eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    position_ids = mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(mask == 0, 1)
    with torch.no_grad():
        hidden = base(batch["input_ids"], attention_mask=mask, position_ids=position_ids)["last_hidden_state"]
        values = (hidden @ head.T).squeeze(-1)
        reward = values.gather(dim=1, index=eos_indices).squeeze(1)
    if normalize:
        reward = (reward - config["mean"]) / config["std"]
    return reward.tolist()


def _queries(model) -> list[str]:  # type: ignore[no-untyped-def]
    """The templated query OpenRLHF sends for each pair (its PPO prompts are chat-templated)."""
    tok = model.tokenizer
    return [
        tok.apply_chat_template(chat_messages(p, r), tokenize=False) for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]


@pytest.mark.parametrize("normalize", [False, True])
def test_an_openrlhf_reward_model_scores_as_serve_rm(folder, normalize, tmp_path):
    done = import_folder(folder, "classifier", tmp_path / "artifacts", {"normalize": normalize} if normalize else {})
    assert done.config["format"] == "openrlhf" and done.config["value_head_prefix"] == "value_head"
    assert done.config["normalize"] is normalize  # default: the config's normalize_reward (false, as train_rm saves)
    settings = get_settings().model_copy(update={"artifacts_dir": tmp_path / "artifacts"})
    model = load_model("classifier", done.version, done.directory.name, done.config, settings)
    got = model.score(PROMPTS, RESPONSES).reward
    queries = _queries(model)
    want = serve_rm(folder, queries, normalize)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5, (got, want)
    alone = [model.score([p], [r]).reward[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert max(abs(a - b) for a, b in zip(got, alone, strict=True)) < 1e-5  # batch invariant
    if normalize:
        raw = serve_rm(folder, queries, False)
        assert max(abs(a - b) for a, b in zip(got, raw, strict=True)) > 1e-2  # the normalisation is applied


def test_openrlhf_folders_that_cannot_score_are_refused(folder, tmp_path):
    no_head = shutil.copytree(folder, tmp_path / "critic")
    cfg = json.loads((no_head / "config.json").read_text())
    (no_head / "config.json").write_text(json.dumps({**cfg, "value_head_prefix": "critic_head"}))
    with pytest.raises(ImportRefused, match="without a critic_head.weight tensor"):
        import_folder(no_head, "classifier", tmp_path / "a")
    no_stats = shutil.copytree(folder, tmp_path / "no-stats")
    (no_stats / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("mean", "std")}))
    with pytest.raises(ImportRefused, match="no mean and std"):
        import_folder(no_stats, "classifier", tmp_path / "a", {"normalize": True})
    with pytest.raises(ImportRefused, match="OpenRLHF reward model .* only"):
        import_folder(tiny_models.save_bert_classifier(tmp_path / "bert"), "classifier", tmp_path / "a",
                      {"normalize": True})  # fmt: skip


def test_a_version_trained_from_it_is_saved_in_its_format(folder, tmp_path):
    """A run that starts from an OpenRLHF model saves it as OpenRLHF would (the head under its prefix), unnormalized
    (the mean and std described the model it started from); loaded back, it scores as the model it saved."""
    from rewardq.workers.artifacts import save_classifier
    from rewardq.workers.models.classifier import ClassifierModel

    done = import_folder(folder, "classifier", tmp_path / "artifacts", {"normalize": True})
    start = ClassifierModel("candidate", str(done.directory), value_head={"normalize": False})
    with torch.no_grad():
        start.model.value_head.weight.mul_(-1.5)  # as if trained
    want = start.score(PROMPTS, RESPONSES).reward
    version, path, config = save_classifier(start, tmp_path / "artifacts", base_model="RewardModel", params={})
    assert (
        config["format"] == "openrlhf" and config["normalize"] is False and config["value_head_prefix"] == "value_head"
    )
    saved = json.loads((path / "config.json").read_text())
    assert saved["value_head_prefix"] == "value_head" and saved["normalize_reward"] is False
    settings = get_settings().model_copy(update={"artifacts_dir": tmp_path / "artifacts"})
    again = load_model("classifier", version, path.name, config, settings).score(PROMPTS, RESPONSES).reward
    assert max(abs(a - b) for a, b in zip(again, want, strict=True)) < 1e-6
    assert max(abs(a - b) for a, b in zip(again, serve_rm(folder, _queries(start), False), strict=True)) > 1e-2
