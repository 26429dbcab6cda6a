"""TRL's dataset shapes as feedback (issue #38, item 4): conversational chosen/rejected (``must be a string, got
list`` before), an implicit prompt, prompt-completion ratings and KTO's unpaired labels. Each is compared with what
TRL's own ``maybe_extract_prompt`` makes of the example, the prompt kept as a conversation as a scoring item keeps it
(rewardq.conversations: a single user turn as its content), the answers as their assistant turns."""

from __future__ import annotations

from typing import Any

import pytest

from rewardq import conversations
from rewardq.api.errors import ApiError
from rewardq.api.integrations.trl import as_completion
from rewardq.api.parsing import validate_feedback

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *SKY]

EXAMPLES = {
    "conversational, explicit prompt": {"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
    "conversational, implicit prompt": {"chosen": SKY + BLUE, "rejected": SKY + GREEN},
    "conversational with a system turn": {"chosen": SYSTEM + BLUE, "rejected": SYSTEM + GREEN},
    "conversations beside a text prompt": {
        "prompt": "What color is the sky?",
        "chosen": SKY + BLUE,
        "rejected": SKY + GREEN,
    },  # fmt: skip
    "standard, implicit prompt": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "standard, explicit prompt": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
}


def _row(obj: dict[str, Any]) -> dict[str, Any]:
    [row] = validate_feedback([obj], max_items=10, max_chars=10_000)
    return row


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_preferences_in_trls_shapes_are_split_as_trl_splits_them(name: str):
    from trl.data_utils import maybe_extract_prompt

    example = EXAMPLES[name]
    trl = maybe_extract_prompt(dict(example))
    prompt = trl["prompt"] if isinstance(trl["prompt"], str) else conversations.encode(trl["prompt"])
    want = {"kind": "preference", "prompt": prompt, "chosen": as_completion(trl["chosen"]),
            "rejected": as_completion(trl["rejected"])}  # fmt: skip
    assert _row(example) == want
    assert want["chosen"] != want["rejected"] and want["prompt"]


def test_prompt_completion_ratings_and_kto_labels():
    assert _row({"prompt": "2+2?", "completion": "4", "rating": 5}) == {
        "kind": "rating", "prompt": "2+2?", "response": "4", "rating": 5.0}  # fmt: skip
    assert _row({"prompt": SKY, "completion": BLUE, "label": True})["rating"] == 1.0
    assert _row({"prompt": SKY, "completion": GREEN, "label": False}) == {
        "kind": "rating", "prompt": "What color is the sky?", "response": "It is green.", "rating": 0.0}  # fmt: skip


def test_a_system_prompt_is_kept_as_a_conversation():
    row = _row(EXAMPLES["conversational with a system turn"])
    assert conversations.decode(row["prompt"]) == SYSTEM and row["chosen"] == "It is blue."
    with pytest.raises(ApiError) as err:
        validate_feedback([{"prompt": "\x01[]", "response": "r", "rating": 1}], max_items=10, max_chars=100)
    assert err.value.errors[0].field == "prompt" and "U+0001" in err.value.errors[0].message


def test_a_list_that_is_not_a_conversation_is_refused_with_its_field():
    with pytest.raises(ApiError) as err:
        validate_feedback([{"prompt": "p", "chosen": ["a", "b"], "rejected": "c"}], max_items=10, max_chars=100)
    assert any(e.field == "chosen" and "conversation" in e.message for e in err.value.errors)


def test_conversational_feedback_through_the_api_as_json_and_ndjson(db_url: str, redis_url: str):
    """POST /v1/feedback took no conversation: 422 "must be a string, got list". Both bodies now store it."""
    import json
    import uuid

    from rewardq.storage.db import session_scope
    from rewardq.storage.models import Feedback
    from tests.conftest import make_client

    tenant = f"trl{uuid.uuid4().hex[:6]}"
    key = f"key-{tenant}-0123456789abcdef0123456789"
    rows = [EXAMPLES["conversational, implicit prompt"], {"prompt": SKY, "completion": BLUE, "label": True}]
    with make_client(db_url, "test-feedback-shapes", api_keys=f"{tenant}:{key}") as c:
        auth = {"Authorization": f"Bearer {key}"}
        assert c.post("/v1/feedback", json=rows, headers=auth).status_code in (200, 201, 202)
        ndjson = "".join(json.dumps(r) + "\n" for r in rows).encode()
        resp = c.post("/v1/feedback", content=ndjson, headers={**auth, "Content-Type": "application/x-ndjson"})
        assert resp.status_code in (200, 201, 202), resp.text
    with session_scope(db_url) as s:
        got = [(f.kind, f.prompt, f.chosen, f.rejected, f.response, f.rating)
               for f in s.query(Feedback).filter_by(tenant=tenant).order_by(Feedback.id)]  # fmt: skip
    one = [("preference", "What color is the sky?", "It is blue.", "It is green.", None, None),
           ("rating", "What color is the sky?", None, None, "It is blue.", 1.0)]  # fmt: skip
    assert got == one + one
