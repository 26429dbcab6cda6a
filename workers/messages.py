"""Typed task payloads and the enqueue helper: all that the API needs from the workers (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from workers.celery_app import SCORE_BATCH, TRAIN, app


class ScoreBatch(BaseModel):
    """One queued message: a contiguous range of a job's items and their texts."""

    job_id: str
    batch_no: int
    start_idx: int
    model_version: str
    prompts: list[str]
    responses: list[str]


def enqueue_score_batches(messages: Sequence[ScoreBatch], queue: str) -> None:
    """Publish the batches to ``queue`` over one broker connection."""
    with app.producer_or_acquire() as producer:
        for msg in messages:
            app.send_task(SCORE_BATCH, kwargs={"payload": msg.model_dump()}, queue=queue, producer=producer)


def enqueue_training_run(run_id: str, queue: str) -> None:
    app.send_task(TRAIN, kwargs={"run_id": run_id}, queue=queue)
