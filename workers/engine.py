"""Batch scoring: the per-process model cache and the score-then-upsert step behind each task."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from storage import repository as repo
from storage.db import session_scope
from storage.models import FINISHED
from storage.settings import get_settings
from workers import events, metrics
from workers.errors import InjectedFault, ModelUnavailable, is_transient, reason_code
from workers.feeder import feed_quietly
from workers.messages import ScoreBatch, build_messages, enqueue_score_batches
from workers.registry import resolve_encoder

if TYPE_CHECKING:
    from workers.model import RewardModel, Scores

log = logging.getLogger(__name__)

_MAX_LOADED = 2
_models: OrderedDict[str, RewardModel] = OrderedDict()
_lock = threading.Lock()


def get_model(version: str) -> RewardModel:
    """The loaded model for ``version``: loaded on first use in this process, kept in a small LRU."""
    with _lock:
        if version in _models:
            _models.move_to_end(version)
            return _models[version]
        from workers.model import RewardModel

        settings = get_settings()
        with session_scope() as s:
            mv = repo.get_model_version(s, version=version)
            if mv is None:
                raise ModelUnavailable(version)
            path = mv.path
        encoder_path, _ = resolve_encoder(settings.model)
        t0 = time.perf_counter()
        if path is not None:
            from workers.artifacts import load_version

            if not Path(path).is_dir():
                raise ModelUnavailable(f"{version}: artifacts not found at {path} (is REWARDQ_ARTIFACTS_DIR shared?)")
            model = load_version(Path(path), encoder_path, max_length=settings.max_length,
                                 encode_batch_size=settings.encode_batch_size)  # fmt: skip
        else:
            model = RewardModel(version, encoder_path, max_length=settings.max_length,
                                encode_batch_size=settings.encode_batch_size)  # fmt: skip
        model.token_budget = settings.token_budget or model.token_budget
        model.cache_size = settings.embed_cache_size
        if settings.embed_shared_ttl_s:
            from workers.embed_store import RedisEmbeddingStore

            model.shared = RedisEmbeddingStore(settings.redis_url, namespace=f"{version}:{model.max_length}",
                                               dim=model.dim, ttl_s=settings.embed_shared_ttl_s)  # fmt: skip
        model.autocast = settings.autocast
        log.info("loaded model %s in %.1fs on %s", version, time.perf_counter() - t0, model.device)
        _models[version] = model
        while len(_models) > _MAX_LOADED:
            _models.popitem(last=False)
        return model


def _score(msg: ScoreBatch) -> Scores:
    marker = get_settings().fault_poison_marker
    if marker and any(marker in t for t in (*msg.prompts, *msg.responses)):
        raise InjectedFault(f"a text contains the fault marker {marker!r}")
    return get_model(msg.model_version).score(msg.prompts, msg.responses)


def score_batch(msg: ScoreBatch) -> int:
    """Score one message and upsert its results with the job's progress in one transaction.

    Returns the number of new result rows (0 for a redelivered, superseded or cancelled batch).
    A batch that fails for a reason of its own (not a service outage) is split in halves until
    the failing item is alone; that item goes to the error ledger and the rest is scored.
    """
    with session_scope() as s:
        status = repo.job_status(s, job_id=msg.job_id)
        if status is None or status in FINISHED or not repo.start_batch(s, job_id=msg.job_id, batch_no=msg.batch_no):
            log.info("skipping batch %s/%d: job %s or batch done", msg.job_id, msg.batch_no, status or "gone")
            return 0
        repo.mark_running(s, job_id=msg.job_id)
    settings = get_settings()
    try:
        scores = _score(msg)
    except ModelUnavailable:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        _quarantine(msg, exc)
        return 0
    stats = get_model(msg.model_version).take_stats()
    t0 = time.perf_counter()
    reject = settings.truncation == "reject"
    rejected = frozenset(i for i, t in enumerate(scores.truncated) if t and reject)
    with session_scope() as s:
        for i in sorted(rejected):
            repo.record_item_failure(s, job_id=msg.job_id, batch_no=msg.batch_no, idx=msg.start_idx + i,
                                     code="too_long", message=f"longer than {settings.max_length} tokens")  # fmt: skip
        inserted = repo.save_results(
            s, job_id=msg.job_id, batch_no=msg.batch_no, start_idx=msg.start_idx, scores=scores.reward,
            cos=scores.cos, model_version=msg.model_version, truncated=scores.truncated, skip=rejected,
            cache_hits=int(stats.get("embed_cache_hits", 0)), cache_misses=int(stats.get("embed_cache_misses", 0)),
        )  # fmt: skip
        ended = repo.job_status(s, job_id=msg.job_id) in FINISHED  # this batch may have been the job's last
    if ended:
        events.publish_finished(settings.redis_url, msg.job_id)  # wakes GET /v1/jobs/{id}?wait=
    feed_quietly()  # keep the queue topped up from SQL as batches complete
    metrics.record(settings.redis_url, {**stats, "items_scored": inserted, "batches": 1,
                                        "items_failed": float(len(rejected)),
                                        "db_seconds": time.perf_counter() - t0})  # fmt: skip
    return inserted


def _announce_if_finished(job_id: str) -> None:
    """Wake whoever waits on the job (GET /v1/jobs/{id}?wait=) if it has ended."""
    with session_scope() as s:
        status = repo.job_status(s, job_id=job_id)
    if status in FINISHED:
        events.publish_finished(get_settings().redis_url, job_id)


def fail_job(job_id: str, error: str) -> None:
    log.error("job %s failed: %s", job_id, error)
    with session_scope() as s:
        repo.mark_failed(s, job_id=job_id, error=error[:2000])
    _announce_if_finished(job_id)


def _quarantine(msg: ScoreBatch, exc: BaseException) -> None:
    if len(msg.prompts) == 1:
        log.warning("item %s/%d failed: %s", msg.job_id, msg.start_idx, exc)
        with session_scope() as s:
            new = repo.record_item_failure(s, job_id=msg.job_id, batch_no=msg.batch_no, idx=msg.start_idx,
                                           code=reason_code(exc), message=f"{type(exc).__name__}: {exc}")  # fmt: skip
        metrics.record(get_settings().redis_url, {"items_failed": float(new)})
        _announce_if_finished(msg.job_id)
        return
    with session_scope() as s:
        halves = repo.split_batch(s, job_id=msg.job_id, batch_no=msg.batch_no)
        messages = build_messages(s, job_id=msg.job_id, model_version=msg.model_version, batches=halves)
    log.warning("batch %s/%d (%d items) failed (%s): split in %d", msg.job_id, msg.batch_no, len(msg.prompts),
                exc, len(halves))  # fmt: skip
    enqueue_score_batches(messages, queue=get_settings().scoring_queue)
