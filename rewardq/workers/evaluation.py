"""Held-out metrics of any reward model (what the gate reads), and early stopping on a run's validation slice."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from rewardq.workers.feedback import Feedback, comparisons
from rewardq.workers.models.base import Scores

PRIMARY_METRIC = "pairwise_accuracy"  # the gate's metric, and the one the best epoch is chosen on


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores: ...


def evaluate(
    model: Scorer, data: Feedback, max_rated_pairs: int = 2000, collect: list[float] | None = None
) -> dict[str, float | int | None]:
    """Held-out metrics: pairwise accuracy over every comparison the feedback implies, Spearman on ratings.
    Every score computed is appended to ``collect`` when given (the version's score distribution)."""
    out: dict[str, float | int | None] = {"n": len(data), "pairwise_accuracy": None, "spearman": None}
    correct = n_comparisons = 0
    if data.ratings:
        rows = data.ratings[:max_rated_pairs]
        r = np.array(model.score([x.prompt for x in rows], [x.response for x in rows]).reward)
        y = np.array([x.rating for x in rows])
        if collect is not None:
            collect += r.tolist()
        better = y[:, None] > y[None, :]
        correct += int((better & (r[:, None] > r[None, :])).sum())
        n_comparisons += int(better.sum())
        if len(rows) > 2:
            from scipy.stats import spearmanr

            rho = float(spearmanr(r, y).statistic)
            out["spearman"] = None if math.isnan(rho) else rho
    if data.preferences:
        prefs = data.preferences
        rc = np.array(model.score([x.prompt for x in prefs], [x.chosen for x in prefs]).reward)
        rr = np.array(model.score([x.prompt for x in prefs], [x.rejected for x in prefs]).reward)
        if collect is not None:
            collect += rc.tolist() + rr.tolist()
        correct += int((rc > rr).sum())
        n_comparisons += len(prefs)
    if n_comparisons:
        out["pairwise_accuracy"] = correct / n_comparisons
    out["comparisons"] = n_comparisons
    return out


class CachedScorer:
    """Scores from embeddings computed once (a sim-exp run that trains no encoder layer): the heads are all that
    changes between epochs, so validating an epoch costs no encoder pass."""

    def __init__(self, heads: Any, emb: torch.Tensor, index: dict[str, int]):
        self.heads, self.emb, self.index = heads, emb, index

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        reward, cos = self.heads.reward(
            self.emb[[self.index[p] for p in prompts]], self.emb[[self.index[r] for r in responses]]
        )
        return Scores(reward=reward.cpu().tolist(), cos=cos.cpu().tolist(), truncated=[False] * len(prompts))


class BestEpoch:
    """Early stopping: after each epoch the model is scored on the validation slice (never trained on, never
    shown to the gate); the trainable weights of the best epoch so far are copied aside, training stops after
    ``patience`` epochs without a better one, and ``restore`` puts the best epoch's weights back. Ties keep the
    earlier epoch. A slice that implies no comparison turns it off: the last epoch is kept."""

    def __init__(self, val: Feedback, patience: int = 2, metric: str = PRIMARY_METRIC):
        self.val, self.patience, self.metric = val, max(1, patience), metric
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.enabled = comparisons(val) > 0
        self._best: float | None = None
        self._weights: list[torch.Tensor] = []
        self._params: list[torch.nn.Parameter] = []
        self._modules: list[torch.nn.Module] = []
        self._scorer: Scorer | None = None

    def bind(self, scorer: Scorer, modules: Iterable[torch.nn.Module]) -> None:
        """What to score with, and the modules whose trainable parameters make the model (switched to eval mode
        while the slice is scored)."""
        self._scorer, self._modules = scorer, list(modules)
        params = {id(p): p for m in self._modules for p in m.parameters() if p.requires_grad}
        self._params = list(params.values())

    def after_epoch(self, epoch: int) -> bool:
        """Score epoch ``epoch`` (0-based); True when training should stop."""
        if not self.enabled or self._scorer is None:
            return False
        modes = [m.training for m in self._modules]
        for m in self._modules:
            m.eval()
        try:
            metrics = evaluate(self._scorer, self.val)
        finally:
            for m, mode in zip(self._modules, modes, strict=True):
                m.train(mode)
        self.history.append({"epoch": epoch + 1, **metrics})
        value = metrics[self.metric]
        assert value is not None  # enabled: the slice implies comparisons
        if self._best is None or float(value) > self._best:
            self._best, self.best_epoch = float(value), epoch + 1
            self._weights = [p.detach().clone() for p in self._params]
            return False
        return epoch + 1 - self.best_epoch >= self.patience  # type: ignore[operator]

    def restore(self) -> None:
        """Put the best epoch's weights back (a no-op when the last epoch was the best)."""
        if not self.history:
            return
        last = self.history[-1]["epoch"]
        if self.best_epoch is not None and self.best_epoch != last:
            with torch.no_grad():
                for p, w in zip(self._params, self._weights, strict=True):
                    p.copy_(w)
        self._weights = []

    def summary(self, max_epochs: int) -> dict[str, Any]:
        """What the run records about its validation slice."""
        epochs_run = self.history[-1]["epoch"] if self.history else max_epochs
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), None)
        return {
            "metric": self.metric,
            "n": len(self.val),
            "comparisons": comparisons(self.val),
            "early_stopping": self.enabled,
            "patience": self.patience,
            "epochs_run": epochs_run,
            "best_epoch": self.best_epoch if self.enabled else epochs_run,
            "stopped_early": epochs_run < max_epochs,
            "best": best,
            "epochs": self.history,
        }
