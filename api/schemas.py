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
    summary: ScoreSummary | None = None


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


class ResultPage(BaseModel):
    job_id: str
    results: list[ResultOut]
    next_cursor: str | None


class ErrorOut(BaseModel):
    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
