"""Issue #38, item 1: conversations (a system prompt, earlier turns) reach the reward model as messages, and a chat
model's own template is applied to the real conversation; before, the TRL reward function sent [system, user] as
one user turn "system: ...\\nuser: ..." (0.468 against 1.737 on the report's model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rewardq import conversations
from rewardq.api.errors import ApiError
from rewardq.api.parsing import validate_items
from tests import tiny_models

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
ANSWER = "Rome."


def _items(*raw: dict) -> list:
    return validate_items(list(raw), max_items=100, max_chars=10_000)


def test_items_take_conversations_in_each_shape():
    messages = _items({"messages": [*TURNS, {"role": "assistant", "content": ANSWER}]})[0]
    trl = _items({"prompt": TURNS, "response": [{"role": "assistant", "content": ANSWER}]})[0]
    text = _items({"prompt": TURNS, "response": ANSWER})[0]
    assert messages.prompt == trl.prompt == text.prompt and messages.response == trl.response == ANSWER
    assert conversations.decode(messages.prompt) == TURNS
    assert conversations.text(messages.prompt).startswith("system: Be brief.\nuser: What is the capital")
    # A single user turn is the plain prompt: every kind reads both the same way.
    assert _items({"prompt": [{"role": "user", "content": "hi"}], "response": "x"})[0].prompt == "hi"
    assert _items({"prompt": "hi", "response": "x"})[0].prompt == "hi"
    # A single turn whose text begins with the conversation mark stays a conversation; an old plain prompt that
    # began with it (stored before conversations were kept) reads as plain text.
    odd = _items({"prompt": [{"role": "user", "content": "\x01[]"}], "response": "x"})[0].prompt
    assert conversations.decode(odd) == [{"role": "user", "content": "\x01[]"}]
    assert conversations.decode("\x01not json") is None and conversations.text("\x01[1]") == "\x01[1]"


@pytest.mark.parametrize(
    ("item", "field", "message"),
    [
        ({"messages": TURNS}, "messages", "must end with the assistant's answer"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "after at least one turn"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "needs a role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "content must be text"),
        ({"messages": [], "prompt": "p"}, "messages", "not both"),
        ({"prompt": [], "response": "x"}, "prompt", "non-empty list"),
        ({"prompt": "\x01[]", "response": "x"}, "prompt", "begins with U+0001"),
        ({"prompt": [{"role": "user", "content": "a\x00"}], "response": "x"}, "prompt", "NUL"),
    ],
)
def test_malformed_conversations_are_refused_with_the_reason(item, field, message):
    with pytest.raises(ApiError) as err:
        _items(item)
    assert err.value.errors[0].field == field and message in err.value.errors[0].message, err.value.errors


@pytest.fixture(scope="module")
def chat_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_llama_classifier(tmp_path_factory.mktemp("chat") / "rm")


def transformers_reward(folder: Path, messages: list[dict[str, str]]) -> float:
    """What transformers gives for the conversation: the model's chat template over every turn, no special tokens
    added again (TRL's reward model input)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False)
    with torch.no_grad():
        return float(net(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0])


def test_a_chat_classifier_scores_the_real_conversation(chat_rm):
    from rewardq.workers.models.classifier import ClassifierModel

    model = ClassifierModel("v", str(chat_rm))
    prompt = _items({"prompt": TURNS, "response": ANSWER})[0].prompt
    got = model.score([prompt, "plain"], [ANSWER, "text"]).reward
    want = transformers_reward(chat_rm, [*TURNS, {"role": "assistant", "content": ANSWER}])
    assert abs(got[0] - want) < 1e-4
    flattened = model.score([conversations.text(prompt)], [ANSWER]).reward[0]  # what was scored before
    assert abs(flattened - want) > 1e-3


def test_a_likelihood_model_conditions_on_the_conversation(tmp_path):
    from transformers import AutoTokenizer

    from rewardq.workers.models.likelihood import LikelihoodModel

    folder = tiny_models.save_llama_lm(tmp_path / "lm")
    model = LikelihoodModel("v", str(folder))
    prompt = conversations.encode(TURNS)
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        TURNS, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert model.prompt_ids(prompt) == list(want)


def test_sim_exp_embeds_a_conversation_as_its_text():
    from rewardq.storage.settings import get_settings
    from rewardq.workers.models.sim_exp import load_sim_exp

    model = load_sim_exp("base", None, get_settings())
    model.cache_size, model.shared = 0, None
    prompt = conversations.encode(TURNS)
    assert model.score([prompt], [ANSWER]).reward == model.score([conversations.text(prompt)], [ANSWER]).reward


def test_a_classifier_trains_on_the_conversation_it_scores(chat_rm):
    """Feedback keeps a conversation as messages too: a classifier run's forward pass reads the same templated
    conversation its scores come from (sim-exp runs train on the text they embed, conversations.text)."""
    from rewardq.workers.models.classifier import ClassifierModel

    model = ClassifierModel("v", str(chat_rm))
    prompt = conversations.encode(TURNS)
    with torch.no_grad():
        trained_on = model.forward([prompt], [ANSWER])[0].item()
    assert abs(trained_on - model.score([prompt], [ANSWER]).reward[0]) < 1e-5
