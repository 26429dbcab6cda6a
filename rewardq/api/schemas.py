"""Pydantic request and response models for the HTTP API (separate from the ORM tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class ItemIn(BaseModel):
    id: str | int | None = Field(default=None, description="optional, unique within the job")
    prompt: str
    response: str


INLINE_ENSEMBLE = "an id or a name (default: your active version), or {version: weight, ...} for their ensemble"


class JobCreate(BaseModel):
    items: list[ItemIn] = Field(min_length=1)
    model_version: str | dict[str, float] | None = Field(default=None, description=INLINE_ENSEMBLE)
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobCreated(BaseModel):
    job_id: str
    status: str
    n_items: int
    model_version: str


class Progress(BaseModel):
    done: int
    failed: int
    total: int
    fraction: float


class ScoreSummary(BaseModel):
    count: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    p10: float | None = None
    p50: float | None = None
    p90: float | None = None


class FailedItem(BaseModel):
    index: int
    id: str
    code: str
    message: str


class JobOut(BaseModel):
    job_id: str
    status: str
    model_version: str
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_s: float | None = Field(description="from the first batch started to the last stored, or to now")
    pairs_per_s: float | None
    metadata: dict[str, Any]
    error: str | None = None
    embed_cache_hits: int = Field(default=0, description="texts whose embedding a worker already had")
    embed_cache_misses: int = Field(default=0, description="texts the encoder ran on")
    scored_with: dict[str, int] | None = Field(
        default=None,
        description="batches by how they were scored: kind, reward kernel path (triton, torch), encoder precision and,"
        " in low precision, how the encoder's passes were shaped (packed, fixed, dynamic)",
    )
    summary: ScoreSummary | None = None
    error_counts: dict[str, int] | None = Field(default=None, description="failed items by reason code")
    failed_items: list[FailedItem] | None = Field(default=None, description="the first 100 failed items")
    notice: str | None = Field(
        default=None,
        description="while it waits: why it may not move (no live worker consumes its queue), and what to do",
    )


class HistogramBin(BaseModel):
    lo: float
    hi: float
    count: int


class Histogram(BaseModel):
    job_id: str
    count: int = Field(description="scored items")
    min: float | None
    max: float | None
    bins: list[HistogramBin] = Field(description="equal-width bins over [min, max]; the last one includes max")


class JobList(BaseModel):
    jobs: list[JobOut]


class Component(BaseModel):
    version: str = Field(description="a member of the ensemble")
    weight: float
    score: float = Field(description="the member's own score of the pair (the result's score is the weighted sum)")


COMPONENTS_DOC = "an ensemble's member scores, in its order; other versions: None"


class ResultOut(BaseModel):
    index: int
    id: str
    prompt: str
    response: str
    score: float
    score_z: float | None = Field(
        default=None, description="(score - mean) / std of the version's scores on known pairs"
    )
    percentile: float | None = Field(default=None, description="0-100: where the score falls among those scores")
    cos: list[float] = Field(description="sim_exp: the K head similarities cos_k; other kinds: []")
    model_version: str
    truncated: bool = Field(description="the text was cut to the version's token limit")
    n_tokens: int | None = Field(default=None, description="likelihood: the response tokens the reward is over")
    components: list[Component] | None = Field(default=None, description=COMPONENTS_DOC)


class ResultPage(BaseModel):
    job_id: str
    results: list[ResultOut]
    next_cursor: str | None


class ErrorOut(BaseModel):
    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


class FeedbackAdded(BaseModel):
    added: int
    preferences: int
    ratings: int
    total: int = Field(description="all of the tenant's feedback after this request")


class FeedbackStats(BaseModel):
    total: int
    preferences: int
    ratings: int


class TrainingParams(BaseModel):
    """Fine-tuning parameters; every field has a default (some depend on the kind: see docs/retraining.md)."""

    model_config = {"extra": "forbid"}

    epochs: int | None = Field(
        default=None, ge=1, le=100, description="passes over the training slice; default 3 (sim_exp), 2 (classifier)"
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        le=1.0,
        description="peak learning rate of the trained encoder layers; default 5e-5 (sim_exp), 1e-4 (classifier)",
    )
    head_lr: float | None = Field(
        default=None,
        gt=0,
        le=10.0,
        description="learning rate of heads, alpha and weight (classifier: the score head); "
        "default 1e-2 (sim_exp), 2e-3 (classifier)",
    )
    alpha_lr: float | None = Field(
        default=None, gt=0, le=10.0, description="sim_exp: learning rate of alpha and weight; default head_lr"
    )
    n_heads: int = Field(default=1, ge=1, le=16, description="K")
    train_layers: int = Field(default=4, ge=0, le=48, description="top encoder layers to fine-tune (0: heads only)")
    batch_size: int | None = Field(
        default=None, ge=2, le=4096, description="pairs per step; default 32 (sim_exp), 64 (classifier)"
    )
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1, description="the gate slice: judged by the gate only")
    validation_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="the validation slice: picks the best epoch (0: keep the last epoch)"
    )
    patience: int = Field(default=2, ge=1, le=100, description="stop after this many epochs without a better one")
    objective: Literal["bt", "cosent", "cosent_cos", "angle"] = Field(
        default="bt",
        description="bt: Bradley-Terry; cosent: a ranking loss on reward margins weighing the worst-ordered "
        "comparisons; sim_exp only: cosent_cos and angle, sentence-transformers' CoSENTLoss and AnglELoss on the "
        "heads' cosine (AnglE: |cos + sin|) margins",
    )
    rating_margin: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="bt on ratings: two rated pairs' rewards should differ by at least this times their ratings' "
        "difference (TRL's margin term); default 0",
    )
    seed: int = Field(default=0, ge=0)
    window: int | None = Field(
        default=None,
        ge=0,
        le=100_000_000,
        description="train on the tenant's newest feedback rows, this many (0: all); default REWARDQ_TRAIN_WINDOW "
        "(100,000). The gate and validation slices come from the same rows",
    )
    window_sample: int = Field(
        default=0,
        ge=0,
        le=100_000_000,
        description="and this many of the older rows beside the window, drawn uniformly with the run's seed",
    )
    gate_margin: float | None = Field(
        default=None, ge=-1, le=1, description="default REWARDQ_GATE_MARGIN; below 0 needs an admin key"
    )
    kind: Literal["sim_exp", "classifier"] = Field(
        default="sim_exp",
        description="classifier: a cross-encoder initialised from the encoder with a new score head; default the "
        "start_version's kind when one is named, else sim_exp",
    )
    start_version: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="the version to train from (its id or name; sim_exp or classifier): its weights, and for an "
        "imported sentence encoder its pooling. Default: the tenant's active version when it is of the run's kind, "
        "else the base encoder",
    )
    symmetric: bool | None = Field(default=None, description="also train on (response, prompt): unordered pairs")
    max_length: int | None = Field(default=None, ge=8, le=4096, description="classifier: tokens per pair")
    lr_schedule: Literal["constant", "linear", "cosine"] | None = Field(
        default=None,
        description="learning rates over the run: constant, or linear/cosine decay to 0 after a linear warmup; "
        "default linear",
    )
    warmup: float | None = Field(default=None, ge=0, lt=1, description="share of the steps spent warming up; 0.1")
    dropout: float | None = Field(
        default=None, ge=0, lt=1, description="every dropout layer's rate while training; default the model's own"
    )
    ema_decay: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="validate, keep and save an exponential moving average of the trained weights, with this decay "
        "per step; default 0 (off)",
    )
    layer_decay: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="each trained encoder layer's learning rate is this times the one above's (the embeddings' "
        "below the lowest layer's); default 1, one rate for every layer",
    )
    max_grad_norm: float | None = Field(
        default=None,
        ge=0,
        le=1e6,
        description="clip every step's gradients to this norm (0: off); default 1 for cosent_cos and angle, as "
        "sentence-transformers does, off for bt and cosent",
    )


class TrainingRunOut(BaseModel):
    run_id: str
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    loss_curve: list[float]
    metrics: dict[str, Any]
    base_version: str | None = Field(
        description="the tenant's active version when the run started: the gate's opponent"
    )
    start_version: str | None = Field(
        default=None, description="the version whose weights the run trained from (the base encoder's for a new model)"
    )
    result_version: str | None
    n_feedback: int
    schedule_id: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    notice: str | None = Field(
        default=None,
        description="while it waits: why it may not move (no live worker consumes its queue), and what to do",
    )


class TrainingRunList(BaseModel):
    runs: list[TrainingRunOut]


class TrainingDefaults(BaseModel):
    kinds: dict[str, dict[str, Any]] = Field(
        description="for each trainable kind, every parameter a run of that kind uses when the request leaves it out"
    )


class ModelVersionOut(BaseModel):
    version: str
    kind: str = Field(description="sim_exp, classifier or likelihood")
    name: str | None = None
    base_model: str
    owner: str = Field(description="'shared' (every tenant may use it) or 'own' (made by one of your runs)")
    active: bool = Field(description="the version your new jobs use")
    default: bool = Field(description="the operator's default, used by every tenant that has not chosen its own")
    n_heads: int
    settings: dict[str, Any] = Field(default_factory=dict, description="token limit, truncation side, reduction, dtype")
    metrics: dict[str, Any]
    score_stats: dict[str, Any] | None = Field(
        default=None,
        description="its scores' distribution on known pairs (n, mean, std, 101 quantiles, source): what a score of "
        "this version means; results carry score_z and percentile from it",
    )
    run_id: str | None
    created_at: datetime


class ModelList(BaseModel):
    active: str | None = Field(description="the version your new jobs use")
    default: str | None = Field(description="the operator's default")
    models: list[ModelVersionOut]


class EnsembleMember(BaseModel):
    model_config = {"extra": "forbid"}

    version: str = Field(
        min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$", description="a version's id or name (yours or shared)"
    )
    weight: float = Field(
        allow_inf_nan=False, ge=-1e6, le=1e6, description="its share of the reward: R = sum of weight x R_member"
    )


class EnsembleCreate(BaseModel):
    """POST /v1/models/ensemble: a weighted sum of versions, usable wherever a version is named."""

    model_config = {"extra": "forbid"}

    members: list[EnsembleMember] = Field(min_length=2, max_length=8, description="2 to 8 distinct versions")
    name: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$", description="unique among your versions"
    )


class ModelImport(BaseModel):
    """A local Hugging Face folder on the API's machine to register as a shared version (admin keys only)."""

    model_config = {"extra": "forbid"}

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="folder with config.json and *.safetensors; for sim_exp, a sentence-transformers folder "
        "(modules.json) or a plain encoder (mean pooling)",
    )
    kind: Literal["classifier", "likelihood", "sim_exp"]
    name: str | None = Field(default=None, max_length=256)
    max_length: int | None = Field(
        default=None,
        ge=8,
        le=131072,
        description="tokens per pair (default 512 / 1024); sim_exp: per text (default its max_seq_length, or 256)",
    )
    truncation_side: Literal["left", "right"] | None = Field(default=None, description="default left")
    reduction: Literal["mean", "sum"] | None = Field(default=None, description="likelihood: default mean")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(default=None, description="default float32")
    normalize: bool | None = Field(
        default=None,
        description="an OpenRLHF reward model: (r - mean) / std with the mean and std in its config.json, as serve_rm "
        "--reward.normalize_enable; default its config's normalize_reward",
    )


