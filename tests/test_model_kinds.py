"""Every model kind equals a direct transformers computation (1e-4, fp32) and is batch invariant (1e-5), on both
kernel paths; imports refuse what rewardq must never load. Models are tiny, random and built by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardq.workers.importer import ImportRefused, check_folder, import_folder
from rewardq.workers.models.classifier import ClassifierModel, chat_messages
from rewardq.workers.models.likelihood import LikelihoodModel
from tests import tiny_models

PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "hi",
    "A man is playing a guitar on the street. " * 4,
    "Scores are written to SQL.",
    "",
    "user: 0123456789 ,.;:!?",
]
RESPONSES = [
    "Paris is the capital of France.",
    "No.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "ok",
    "Batches travel through Redis to Celery workers.",
    "an answer to nothing",
    "x",
]
FILLERS = [f"A considerably longer filler sentence about topic {i}, " * (1 + i % 6) for i in range(16)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "bert_classifier": tiny_models.save_bert_classifier(root / "bert-rm"),
        "llama_classifier": tiny_models.save_llama_classifier(root / "llama-rm"),
        "gpt2_lm": tiny_models.save_gpt2_lm(root / "gpt2"),
        "llama_lm": tiny_models.save_llama_lm(root / "llama"),
    }


def _direct_classifier(path: Path) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        if tok.chat_template:  # what TRL feeds its reward model: the template's text, no special tokens added again
            text = tok.apply_chat_template(chat_messages(p, r), tokenize=False)
            enc = tok(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tok(p, r, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[0, 0].item())
    return out


def _direct_likelihood(path: Path, reduction: str) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        if tok.chat_template:
            p_ids = tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            p_ids = tok(p)["input_ids"] or [tok.bos_token_id]
        r_ids = tok(r, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(p_ids) + list(r_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        n = len(p_ids)
        per_token = logp[n - 1 : -1].gather(1, ids[0, n:, None])[:, 0]
        out.append((per_token.mean() if reduction == "mean" else per_token.sum()).item())
    return out


def _batch_invariant(model, reward: list[float]) -> None:
    """Each pair alone, and among fillers at several positions, in batches of other sizes: the same score."""
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        alone = model.score([p], [r]).reward[0]
        assert abs(alone - reward[i]) < 1e-5, (i, alone, reward[i])
    for pos in (0, 9, 16):
        batch = model.score(
            FILLERS[:pos] + [PROMPTS[0]] + FILLERS[pos:], FILLERS[::-1][:pos] + [RESPONSES[0]] + FILLERS[::-1][pos:]
        )
        assert abs(batch.reward[pos] - reward[0]) < 1e-5
    reverse = model.score(PROMPTS[::-1], RESPONSES[::-1]).reward[::-1]
    assert max(abs(a - b) for a, b in zip(reverse, reward, strict=True)) < 1e-5


@pytest.mark.parametrize("which", ["bert_classifier", "llama_classifier"])
def test_classifier_equals_transformers_and_is_batch_invariant(folders, which: str):
    path = folders[which]
    model = ClassifierModel("v", str(path), encode_batch_size=4, token_budget=256)
    got = model.score(PROMPTS, RESPONSES)
    want = _direct_classifier(path)
    assert max(abs(a - b) for a, b in zip(got.reward, want, strict=True)) < 1e-4
    assert got.cos == [[] for _ in PROMPTS] and not any(got.truncated) and not got.errors
    assert model.settings()["input"] == ("chat_template" if which == "llama_classifier" else "text_pair")
    _batch_invariant(model, got.reward)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize(("which", "reduction"), [("gpt2_lm", "mean"), ("llama_lm", "sum")])
def test_likelihood_equals_transformers_and_is_batch_invariant(
    folders, which: str, reduction: str, kernel: str, monkeypatch
):
    monkeypatch.setenv("REWARDQ_KERNEL", kernel)
    path = folders[which]
    model = LikelihoodModel("v", str(path), reduction=reduction, encode_batch_size=4, token_budget=256)
    got = model.score(PROMPTS, RESPONSES)
    want = _direct_likelihood(path, reduction)
    assert max(abs(a - b) for a, b in zip(got.reward, want, strict=True)) < 1e-4
    assert all(n and n > 0 for n in got.n_tokens) and not got.errors
    assert model.stats["kernel_seconds"] > 0
    _batch_invariant(model, got.reward)


def test_likelihood_flags_truncation_and_refuses_an_empty_response(folders):
    model = LikelihoodModel("v", str(folders["llama_lm"]), max_length=24)
    s = model.score(["short", "a long prompt " * 20, "q"], ["short answer", "fine", ""])
    assert s.truncated == [False, True, False]
    assert s.errors == {2: ("empty_response", "the response has no tokens to score")}
    assert s.n_tokens[2] is None and s.n_tokens[1] > 0


def test_classifier_truncation_side_is_a_version_setting(folders):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 30
    left = ClassifierModel("v", str(folders["llama_classifier"]), max_length=32, truncation_side="left")
    right = ClassifierModel("v", str(folders["llama_classifier"]), max_length=32, truncation_side="right")
    ids_left, cut_left = left.encode(long_prompt, "the answer")
    ids_right, cut_right = right.encode(long_prompt, "the answer")
    assert cut_left and cut_right and len(ids_left["input_ids"]) == len(ids_right["input_ids"]) == 32
    full = left.tokenizer(left.text(long_prompt, "the answer"), add_special_tokens=False)["input_ids"]
    assert ids_left["input_ids"] == full[-32:] and ids_right["input_ids"] == full[:32]  # left keeps the response
    assert left.score([long_prompt], ["the answer"]).truncated == [True]


def test_import_is_content_addressed_and_copies_no_pickles(folders, tmp_path):
    src = tmp_path / "rm"
    import shutil

    shutil.copytree(folders["bert_classifier"], src)
    torch.save({"w": torch.zeros(1)}, src / "optimizer.pt")  # a pickle next to the safetensors: never copied
    first = import_folder(src, "classifier", tmp_path / "artifacts")
    again = import_folder(src, "classifier", tmp_path / "artifacts")
    assert first.version == again.version and first.version.startswith("clf-")
    assert not (first.directory / "optimizer.pt").exists() and (first.directory / "model.safetensors").exists()
    other = import_folder(src, "classifier", tmp_path / "artifacts", {"truncation_side": "right"})
    assert other.version != first.version  # the version's settings are part of what it is
    assert first.config["truncation_side"] == "left" and first.config["max_length"] == 512
    assert "/" not in first.base_model  # an architecture name, never the server's path
    loaded = ClassifierModel(first.version, str(first.directory))
    direct = ClassifierModel("v", str(folders["bert_classifier"]))
    assert loaded.score(PROMPTS, RESPONSES).reward == direct.score(PROMPTS, RESPONSES).reward


def test_import_refusals_say_why(folders, tmp_path):
    import shutil

    def variant(name: str, edit) -> Path:
        dest = tmp_path / name
        shutil.copytree(folders["bert_classifier"], dest)
        edit(dest)
        return dest

    def pickle_only(d: Path) -> None:
        (d / "model.safetensors").unlink()
        torch.save({}, d / "pytorch_model.bin")

    def remote_code(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
        (d / "config.json").write_text(json.dumps(cfg))

    secret = tmp_path / "outside" / "server.key"
    secret.parent.mkdir()
    secret.write_text("not for the registry")

    def link_out(d: Path) -> None:  # issue #37, item 10: imports followed links out of the folder
        (d / "tokenizer_extra.json").symlink_to(secret)

    def two_labels(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["id2label"] = {"0": "bad", "1": "good"}
        cfg.pop("num_labels", None)
        (d / "config.json").write_text(json.dumps(cfg))

    cases = [
        (variant("pickle", pickle_only), "classifier", "pickle checkpoints are refused"),
        (variant("remote", remote_code), "classifier", "trust_remote_code"),
        (variant("labels", two_labels), "classifier", "num_labels=1"),
        (variant("link", link_out), "classifier", "symbolic link to a file outside"),
        (folders["bert_classifier"], "likelihood", "has no likelihood head"),
        (folders["gpt2_lm"], "classifier", "cannot be loaded with AutoModelForSequenceClassification|no classifier"),
        (tmp_path / "missing", "classifier", "not a directory"),
        (folders["gpt2_lm"], "regression", "kind must be one of"),
    ]
    for path, kind, message in cases:
        with pytest.raises(ImportRefused, match=message):
            check_folder(path, kind)
    with pytest.raises(ImportRefused, match="reduction must be"):
        import_folder(folders["gpt2_lm"], "likelihood", tmp_path / "a", {"reduction": "median"})
    assert not list((tmp_path / "a").glob("*")) if (tmp_path / "a").exists() else True


def test_sim_exp_encoders_load_safetensors_only(folders, tmp_path):
    """Issue #37, item 10: a sim-exp version's encoder was loaded with from_pretrained's defaults, which unpickle a
    pytorch_model.bin (pickle can run code). The same tiny encoder loads from safetensors and is refused as a pickle."""
    import shutil

    from rewardq.workers.models.sim_exp import SimExpModel

    safe = tmp_path / "safe"
    shutil.copytree(folders["bert_classifier"], safe)
    assert SimExpModel("v", str(safe), device="cpu").score(PROMPTS, RESPONSES).reward
    pickled = tmp_path / "pickled"
    shutil.copytree(safe, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises((OSError, ValueError), match="safetensors|model.safetensors"):
        SimExpModel("v", str(pickled), device="cpu")
