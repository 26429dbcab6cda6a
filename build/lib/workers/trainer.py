"""Fine-tuning: Bradley-Terry training of heads, alpha, weight (and optionally the encoder's top layers)
on preference and rating feedback, and the held-out evaluation the promotion gate reads."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.model import Heads, RewardModel

CURVE_POINTS = 50  # a run's loss curve holds about this many points, each the mean loss of a window of steps

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Rating:
    prompt: str
    response: str
    rating: float


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class Feedback:
    ratings: list[Rating] = field(default_factory=list)
    preferences: list[Preference] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ratings) + len(self.preferences)

    def texts(self) -> list[str]:
        out = [t for r in self.ratings for t in (r.prompt, r.response)]
        out += [t for p in self.preferences for t in (p.prompt, p.chosen, p.rejected)]
        return list(dict.fromkeys(out))

    def split(self, heldout_fraction: float, seed: int) -> tuple[Feedback, Feedback]:
        """A seeded split; each kind is split on its own so both sides keep both kinds."""
        rng = random.Random(seed)
        train, held = Feedback(), Feedback()
        for name in ("ratings", "preferences"):
            rows = list(getattr(self, name))
            rng.shuffle(rows)
            n_held = int(round(len(rows) * heldout_fraction)) if len(rows) > 1 else 0
            getattr(held, name).extend(rows[:n_held])
            getattr(train, name).extend(rows[n_held:])
        return train, held


@dataclass
class TrainParams:
    epochs: int = 2
    lr: float = 2e-5  # encoder layers
    head_lr: float = 1e-2  # heads, alpha, weight
    n_heads: int = 1
    train_layers: int = 2
    batch_size: int = 32
    heldout_fraction: float = 0.1
    seed: int = 0


def _bt_loss(heads: Heads, emb: torch.Tensor, batch: Sequence[Rating | Preference],
             index: dict[str, int]) -> torch.Tensor | None:  # fmt: skip
    """-log sigmoid(R(chosen) - R(rejected)); for ratings over every two pairs whose ratings differ.

    None when the batch implies no comparison (one rating, or ratings all equal)."""
    rates = [x for x in batch if isinstance(x, Rating)]
    prefs = [x for x in batch if isinstance(x, Preference)]
    losses = []
    if len(rates) > 1:
        r, _ = heads.reward(emb[[index[x.prompt] for x in rates]], emb[[index[x.response] for x in rates]])
        y = torch.tensor([x.rating for x in rates], device=r.device)
        better = (y[:, None] > y[None, :]).float()
        if better.sum() > 0:
            losses.append((F.softplus(-(r[:, None] - r[None, :])) * better).sum() / better.sum())
    if prefs:
        p = emb[[index[x.prompt] for x in prefs]]
        rc, _ = heads.reward(p, emb[[index[x.chosen] for x in prefs]])
        rr, _ = heads.reward(p, emb[[index[x.rejected] for x in prefs]])
        losses.append(F.softplus(-(rc - rr)).mean())
    return torch.stack(losses).mean() if losses else None


def _warm_start(heads: Heads, emb: torch.Tensor, data: Feedback, index: dict[str, int], seed: int) -> None:
    """Fit alpha and weight alone first, on frozen features: the seed reward is anti-correlated with
    preference, and flipping that sign while the heads also move makes the heads' first steps noise."""
    params = [heads.alpha, heads.weight]
    opt = torch.optim.Adam(params, lr=0.05)
    rows: list[Rating | Preference] = [*data.ratings, *data.preferences]
    rng = random.Random(seed)
    for _ in range(150):
        batch = rng.sample(rows, min(256, len(rows)))
        loss = _bt_loss(heads, emb, batch, index)
        if loss is None:
            continue
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()


def _batches(data: Feedback, size: int, rng: random.Random) -> list[list[Rating | Preference]]:
    out: list[list[Rating | Preference]] = []
    kinds: tuple[list[Rating | Preference], ...] = (list(data.ratings), list(data.preferences))
    for rows in kinds:
        rng.shuffle(rows)
        out += [rows[i : i + size] for i in range(0, len(rows), size)]
    rng.shuffle(out)
    return out


