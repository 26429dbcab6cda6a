"""A weighted reward ensemble: several versions scored on the same pairs, R = sum_m weight_m * R_m (TRL's
``reward_weights``). Each member is scored once per batch; sim-exp members on the same encoder (the base version
and the versions trained on top of it without touching the encoder, say) share one encoding of the batch's texts and
differ only in their heads. Every pair keeps its member scores (``Scores.components``, stored with its result)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewardq.workers.models.base import RewardModel, Scores

if TYPE_CHECKING:
    from rewardq.storage.settings import Settings
    from rewardq.workers.models.sim_exp import Heads, SimExpModel


@dataclass
class Group:
    """Members scored in one pass: one model, and the heads of the sim-exp members that share its encoder."""

    model: RewardModel
    heads: list[Heads]  # sim_exp only: [] for other kinds
    members: list[int]  # their positions among the ensemble's members


class EnsembleModel(RewardModel):
    kind = "ensemble"

    def __init__(self, version: str, versions: Sequence[str], weights: Sequence[float], models: Sequence[RewardModel]):
        super().__init__()
        if not (len(versions) == len(weights) == len(models)) or not models:
            raise ValueError("an ensemble needs one weight and one model per member")
        self.version = version
        self.versions, self.weights = list(versions), [float(w) for w in weights]
        self.device = models[0].device
        self.token_budget = models[0].token_budget
        self.groups: list[Group] = []
        shared: dict[Any, Group] = {}
        for m, model in enumerate(models):
            key = getattr(model, "shares_with", None)
            if key is not None and key in shared:  # the same encoder as an earlier member: keep only its heads
                shared[key].heads.append(model.heads)  # type: ignore[attr-defined]
                shared[key].members.append(m)
                continue
            group = Group(model, [model.heads] if key is not None else [], [m])  # type: ignore[attr-defined]
            if key is not None:
                shared[key] = group
            self.groups.append(group)
        # Sim-exp groups first: they alone stop between passes for interactive work (Preempted) and resume from their
        # embedding cache, so no finished pass of a member that cannot resume is thrown away by a later stop.
        self.groups.sort(key=lambda g: not g.heads)
        self.n_models = len(self.groups)
        self.max_length = min(int(getattr(g.model, "max_length", 1 << 30)) for g in self.groups)

    def settings(self) -> dict[str, Any]:
        parts = [g.model.settings() for g in self.groups]
        kernel = next((p["kernel"] for p in parts if p.get("kernel")), None)
        precision = "/".join(dict.fromkeys(str(p.get("autocast") or p.get("dtype") or "off") for p in parts))
        return {"kind": self.kind, "members": len(self.versions), "kernel": kernel, "dtype": precision}

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        n = len(prompts)
        per_member: list[Scores | None] = [None] * len(self.versions)
        for g in self.groups:
            g.model.cache_scope, g.model.preempt = self.cache_scope, self.preempt
            try:
                if g.heads:
                    scored = g.model.score_heads(prompts, responses, g.heads)  # type: ignore[attr-defined]
                else:
                    scored = [g.model.score(prompts, responses)]
            finally:
                g.model.preempt = None
            for m, s in zip(g.members, scored, strict=True):
                per_member[m] = s
        members = [s for s in per_member if s is not None]
        errors: dict[int, tuple[str, str]] = {}
        for s in members:  # a pair one member cannot score has no ensemble score: the first member's reason
            for i, why in s.errors.items():
                errors.setdefault(i, why)
        components = [[s.reward[i] for s in members] for i in range(n)]
        reward = [sum(w * c for w, c in zip(self.weights, comp, strict=True)) for comp in components]
        counted = [s.n_tokens for s in members if s.n_tokens is not None]
        return Scores(
            reward=reward,
            cos=[[] for _ in range(n)],
            truncated=[any(s.truncated[i] for s in members) for i in range(n)],
            n_tokens=counted[0] if len(counted) == 1 else None,  # the likelihood member's, when there is one
            errors=errors,
            components=components,
        )

    def take_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in self.groups:
            for k, v in g.model.take_stats().items():
                out[k] = out.get(k, 0.0) + v
        return out


def load_ensemble(version: str, config: dict[str, Any], settings: Settings) -> EnsembleModel:
    """An ensemble version's members, each loaded as its own version would be (``config["members"]``: version ids
    and weights, checked when the ensemble was made)."""
    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from rewardq.workers.models import load_model
    from rewardq.workers.models.sim_exp import one_encoder_per_folder

    members = list(config.get("members") or [])
    rows = []
    with session_scope() as s:
        for m in members:
            mv = registry.get_version(s, version=str(m["version"]))
            if mv is None:
                raise FileNotFoundError(f"member {m['version']} of ensemble {version} is not registered")
            rows.append((mv.kind, mv.version, mv.path, dict(mv.config)))
    models: list[RewardModel] = []
    loaded: dict[Any, SimExpModel] = {}
    with one_encoder_per_folder():  # a later member on the same encoder files gets the first one's, never a copy
        for kind, member, path, member_config in rows:
            if kind == "ensemble":
                raise ValueError(f"ensemble {version} names another ensemble ({member}): members are scoring versions")
            model = load_model(kind, member, path, member_config, settings)
            key = getattr(model, "shares_with", None)
            if key is not None and key in loaded:  # and its batches are encoded once, for every member's heads
                model = _heads_only(loaded[key], model)  # type: ignore[arg-type]
            elif key is not None:
                loaded[key] = model  # type: ignore[assignment]
            models.append(model)
    return EnsembleModel(version, [str(m["version"]) for m in members], [float(m["weight"]) for m in members], models)


def _heads_only(leader: SimExpModel, member: SimExpModel) -> SimExpModel:
    """``member`` with the encoder of ``leader`` (the same files): its own copy is dropped, so memory holds one."""
    member.encoder, member.tokenizer = leader.encoder, leader.tokenizer
    member.weights_changed()
    return member
