"""Pydantic request and response models for the HTTP API (separate from the ORM tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ItemIn(BaseModel):
    id: str | int | None = Field(default=None, description="optional, unique within the job")
    prompt: str
    response: str


class JobCreate(BaseModel):
    items: list[ItemIn] = Field(min_length=1)
    model_version: str | None = Field(default=None, description="defaults to the active version")
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
    summary: ScoreSummary | None = None
    error_counts: dict[str, int] | None = Field(default=None, description="failed items by reason code")
    failed_items: list[FailedItem] | None = Field(default=None, description="the first 100 failed items")


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


class ResultOut(BaseModel):
    index: int
    id: str
    prompt: str
    response: str
    score: float
    cos: list[float]
    model_version: str
    truncated: bool = Field(description="the prompt or the response was cut to REWARDQ_MAX_LENGTH tokens")


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
    """Fine-tuning parameters; every field has a default."""

    model_config = {"extra": "forbid"}

    epochs: int = Field(default=2, ge=1, le=100)
    lr: float = Field(default=2e-5, gt=0, le=1.0, description="learning rate of the trained encoder layers")
    head_lr: float = Field(default=1e-2, gt=0, le=10.0, description="learning rate of heads, alpha and weight")
    n_heads: int = Field(default=1, ge=1, le=16, description="K")
    train_layers: int = Field(default=2, ge=0, le=48, description="top encoder layers to fine-tune (0: heads only)")
    batch_size: int = Field(default=32, ge=2, le=4096)
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = Field(default=0, ge=0)
    gate_margin: float | None = Field(default=None, ge=-1, le=1, description="default REWARDQ_GATE_MARGIN")


class TrainingRunOut(BaseModel):
    run_id: str
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    loss_curve: list[float]
    metrics: dict[str, Any]
    base_version: str | None
    result_version: str | None
    n_feedback: int
    schedule_id: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TrainingRunList(BaseModel):
    runs: list[TrainingRunOut]


class ModelVersionOut(BaseModel):
    version: str
    base_model: str
    active: bool
    n_heads: int
    metrics: dict[str, Any]
    run_id: str | None
    created_at: datetime


class ModelList(BaseModel):
    active: str | None
    models: list[ModelVersionOut]


class ScheduleIn(BaseModel):
    model_config = {"extra": "forbid"}

    cron: str = Field(description="5 fields (minute hour day month weekday), or 6 with seconds last")
    min_new_feedback: int = Field(default=0, ge=0, description="skip a tick with fewer new feedback rows")
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
