"""A TRL reward function served by rewardq's interactive lane: ``GRPOTrainer(reward_funcs=[trl_reward_func(...)])``.

The callable has GRPOTrainer's signature ``(prompts, completions, **kwargs) -> list[float]`` and takes both of
TRL's formats: plain strings, or conversations (lists of ``{"role", "content"}`` messages). A conversational prompt
goes to rewardq as its messages (system prompt and earlier turns included), so a reward model with a chat template
scores the real conversation (rewardq.conversations); the completion is its assistant turns. Large calls are
split into requests of ``batch_size`` pairs; 429 and 503 are retried honouring ``Retry-After`` (httpx-retries);
every request has a timeout. Needs only httpx: ``pip install '.[client]'`` on the training machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rewardq.client.client import Client

RewardFunc = Callable[..., list[float]]


def _content(message: Any) -> str:
    content = message.get("content", "") if isinstance(message, dict) else message
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def as_prompt(prompt: Any) -> str:
    """A TRL prompt as rewardq text: a string as is; a conversation's single user turn as its content, or
    longer conversations as 'role: content' lines (what a template-less reward model can read)."""
    if isinstance(prompt, str):
        return prompt
    turns = list(prompt)
    if len(turns) == 1:
        return _content(turns[0])
    return "\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in turns)


def as_messages(prompt: Any) -> Any:
    """A TRL prompt as rewardq takes it: a string as is, a conversation as its ``{"role", "content"}`` messages."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.get("role", "user"), "content": _content(m)} if isinstance(m, dict) else
            {"role": "user", "content": str(m)} for m in prompt]  # fmt: skip


def as_completion(completion: Any) -> str:
    """A TRL completion as rewardq text: a string as is; a conversation's assistant turns, joined."""
    if isinstance(completion, str):
        return completion
    return "".join(
        _content(m) for m in completion if not isinstance(m, dict) or m.get("role", "assistant") == "assistant"
    )


def trl_reward_func(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    model_version: str | None = None,
    batch_size: int = 256,
    timeout: float = 120.0,
    retries: int = 8,
    name: str = "rewardq",
    normalize: Literal["none", "z"] = "none",
    reward_weights: Mapping[str, float] | None = None,
) -> RewardFunc:
    """A reward function for TRL trainers that scores each (prompt, completion) with rewardq.

    ``base_url``/``api_key`` default to REWARDQ_API_URL/REWARDQ_API_KEY; ``model_version`` to the key's active
    version (pin one for a reproducible run). ``name`` is what TRL logs the rewards under (``rewards/<name>``).
    ``normalize="z"``: each reward as its z-score in the version's distribution (``score_z``), so the reward model's
    scale does not set the policy's step size. ``reward_weights={version: weight, ...}`` (in place of
    ``model_version``): their weighted sum, scored by rewardq as one ensemble version (TRL's ``reward_weights``, with
    the models scored once each on the workers and every member's score kept).
    """
    if normalize not in ("none", "z"):
        raise ValueError(f"normalize must be 'none' or 'z', not {normalize!r}")
    if reward_weights is not None and model_version is not None:
        raise ValueError("name model_version or reward_weights, not both")
    field = "score_z" if normalize == "z" else "score"
    client = Client(base_url, api_key or os.environ.get("REWARDQ_API_KEY"), timeout=timeout, retries=retries)

    pinned: list[str | None] = [model_version]

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if reward_weights is not None and pinned[0] is None:  # made (or found) once, on the first call
            pinned[0] = str(client.ensemble(reward_weights)["version"])
        pairs = [(as_messages(p), as_completion(c)) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for lo in range(0, len(pairs), batch_size):
            rows = client.score(pairs[lo : lo + batch_size], model_version=pinned[0])["results"]
            for row in rows:
                if row["score"] is None:
                    raise RuntimeError(f"rewardq could not score a completion: {row['error']}")
                if row[field] is None:
                    raise RuntimeError(f"rewardq knows no score distribution for {row.get('model_version')} yet")
                out.append(float(row[field]))
        return out

    reward.__name__ = name
    reward.__qualname__ = name
    return reward
