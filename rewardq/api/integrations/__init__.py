"""One module per outside protocol: OpenRLHF's remote reward model (``openrlhf``), vLLM's /score (``vllm``), and a
TRL reward-function factory (``trl``, client side: it needs only httpx)."""

from __future__ import annotations

from typing import Any


def trl_reward_func(*args: Any, **kwargs: Any) -> Any:
    """``from api.integrations import trl_reward_func``: see ``api.integrations.trl.trl_reward_func``."""
    from rewardq.api.integrations.trl import trl_reward_func as factory

    return factory(*args, **kwargs)


__all__ = ["trl_reward_func"]
