"""The Celery application and its configuration only; tasks live in workers.tasks."""

from __future__ import annotations

from celery import Celery

from storage.settings import get_settings

SCORE_BATCH = "rewardq.score_batch"
SCORE_INTERACTIVE = "rewardq.score_interactive"
TRAIN = "rewardq.train"

_settings = get_settings()

app = Celery("rewardq", broker=_settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # Late acks + reject on lost worker: a batch whose worker dies is redelivered, and the
    # idempotent upsert makes the redelivery harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A new pool process loads the model before it reports up (tasks._preload): Celery's 4 s default killed the
    # replacement of a crashed process again and again while it loaded.
    worker_proc_alive_timeout=120,
    task_default_queue=_settings.scoring_queue,
    task_routes={
        SCORE_BATCH: {"queue": _settings.scoring_queue},
        TRAIN: {"queue": _settings.training_queue},
        SCORE_INTERACTIVE: {"queue": _settings.interactive_queue},
    },
    # Kombu polls a worker's queues in the order they were given (BRPOP over the list, no rotation): a worker
    # started with `-Q interactive,scoring,training` takes interactive work before bulk work, always.
    broker_transport_options={"visibility_timeout": 3600, "queue_order_strategy": "priority"},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
