"""Training-run parameters and their defaults per kind (no torch: the API resolves them when a run is created)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# sim_exp objectives on the heads' similarity, as sentence-transformers' CoSENTLoss and AnglELoss define them (lambda
# 20), not on R's margins: "cosent_cos" CoSENT over cosine margins, "angle" over AnglE's |cos + sin| margins.
SIMILARITY_OBJECTIVES = ("cosent_cos", "angle")


@dataclass
class TrainParams:
    kind: str = "sim_exp"  # or "classifier": a cross-encoder initialised from the encoder with a new score head
    epochs: int = 3
    lr: float = 5e-5  # encoder layers (the peak, with lr_schedule)
    head_lr: float = 1e-2  # heads, alpha, weight (classifier: the score head)
    alpha_lr: float | None = None  # sim_exp: alpha and weight alone (None: head_lr)
    n_heads: int = 1
    train_layers: int = 4  # classifier: every layer is trained
    batch_size: int = 32
    heldout_fraction: float = 0.1  # the gate slice: scored once, by the gate only
    validation_fraction: float = 0.05  # the validation slice: picks the best epoch (0: the last epoch is kept)
    patience: int = 2  # stop after this many epochs without a better validation score (epochs is the most)
    objective: str = "bt"  # "cosent": a ranking loss that weighs the worst-ordered comparisons most; sim_exp also
    # takes SIMILARITY_OBJECTIVES
    rating_margin: float = 0.0  # bt: R(better) - R(worse) must pass this times the rating gap (TRL's margin)
    seed: int = 0
    symmetric: bool = False  # also train on (response, prompt): for feedback whose pairs are unordered (STS)
    max_length: int = 256  # classifier: tokens of the prompt and response together
    lr_schedule: str = "linear"  # "constant", or "linear"/"cosine" decay to 0 after a warmup
    warmup: float = 0.1  # linear/cosine: the share of the steps over which the learning rates ramp up from 0
    dropout: float | None = None  # every dropout layer's rate while training (None: the model's own, 0.1 for MiniLM)
    ema_decay: float = 0.0  # the run keeps an exponential moving average of its weights, this decay per step (0: off)
    layer_decay: float = 1.0  # each trained encoder layer's lr is this times the one above's (1: one lr for all)
    window: int | None = None  # the newest feedback rows the run uses (None: REWARDQ_TRAIN_WINDOW; 0: all)
    window_sample: int = 0  # and this many of the older rows beside them, drawn uniformly (seeded)
    start_version: str | None = None  # train from this version (None: the active one when of this kind, else the base)
    # Every step's gradients scaled to at most this norm, over every trained weight (0: off). None: 1.0 for the
    # SIMILARITY_OBJECTIVES, as sentence-transformers' trainer clips them (without it they trailed by 0.01-0.015
    # Spearman), off for bt and cosent on R, which Adam's scaling already tames (the same with and without).
    max_grad_norm: float | None = None

    def grad_norm_limit(self) -> float:
        """The norm every step's gradients are clipped to, 0 for none (see max_grad_norm)."""
        if self.max_grad_norm is not None:
            return self.max_grad_norm
        return 1.0 if self.kind == "sim_exp" and self.objective in SIMILARITY_OBJECTIVES else 0.0


# What differs from the defaults above for a kind (chosen on held-out training feedback, see docs/retraining.md). A kind
# names every default its figures were measured with, so a change to the sim_exp ones leaves its runs as they were.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "classifier": {"epochs": 2, "lr": 1e-4, "head_lr": 2e-3, "batch_size": 64},
}


def objective_refused(kind: str, objective: str) -> str | None:
    """Why a run of ``kind`` cannot train with ``objective``, or None."""
    if kind != "sim_exp" and objective in SIMILARITY_OBJECTIVES:
        return f"{objective} trains a sim_exp version's similarity; a {kind} run takes bt or cosent"
    return None


def params_for(raw: dict[str, Any]) -> TrainParams:
    """TrainParams from a run's parameters: the kind's defaults, then what the user gave (unknown keys ignored)."""
    known = {k: v for k, v in raw.items() if k in TrainParams.__dataclass_fields__ and v is not None}
    params = TrainParams(**{**KIND_DEFAULTS.get(str(known.get("kind", "sim_exp")), {}), **known})
    params.max_grad_norm = params.grad_norm_limit()  # the run shows the limit it used
    return params


def resolved(raw: dict[str, Any]) -> dict[str, Any]:
    """Every parameter a run will use, for storing on the run (gate_margin and other extras kept as given)."""
    return {**raw, **asdict(params_for(raw))}


def window_rows(params: TrainParams, n_feedback: int, default_window: int) -> int:
    """How many of ``n_feedback`` rows a run uses: its window of the newest (``default_window`` when it names none;
    0: all), and its sample of the older ones."""
    window = default_window if params.window is None else params.window
    if window <= 0 or n_feedback <= window:
        return n_feedback
    return window + min(params.window_sample, n_feedback - window)


def planned_steps(params: TrainParams, n_train: int) -> int:
    """About how many optimisation steps a run on ``n_train`` feedback rows takes (REWARDQ_MAX_TRAIN_STEPS)."""
    rows = n_train * (2 if params.symmetric else 1)
    return params.epochs * max(1, -(-rows // params.batch_size))
