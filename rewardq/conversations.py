"""Conversations as prompts: a system prompt and earlier turns kept as messages, so that a reward model with a chat
template sees the real conversation (issue #38), not one flattened user turn.

A pair's prompt is text; a conversation is kept in the same column as ``CONVERSATION`` (U+0001) followed by the JSON
of its messages (``[{"role", "content"}, ...]``, the turns before the scored answer). No submitted text may begin
with U+0001 (refused), so the two never mix. How each kind reads it:

- a classifier with a chat template applies it to the messages and the answer as the assistant's last turn;
  without a template it reads ``text(prompt)`` and the answer as a text pair;
- a likelihood model applies its template with the generation prompt to the messages;
- a sim-exp model embeds ``text(prompt)``: a single user turn's content, else ``role: content`` lines (what the
  TRL reward function sent before, so sim-exp scores do not change).

No torch here: the API and the workers both use it.
"""

from __future__ import annotations

import json
from typing import Any

CONVERSATION = "\x01"
ROLES = ("system", "user", "assistant", "tool", "developer")


def content(message: Any) -> str:
    """A message's text: its content, or the text parts of a multimodal content list."""
    value = message.get("content", "") if isinstance(message, dict) else message
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value if isinstance(part, dict))
    return "" if value is None else str(value)


def flatten(messages: list[dict[str, str]]) -> str:
    """A conversation as one text: a single turn's content, else ``role: content`` lines."""
    if len(messages) == 1:
        return content(messages[0])
    return "\n".join(f"{m.get('role', 'user')}: {content(m)}" for m in messages)


def encode(messages: list[dict[str, str]]) -> str:
    """The prompt text that holds ``messages``; a single user turn is its content alone (the same input for every
    kind: a chat template over [user: content] is what a plain prompt gets)."""
    if len(messages) == 1 and messages[0]["role"] == "user" and not messages[0]["content"].startswith(CONVERSATION):
        return messages[0]["content"]
    return CONVERSATION + json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def decode(prompt: str) -> list[dict[str, str]] | None:
    """The messages a prompt holds, or None for a plain prompt (also one stored before conversations were kept, which
    could begin with U+0001 and is then not their JSON)."""
    if not prompt.startswith(CONVERSATION):
        return None
    try:
        messages = json.loads(prompt[1:])
    except ValueError:
        return None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        return None
    return messages


def text(prompt: str) -> str:
    """The prompt as one text (sim-exp, template-less models, displays)."""
    messages = decode(prompt)
    return prompt if messages is None else flatten(messages)


def shown(prompt: str) -> str:
    """The prompt as results show it: plain text as it is, a conversation as the JSON of its messages."""
    return prompt[1:] if prompt.startswith(CONVERSATION) else prompt
