"""The Celery application and its configuration only; tasks live in workers.tasks."""

from __future__ import annotations

from celery import Celery

from rewardq.storage.settings import get_settings

SCORE_BATCH = "rewardq.score_batch"
SCORE_INTERACTIVE = "rewardq.score_interactive"
TRAIN = "rewardq.train"
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's Redis transport: 0 is served first
_PRIORITY_SEP = "\x06\x16"  # how kombu names a step's list: queue + separator + step (step 0: the queue itself)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step, first served first."""
    return [queue if p == 0 else f"{queue}{_PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


_settings = get_settings()

app = Celery("rewardq", broker=_settings.redis_url, include=["rewardq.workers.tasks"])
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
    # Priorities (Redis keeps one list per step, served from step 0): fair share among tenants (workers.feeder). The
    # worker polls step-major: every queue's step 0, then step 3, ...; interactive and training messages are step 0.
    broker_transport_options={
        "visibility_timeout": 3600,
        "queue_order_strategy": "priority",
        "priority_steps": list(PRIORITY_STEPS),
    },
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
