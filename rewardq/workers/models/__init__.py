"""Reward model families behind one interface (``base.RewardModel``), one module per kind, loaded by kind.

Kept free of torch at import: the API reads ``KINDS`` from here, and the modules load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewardq.storage.settings import Settings
    from rewardq.workers.models.base import RewardModel

KINDS = ("sim_exp", "classifier", "likelihood")
# A weighted sum of versions of the kinds above (workers.models.ensemble): made by a tenant, never trained or imported.
ENSEMBLE = "ensemble"
MAX_MEMBERS = 8  # an ensemble's members at most: each is a model every worker holds in memory while it scores
# The prompt of a pair that is one text, scored as it is (OpenRLHF's query alone, /get_reward without prompts): no
# user text can be it, since texts with NUL are refused. Only a classifier scores such a pair.
TEXT_ONLY = "\x00"
TRAINABLE = ("sim_exp", "classifier")  # what a training run can fine-tune (a likelihood model is refused)
IMPORTABLE = ("classifier", "likelihood", "sim_exp")  # sim_exp: a sentence-transformers folder (its encoder)


def ensemble_active(version: str) -> str:
    """Why no training run goes on while the tenant's active version is an ensemble."""
    return (
        f"your active version {version} is an ensemble: a run promotes one model into your active version, which "
        "would drop the ensemble. Activate one version to retrain it (rewardq models activate VERSION), then make "
        "the ensemble again with the result"
    )


def version_dir(path: str, artifacts_dir: Path) -> Path:
    """A version's files: ``path`` is relative to REWARDQ_ARTIFACTS_DIR (older rows hold absolute paths)."""
    p = Path(path)
    return p if p.is_absolute() else artifacts_dir / p


def load_model(kind: str, version: str, path: str | None, config: dict[str, Any], settings: Settings) -> RewardModel:
    """The model of one registered version, ready to score on this machine's device."""
    if kind == ENSEMBLE:
        from rewardq.workers.models.ensemble import load_ensemble

        return load_ensemble(version, config, settings)
    common: dict[str, Any] = {"encode_batch_size": settings.encode_batch_size, "token_budget": settings.token_budget}
    if kind == "sim_exp":
        from rewardq.workers.models.sim_exp import load_sim_exp

        return load_sim_exp(version, None if path is None else version_dir(path, settings.artifacts_dir), settings)
    if path is None:
        raise ValueError(f"model version {version} of kind {kind} has no files")
    where = str(version_dir(path, settings.artifacts_dir))
    options = {k: config[k] for k in ("max_length", "truncation_side", "dtype") if k in config}
    if kind == "classifier":
        from rewardq.workers.models.classifier import ClassifierModel

        head = {"normalize": config.get("normalize", False)} if config.get("format") == "openrlhf" else None
        return ClassifierModel(version, where, **options, **common, value_head=head)
    if kind == "likelihood":
        from rewardq.workers.models.likelihood import LikelihoodModel

        return LikelihoodModel(version, where, reduction=config.get("reduction", "mean"), **options, **common)
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join((*KINDS, ENSEMBLE))}")