def fit(model: RewardModel, data: Feedback, params: TrainParams, progress: ProgressFn | None = None) -> list[float]:
    """Train ``model``'s heads (replaced by trainable ones) and top encoder layers in place; return the
    loss per epoch. With ``train_layers=0`` the embeddings are computed once and epochs cost almost nothing."""
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    texts = data.texts()
    index = {t: i for i, t in enumerate(texts)}
    frozen_emb = model.embed(texts).to(model.device)
    model.heads = Heads(model.dim, params.n_heads, trained=True, init_noise=0.05 if params.n_heads > 1 else 0.0)
    model.heads.to(model.device).train()
    _warm_start(model.heads, frozen_emb, data, index, params.seed)

    layers = _top_layers(model, params.train_layers)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.heads.parameters()), "lr": params.head_lr}]
    if layers:
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(True)
        groups.append({"params": [p for layer in layers for p in layer.parameters()], "lr": params.lr})
        model.encoder.train()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    batches_per_epoch = len(_batches(data, params.batch_size, random.Random(0)))
    total = max(1, params.epochs * batches_per_epoch)
    # The curve: mean loss over windows of steps, about CURVE_POINTS points whatever the run's length.
    window = max(1, total // CURVE_POINTS)
    curve: list[float] = []
    win_sum, win_n = 0.0, 0
    step = 0
    t0 = time.perf_counter()
    for epoch in range(params.epochs):
        running, n = 0.0, 0
        for batch in _batches(data, params.batch_size, rng):
            if layers:
                batch_texts = list(dict.fromkeys(t for x in batch for t in _texts_of(x)))
                emb = model.encode(batch_texts)
                loss = _bt_loss(model.heads, emb, batch, {t: i for i, t in enumerate(batch_texts)})
            else:
                loss = _bt_loss(model.heads, frozen_emb, batch, index)
            step += 1
            if loss is None:
                continue
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            value = float(loss.detach())
            running += value
            n += 1
            win_sum += value
            win_n += 1
            if step % window == 0:
                curve.append(win_sum / win_n)
                win_sum, win_n = 0.0, 0
            if progress is not None and (step % 10 == 0 or step == total):
                progress({"epoch": epoch + 1, "epochs": params.epochs, "step": step, "total_steps": total,
                          "loss": running / max(n, 1), "elapsed_s": round(time.perf_counter() - t0, 2),
                          "curve": list(curve)})  # fmt: skip
    if win_n:
        curve.append(win_sum / win_n)
    model.encoder.eval()
    model.heads.eval()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    return curve


def _texts_of(x: Rating | Preference) -> tuple[str, ...]:
    return (x.prompt, x.response) if isinstance(x, Rating) else (x.prompt, x.chosen, x.rejected)


def _top_layers(model: RewardModel, n: int) -> list[torch.nn.Module]:
    if n <= 0:
        return []
    stack = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if stack is None:
        raise ValueError("training encoder layers needs a BERT-style encoder (encoder.layer)")
    if n > len(stack):
        raise ValueError(f"train_layers={n} but the encoder has {len(stack)} layers")
    return list(stack[-n:])


def evaluate(model: RewardModel, data: Feedback, max_rated_pairs: int = 2000) -> dict[str, float | int | None]:
    """Held-out metrics: pairwise accuracy over every comparison the feedback implies, Spearman on ratings."""
    out: dict[str, float | int | None] = {"n": len(data), "pairwise_accuracy": None, "spearman": None}
    correct = comparisons = 0
    if data.ratings:
        rows = data.ratings[:max_rated_pairs]
        r = np.array(model.score([x.prompt for x in rows], [x.response for x in rows]).reward)
        y = np.array([x.rating for x in rows])
        better = y[:, None] > y[None, :]
        correct += int((better & (r[:, None] > r[None, :])).sum())
        comparisons += int(better.sum())
        if len(rows) > 2:
            from scipy.stats import spearmanr

            rho = float(spearmanr(r, y).statistic)
            out["spearman"] = None if math.isnan(rho) else rho
    if data.preferences:
        prefs = data.preferences
        rc = np.array(model.score([x.prompt for x in prefs], [x.chosen for x in prefs]).reward)
        rr = np.array(model.score([x.prompt for x in prefs], [x.rejected for x in prefs]).reward)
        correct += int((rc > rr).sum())
        comparisons += len(prefs)
    if comparisons:
        out["pairwise_accuracy"] = correct / comparisons
    out["comparisons"] = comparisons
    return out
