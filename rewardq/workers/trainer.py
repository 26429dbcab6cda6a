"""Fine-tuning on preference and rating feedback with the Bradley-Terry loss: the sim-exp heads, alpha, weight
(and optionally the encoder's top layers), or a whole cross-encoder for the classifier kind; and the
held-out evaluation the promotion gate reads (any kind: it only needs scores)."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from rewardq.workers.evaluation import BestEpoch, CachedScorer, evaluate
from rewardq.workers.feedback import Feedback, Preference, Rating, symmetric
from rewardq.workers.models.classifier import ClassifierModel
from rewardq.workers.models.sim_exp import Heads, SimExpModel
from rewardq.workers.train_params import SIMILARITY_OBJECTIVES, TrainParams

SORT_WINDOW = 50  # batches whose rows are sorted by length together (cross-encoder training)
CURVE_POINTS = 50  # a run's loss curve holds about this many points, each the mean loss of a window of steps

COSENT_SCALE = 20.0  # CoSENT's lambda (Su 2022; AnglE uses the same)

ProgressFn = Callable[[dict[str, Any]], None]

__all__ = ["BestEpoch", "Feedback", "Preference", "Rating", "TrainParams", "evaluate", "fit", "fit_classifier"]


RewardOf = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def bt_loss(
    batch: Sequence[Rating | Preference], reward_of: RewardOf, objective: str = "bt", rating_margin: float = 0.0
) -> torch.Tensor | None:
    """The pairwise loss over every comparison the batch implies: for ratings every two pairs whose ratings
    differ, for preferences (chosen, rejected). ``objective`` "bt": Bradley-Terry, the mean of
    -log sigmoid(R(better) - R(worse)); "cosent": CoSENT, log(1 + sum exp(-lambda (R(better) - R(worse)))), which
    weighs the comparisons the model gets most wrong most.

    ``rating_margin`` (bt only): two rated pairs must differ in R by at least this times their ratings' difference,
    -log sigmoid(R(better) - R(worse) - rating_margin * (rating(better) - rating(worse))), TRL's margin term with the
    margin taken from the ratings; 0 is plain Bradley-Terry.

    ``reward_of(prompts, responses)`` gives R for a list of pairs. None when the batch implies no
    comparison (one rating, or ratings all equal)."""
    rates = [x for x in batch if isinstance(x, Rating)]
    prefs = [x for x in batch if isinstance(x, Preference)]
    losses = []
    if len(rates) > 1:
        r = reward_of([x.prompt for x in rates], [x.response for x in rates])
        y = torch.tensor([x.rating for x in rates], device=r.device)
        better = (y[:, None] > y[None, :]).float()
        if better.sum() > 0:
            if objective == "cosent":
                losses.append(_cosent((r[:, None] - r[None, :])[better.bool()]))
            else:
                margin = rating_margin * (y[:, None] - y[None, :]).to(r.dtype)
                losses.append((F.softplus(-(r[:, None] - r[None, :] - margin)) * better).sum() / better.sum())
    if prefs:
        n = len(prefs)
        r = reward_of([x.prompt for x in prefs] * 2, [x.chosen for x in prefs] + [x.rejected for x in prefs])
        losses.append(_cosent(r[:n] - r[n:]) if objective == "cosent" else F.softplus(-(r[:n] - r[n:])).mean())
    return torch.stack(losses).mean() if losses else None


def _cosent(margins: torch.Tensor) -> torch.Tensor:
    """CoSENT over the margins R(better) - R(worse) of a batch's comparisons."""
    return torch.logsumexp(torch.cat([margins.new_zeros(1), -COSENT_SCALE * margins]), dim=0)


def angle_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AnglE's similarity as sentence-transformers computes it (``util.pairwise_angle_sim``): |cos + sin| of the
    L2-normalised vectors, dimension i paired with i + D/2 for the sine, over the last dimension (odd D padded)."""
    if a.shape[-1] % 2:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a, b = F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1)
    cos = (a * b).sum(-1)
    a1, a2 = a.chunk(2, dim=-1)
    b1, b2 = b.chunk(2, dim=-1)
    return (cos + (a2 * b1 - a1 * b2).sum(-1)).abs()


def direction(heads: Heads) -> torch.Tensor:
    """Per head, +1 where R grows with the head's cosine (alpha * weight < 0), else -1: the similarity objectives
    train the heads' similarity in the direction R reads it, so R ranks pairs as the trained similarity does."""
    return torch.where(heads.alpha.detach() * heads.weight.detach() < 0, 1.0, -1.0)