class ScheduleIn(BaseModel):
    model_config = {"extra": "forbid"}

    cron: str = Field(description="5 fields (minute hour day month weekday), or 6 with seconds last")
    min_new_feedback: int = Field(
        default=0, ge=0, le=2_000_000_000, description="skip a tick with fewer new feedback rows"
    )
    params: TrainingParams = Field(default_factory=TrainingParams)


class ScheduleOut(BaseModel):
    schedule_id: str
    cron: str
    min_new_feedback: int
    params: dict[str, Any]
    next_run_at: datetime
    last_fired_at: datetime | None
    created_at: datetime


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


class ScoreRequest(BaseModel):
    """POST /v1/score: pairs answered in the same response (the interactive lane)."""

    items: list[ItemIn] = Field(min_length=1, description="at most REWARDQ_INTERACTIVE_MAX_ITEMS (2,048)")
    model_version: str | dict[str, float] | None = Field(default=None, description=INLINE_ENSEMBLE)
    persist: bool = Field(default=False, description="also keep the pairs and scores as a job (its id is returned)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="with persist: the job's metadata")


class ScoreRow(BaseModel):
    index: int
    id: str
    score: float | None = Field(description="None when the pair could not be scored (see error)")
    score_z: float | None = Field(default=None, description="(score - mean) / std of the version's known scores")
    percentile: float | None = Field(default=None, description="0-100: where the score falls among them")
    cos: list[float] | None = Field(default=None, description="sim_exp: the K head similarities; other kinds: []")
    truncated: bool = False
    n_tokens: int | None = Field(default=None, description="likelihood: response tokens scored")
    components: list[Component] | None = Field(default=None, description=COMPONENTS_DOC)
    error: dict[str, str] | None = Field(default=None, description="{code, message} for a pair that failed alone")


class ScoreOut(BaseModel):
    model_version: str
    kind: str = Field(description="the version's kind")
    results: list[ScoreRow]
    job_id: str | None = Field(default=None, description="with persist: the job that keeps these scores")
    status: str | None = Field(default=None, description="with persist: the job's status")


class DeletedRows(BaseModel):
    items: int
    results: int
    item_errors: int = Field(description="rows of the error ledger (failed items)")
    batches: int


class JobDeleted(BaseModel):
    job_id: str
    cancelled: bool = Field(description="it was queued or running, so it was cancelled first")
    deleted: DeletedRows


class FeedbackDeleted(BaseModel):
    deleted: int
    before: datetime | None = Field(description="only rows created before this were deleted (None: all)")
    total: int = Field(description="the tenant's feedback left")