def similarity(heads: Heads, emb_p: torch.Tensor, emb_r: torch.Tensor, objective: str, sign: torch.Tensor
               ) -> torch.Tensor:  # fmt: skip
    """The heads' similarity of each pair for a similarity objective: the mean over heads of sign_k times the
    cosine ("cosent_cos") or AnglE's similarity ("angle") of head k's projections."""
    a, b = heads.project(emb_p, "prompt"), heads.project(emb_r, "response")
    sims = angle_sim(a, b) if objective == "angle" else F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return (sims * sign.to(sims.dtype)).mean(dim=1)


def _bt_loss(
    heads: Heads,
    emb: torch.Tensor,
    batch: Sequence[Rating | Preference],
    index: dict[str, int],
    objective: str = "bt",
    rating_margin: float = 0.0,
    sign: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """bt_loss on embeddings already computed (``index``: text -> row of ``emb``). A similarity objective is CoSENT
    over the margins of ``similarity`` (``sign``: ``direction(heads)``), not of R."""

    def reward_of(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        p, r = emb[[index[p] for p in prompts]], emb[[index[r] for r in responses]]
        if objective in SIMILARITY_OBJECTIVES:
            return similarity(heads, p, r, objective, direction(heads) if sign is None else sign)
        return heads.reward(p, r)[0]

    return bt_loss(batch, reward_of, "cosent" if objective in SIMILARITY_OBJECTIVES else objective, rating_margin)


class Steps:
    """Takes a run's optimisation steps with its learning-rate schedule (``params.lr_schedule``), counts them,
    reports progress, and keeps the loss curve: the mean loss over windows of steps, about CURVE_POINTS points
    whatever the run's length."""

    def __init__(self, opt: torch.optim.Optimizer, params: TrainParams, batches: int, progress: ProgressFn | None):
        self.total, self.epochs, self.progress = max(1, params.epochs * batches), params.epochs, progress
        self.opt = opt
        self.clip = params.grad_norm_limit()
        self.factor = lr_factor(params, self.total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)
        self.window = max(1, self.total // CURVE_POINTS)
        self.curve: list[float] = []
        self.step = 0
        self.lr_factor = 1.0  # the share of the peak learning rates that the last step used
        self._win_sum, self._win_n = 0.0, 0
        self._running, self._n = 0.0, 0
        self._t0 = time.perf_counter()

    def new_epoch(self) -> None:
        self._running, self._n = 0.0, 0

    def take(self, epoch: int, loss: torch.Tensor | None) -> None:
        """One step of epoch ``epoch`` (from 0) on ``loss``, at the schedule's rates; ``loss`` None: the batch
        implied no comparison, so the weights stay but the step counts."""
        self.lr_factor = self.factor(self.step)
        if loss is not None:
            self.opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.clip)
            self.opt.step()
        self.sched.step()
        self.step += 1
        if loss is None:
            return
        value = float(loss.detach())
        self._running += value
        self._n += 1
        self._win_sum += value
        self._win_n += 1
        if self.step % self.window == 0:
            self.curve.append(self._win_sum / self._win_n)
            self._win_sum, self._win_n = 0.0, 0
        if self.progress is not None and (self.step % 10 == 0 or self.step == self.total):
            self.progress(
                {
                    "epoch": epoch + 1,
                    "epochs": self.epochs,
                    "step": self.step,
                    "total_steps": self.total,
                    "loss": self._running / max(self._n, 1),
                    "lr_factor": round(self.lr_factor, 6),
                    "elapsed_s": round(time.perf_counter() - self._t0, 2),
                    "curve": list(self.curve),
                }
            )

    def finish(self) -> list[float]:
        if self._win_n:
            self.curve.append(self._win_sum / self._win_n)
            self._win_n = 0
        return self.curve


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


def _batches(
    data: Feedback, size: int, rng: random.Random, length: Callable[[Rating | Preference], int] | None = None
) -> list[list[Rating | Preference]]:
    """Shuffled batches of one kind of feedback each. With ``length``, rows are sorted by it within windows of
    SORT_WINDOW batches first, so a batch pads to similar lengths (2.3x faster cross-encoder steps on STS-B)."""
    out: list[list[Rating | Preference]] = []
    kinds: tuple[list[Rating | Preference], ...] = (list(data.ratings), list(data.preferences))
    for rows in kinds:
        rng.shuffle(rows)
        if length is not None:
            window = size * SORT_WINDOW
            rows = [x for lo in range(0, len(rows), window) for x in sorted(rows[lo : lo + window], key=length)]
        out += [rows[i : i + size] for i in range(0, len(rows), size)]
    rng.shuffle(out)
    return out


@contextmanager
def dropout_rate(modules: Iterable[torch.nn.Module], p: float | None) -> Iterator[None]:
    """Every dropout layer of ``modules`` (hidden, attention, classifier) at rate ``p`` inside the block, as it was
    after; None leaves them as the model's config has them. Only training passes drop anything."""
    drops = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    before = [d.p for d in drops]
    if p is not None:
        for d in drops:
            d.p = p
    try:
        yield
    finally:
        for d, q in zip(drops, before, strict=True):
            d.p = q


class WeightAverage:
    """An exponential moving average of trained weights (``decay`` per step; 0: off), and swapping it with the
    weights in use: the model is validated, kept and saved with the averages, and trains on with its own."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.avg = [p.detach().clone() for p in self.params] if decay > 0 else []

    def update(self) -> None:
        """Move the averages toward the weights after a step."""
        if self.avg:
            with torch.no_grad():
                torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - self.decay)

    def swap(self) -> None:
        """Exchange the averages and the weights in use (a no-op when off)."""
        if not self.avg:
            return
        with torch.no_grad():
            for p, a in zip(self.params, self.avg, strict=True):
                held = p.detach().clone()
                p.copy_(a)
                a.copy_(held)


def _epochs(
    steps: Steps,
    params: TrainParams,
    batches: Callable[[], list[list[Rating | Preference]]],
    loss_of: Callable[[list[Rating | Preference]], torch.Tensor | None],
    average: WeightAverage,
    early_stopping: BestEpoch | None,
) -> None:
    """The epochs of a run: a step per batch, then the epoch is validated (with the averaged weights when
    ``average`` is on; training goes on from the model's own). The model ends with the weights of the last epoch
    run, averaged when on; ``early_stopping.restore`` then puts the best epoch's back."""
    for epoch in range(params.epochs):
        steps.new_epoch()
        for batch in batches():
            steps.take(epoch, loss_of(batch))
            average.update()
        average.swap()
        stop = early_stopping is not None and early_stopping.after_epoch(epoch)
        if stop or epoch == params.epochs - 1:
            return
        average.swap()


def _n_batches(data: Feedback, size: int) -> int:
    """How many batches ``_batches`` cuts ``data`` into (one kind of feedback per batch), without cutting them."""
    return sum(-(-len(rows) // size) for rows in (data.ratings, data.preferences))


def lr_factor(params: TrainParams, total: int) -> Callable[[int], float]:
    """The share of the peak learning rates that step ``i`` (from 0) of ``total`` uses: 1 throughout for the
    constant schedule, else a linear ramp from 0 over the ``warmup`` share of the steps, then a linear or cosine
    decay to 0 at the last step."""
    warm = max(1, int(total * params.warmup + 1e-9))

    def factor(step: int) -> float:
        if params.lr_schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        left = max(0.0, (total - step) / max(1, total - warm))
        return left if params.lr_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))

    return factor


def fit(
    model: SimExpModel,
    data: Feedback,
    params: TrainParams,
    progress: ProgressFn | None = None,
    early_stopping: BestEpoch | None = None,
) -> list[float]:
    """Train ``model``'s heads (replaced by trainable ones) and top encoder layers in place; return the
    loss curve. With ``train_layers=0`` the embeddings are computed once and epochs cost almost nothing.
    With ``early_stopping`` the model ends with the weights of its best epoch on that validation slice."""
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    if params.symmetric:
        data = symmetric(data)
    texts = data.texts()
    if early_stopping is not None and params.train_layers == 0:  # the slice is scored on cached embeddings too
        texts = list(dict.fromkeys([*texts, *early_stopping.val.texts()]))
    index = {t: i for i, t in enumerate(texts)}
    frozen_emb = model.embed(texts).to(model.device)
    model.heads = Heads(model.dim, params.n_heads, trained=True, init_noise=0.05 if params.n_heads > 1 else 0.0)
    model.heads.to(model.device).train()
    _warm_start(model.heads, frozen_emb, data, index, params.seed)
    # A similarity objective leaves alpha and weight as the warm start fit them (its loss does not read them): R
    # then ranks as the trained similarity does in each head's direction.
    sign = direction(model.heads)

    layers = _top_layers(model, params.train_layers)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    scales = [p for name, p in model.heads.named_parameters() if name not in ("alpha", "weight")]
    groups = [
        {"params": scales, "lr": params.head_lr},
        {"params": [model.heads.alpha, model.heads.weight], "lr": params.alpha_lr or params.head_lr},
    ]
    if layers:
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(True)
        trained = [(n, p) for n, p in model.encoder.named_parameters() if p.requires_grad]
        groups += layer_groups(trained, params.lr, params.layer_decay)
        model.encoder.train()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = Steps(opt, params, _n_batches(data, params.batch_size), progress)
    if early_stopping is not None:
        scorer = model if layers else CachedScorer(model.heads, frozen_emb, index)
        early_stopping.bind(scorer, [model.heads, model.encoder])

    def loss_of(batch: list[Rating | Preference]) -> torch.Tensor | None:
        if not layers:
            return _bt_loss(model.heads, frozen_emb, batch, index, params.objective, params.rating_margin, sign)
        batch_texts = list(dict.fromkeys(t for x in batch for t in _texts_of(x)))
        where = {t: i for i, t in enumerate(batch_texts)}
        emb = model.encode(batch_texts)
        return _bt_loss(model.heads, emb, batch, where, params.objective, params.rating_margin, sign)

    average = WeightAverage([p for group in opt.param_groups for p in group["params"]], params.ema_decay)
    with dropout_rate([model.encoder, model.heads], params.dropout):
        _epochs(steps, params, lambda: _batches(data, params.batch_size, rng), loss_of, average, early_stopping)
    if early_stopping is not None:
        early_stopping.restore()
    if early_stopping is not None or average.avg:
        model.weights_changed()
    model.encoder.eval()
    model.heads.eval()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    return steps.finish()


def fit_classifier(
    model: ClassifierModel,
    data: Feedback,
    params: TrainParams,
    progress: ProgressFn | None = None,
    early_stopping: BestEpoch | None = None,
) -> list[float]:
    """Train a cross-encoder with the TRL objective -log sigmoid(r_chosen - r_rejected) (ratings paired within a
    batch as for sim-exp): every weight but the word embeddings (frozen: half the parameters, a small share of
    what a few thousand pairs can teach); AdamW with linear warmup (10 %) and decay. Returns the loss curve.
    With ``early_stopping`` the model ends with the weights of its best epoch on that validation slice."""
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    if params.symmetric:
        data = symmetric(data)
    words = model.model.get_input_embeddings()
    if words is not None:
        words.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if _is_head(n)]
    body = layer_groups([(n, p) for n, p in trainable if not _is_head(n)], params.lr, params.layer_decay)
    lengths: dict[int, int] = {}

    def length(x: Rating | Preference) -> int:
        if id(x) not in lengths:
            lengths[id(x)] = len(x.prompt) + max(len(t) for t in _texts_of(x)[1:])
        return lengths[id(x)]

    opt = torch.optim.AdamW([*body, {"params": head, "lr": params.head_lr}], weight_decay=0.01)
    steps = Steps(opt, params, _n_batches(data, params.batch_size), progress)
    model.model.train()
    if early_stopping is not None:
        early_stopping.bind(model, [model.model])
    average = WeightAverage([p for _, p in trainable], params.ema_decay)
    with dropout_rate([model.model], params.dropout):
        _epochs(
            steps,
            params,
            lambda: _batches(data, params.batch_size, rng, length),
            lambda batch: bt_loss(batch, model.forward, params.objective, params.rating_margin),
            average,
            early_stopping,
        )
    if early_stopping is not None:
        early_stopping.restore()
    model.model.eval()
    return steps.finish()


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe)\.")


def layer_groups(named: Sequence[tuple[str, torch.nn.Parameter]], lr: float, decay: float) -> list[dict[str, Any]]:
    """Optimizer groups for a transformer body's parameters with layer-wise learning-rate decay: the top layer
    (and what sits above the stack: pooler, final norm) at ``lr``, each layer below at ``decay`` times the one
    above, the embeddings below the lowest layer. ``decay`` 1: one group at ``lr``."""
    if decay == 1.0:
        return [{"params": [p for _, p in named], "lr": lr}] if named else []
    index = {n: int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))}
    top = max(index.values(), default=-1)
    by_depth: dict[int, list[torch.nn.Parameter]] = {}
    for n, p in named:
        if n in index:
            depth = top - index[n]
        elif _EMBEDDINGS.search(n):
            depth = top + 1
        else:
            depth = 0
        by_depth.setdefault(depth, []).append(p)
    return [{"params": ps, "lr": lr * decay**d} for d, ps in sorted(by_depth.items())]


def _is_head(name: str) -> bool:
    return name.startswith(("classifier.", "score.", "value_head."))  # value_head: an OpenRLHF model's, wrapped


def _texts_of(x: Rating | Preference) -> tuple[str, ...]:
    return (x.prompt, x.response) if isinstance(x, Rating) else (x.prompt, x.chosen, x.rejected)


def _top_layers(model: SimExpModel, n: int) -> list[torch.nn.Module]:
    if n <= 0:
        return []
    stack = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if stack is None:
        raise ValueError("training encoder layers needs a BERT-style encoder (encoder.layer)")
    if n > len(stack):
        raise ValueError(f"train_layers={n} but the encoder has {len(stack)} layers")
    return list(stack[-n:])
