"""Batch scoring: the per-process model cache and the score-then-upsert step behind each task."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded

from rewardq.storage import registry
from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.models import FINISHED
from rewardq.storage.settings import Settings, get_settings
from rewardq.workers import events, liveness, metrics
from rewardq.workers.calibration import calibrate
from rewardq.workers.errors import (
    InjectedFault,
    InjectedOutage,
    ModelLoadFailed,
    ModelUnavailable,
    WorkerLost,
    is_transient,
    public_message,
    reason_code,
)
from rewardq.workers.feeder import feed_quietly, refill_room
from rewardq.workers.messages import (
    QUEUED_BATCHES,
    InteractiveBatch,
    ScoreBatch,
    batch_key,
    build_messages,
    enqueue_score_batches,
    note_served,
)
from rewardq.workers.models import ENSEMBLE, load_model
from rewardq.workers.models.base import Preempted

if TYPE_CHECKING:
    from rewardq.workers.models.base import RewardModel, Scores

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
        settings = get_settings()
        with session_scope() as s:
            mv = registry.get_version(s, version=version)
            if mv is None:
                raise ModelUnavailable(version)
            kind, path, config = mv.kind, mv.path, dict(mv.config)
        # Make room first: at most _MAX_LOADED models held, the new one included (an ensemble counts each model it
        # holds; one larger than that is held alone).
        need = len(config.get("members") or ()) if kind == ENSEMBLE else 1
        while _models and sum(m.n_models for m in _models.values()) + need > max(_MAX_LOADED, need):
            _models.popitem(last=False)
        t0 = time.perf_counter()
        try:
            if settings.fault_load_fail_file and os.path.exists(settings.fault_load_fail_file):
                raise OSError(f"injected: {settings.fault_load_fail_file} exists")  # testing aid
            model = load_model(kind, version, path, config, settings)
        except SoftTimeLimitExceeded:
            raise  # the task's own time limit (a training run's), not a load failure
        except Exception as exc:  # an import, the files, memory at load: this worker's failure, never the batch's
            ref = uuid.uuid4().hex[:12]
            log.error("model %s (%s) cannot be loaded (ref %s): %s: %s", version, kind, ref, type(exc).__name__, exc)
            raise ModelLoadFailed(
                f"{version} ({kind}) cannot be loaded on this worker: {type(exc).__name__} (ref {ref}: see its log)"
            ) from exc
        log.info("loaded %s model %s in %.1fs on %s", kind, version, time.perf_counter() - t0, model.device)
        calibrate(version, model)
        _models[version] = model
        return model


def cache_scope(settings: Settings, tenant: str, fallback: str) -> str:
    """Whose cached embeddings a batch may use: its tenant's (the default), or every tenant's when the operator opted
    into one global cache (REWARDQ_EMBED_CACHE_SCOPE=global). A message without a tenant (queued by an older
    version) shares with nothing: ``fallback`` names its job or request."""
    if settings.embed_cache_scope == "global":
        return "*"
    return f"t:{tenant}" if tenant else f"x:{fallback}"


def scored_with(model: RewardModel, stats: dict[str, float]) -> str:
    """How a batch was scored, as recorded on it ("sim_exp kernel=triton precision=bf16 passes=packed"; the shape of
    the encoder's passes is named in low precision only, where it changes the last bits); the batch is counted in
    ``stats`` under its kernel path (batches_kernel_triton or _torch; a kind with no reward kernel of its own in
    neither)."""
    s = model.settings()
    path = s.get("kernel")
    if path:
        stats[f"batches_kernel_{path}"] = 1.0
    precision = s.get("autocast") or s.get("dtype") or "off"
    passes = f" passes={s['passes']}" if s.get("passes") and precision != "off" else ""
    return f"{s['kind']} kernel={path or 'none'} precision={precision}{passes}"


def _score(model: RewardModel, prompts: list[str], responses: list[str], scope: str) -> Scores:
    settings = get_settings()
    model.cache_scope = scope
    marker = settings.fault_poison_marker
    if marker and any(marker in t for t in (*prompts, *responses)):
        raise InjectedFault(f"a text contains the fault marker {marker!r}")
    if settings.fault_transient_file and os.path.exists(settings.fault_transient_file):
        raise InjectedOutage(f"{settings.fault_transient_file} exists")
    kill = settings.fault_kill_marker
    if kill and any(kill in t for t in (*prompts, *responses)):
        os.kill(os.getpid(), signal.SIGKILL)  # testing aid: a batch that kills its worker (as an OOM kill would)
    return model.score(prompts, responses)


def _interactive_waiting(settings: Settings) -> Callable[[], bool]:
    """Whether a request of the interactive lane waits in Redis (asked between encoder passes: one LLEN)."""
    client = metrics.client(settings.redis_url)

    def waiting() -> bool:
        try:
            return bool(client.llen(settings.interactive_queue))
        except redis.RedisError:
            return False

    return waiting


def _ref(msg: ScoreBatch) -> tuple[str, int]:
    return msg.job_id, msg.batch_no


def _hand_back(msg: ScoreBatch, queue: str, why: Preempted, lease: int) -> None:
    """Queue a stopped batch again (at the back of its queue); the worker then takes the interactive work."""
    with session_scope() as s:
        again = repo.hand_back_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=lease)
    if again:
        enqueue_score_batches([msg], queue=queue)
    log.info("batch %s/%d handed back for interactive work: %s", msg.job_id, msg.batch_no, why)
    metrics.record(get_settings().redis_url, {"batches_preempted": 1.0})


def release_for_retry(msg: ScoreBatch, lease: int) -> None:
    """A batch that failed for a transient reason (a database or Redis outage) or a model this worker cannot load,
    and will be retried: note it as enqueued again, so its next take is not counted as a worker death, unless
    another worker took it since (``lease``). Best effort: the outage may still last."""
    try:
        with session_scope() as s:
            repo.hand_back_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=lease)
    except Exception as exc:
        log.warning("batch %s/%d: could not note the retry (%s)", msg.job_id, msg.batch_no, exc)


def score_batch(msg: ScoreBatch, queue: str | None = None) -> int:
    """Score one message and upsert its results with the job's progress in one transaction.

    Returns the number of new result rows (0 for a redelivered, superseded, cancelled or stopped batch).
    A batch that fails for a reason of its own (not a service outage) is split in halves until
    the failing item is alone; that item goes to the error ledger and the rest is scored.
    A batch taken from the bulk queue (``queue``) stops between encoder passes when interactive work waits and
    goes back to that queue; the passes done are kept, so it resumes where it stopped.
    """
    settings = get_settings()
    worker = liveness.ensure_heartbeat(settings.redis_url, settings.heartbeat_ttl_s)
    # Said in the heartbeat before the take, so a sweeper that sees the take also sees the work.
    key = batch_key(msg.job_id, msg.batch_no)
    liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key)
    took: list[int] = []  # the take's lease, once taken
    try:
        return _take_and_score(msg, queue, settings, worker, took)
    except Exception as exc:
        if took and (is_transient(exc) or isinstance(exc, ModelLoadFailed)):
            release_for_retry(msg, took[0])  # tasks.score_batch retries it
        raise
    finally:
        liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key, done=True)


def _take_and_score(msg: ScoreBatch, queue: str | None, settings: Settings, worker: str, took: list[int]) -> int:
    try:  # no longer waiting in a queue (the sweeper's membership test for lost messages)
        metrics.client(settings.redis_url).srem(QUEUED_BATCHES, batch_key(msg.job_id, msg.batch_no))
    except redis.RedisError:
        log.warning("could not note batch %s/%d as taken", msg.job_id, msg.batch_no)
    with session_scope() as s:
        status = repo.job_status(s, job_id=msg.job_id)
        live = status is not None and status not in FINISHED
        take = repo.start_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, worker=worker) if live else None
        if take is None:
            log.info("skipping batch %s/%d: job %s or batch done", msg.job_id, msg.batch_no, status or "gone")
            return 0
        repo.mark_running(s, job_id=msg.job_id)
    took.append(take.lease)
    if take.deaths >= settings.max_worker_deaths:  # it kills its workers (OOM, a crash, the time limit): no more
        _quarantine(msg, WorkerLost(f"its worker died {take.deaths} times scoring it"), take.lease)
        return 0
    preemptible = settings.interactive_preempt and queue is not None and queue != settings.interactive_queue
    try:
        model = get_model(msg.model_version)
        model.preempt = _interactive_waiting(settings) if preemptible else None
        try:
            scores = _score(model, msg.prompts, msg.responses, cache_scope(settings, msg.tenant, msg.job_id))
        finally:
            model.preempt = None
    except Preempted as why:
        assert queue is not None
        _hand_back(msg, queue, why, take.lease)
        return 0
    except (ModelUnavailable, ModelLoadFailed):
        raise  # the job's failure (no such version) or this worker's (tasks.score_batch): never split for it
    except Exception as exc:
        if is_transient(exc):
            raise
        _quarantine(msg, exc, take.lease)
        return 0
    stats = model.take_stats()
    how = scored_with(model, stats)
    t0 = time.perf_counter()
    failed = dict(scores.errors)  # pairs the model cannot score (an empty response for a likelihood, ...)
    failed.update(non_finite(scores, failed))
    if settings.truncation == "reject":
        limit = getattr(model, "max_length", settings.max_length)
        failed.update(
            {
                i: ("too_long", f"longer than {limit} tokens")
                for i, t in enumerate(scores.truncated)
                if t and i not in failed
            }
        )
    with session_scope() as s:
        # Fenced once for the whole transaction (the job's and the batch's row locks are held until it commits), so
        # the writes below need not check the lease again.
        if not repo.fence_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=take.lease):
            log.warning("batch %s/%d: another worker took it since, or its job is gone: dropped", *_ref(msg))
            metrics.record(settings.redis_url, {"batches_fenced": 1.0})
            return 0
        for i in sorted(failed):
            repo.record_item_failure(
                s,
                job_id=msg.job_id,
                batch_no=msg.batch_no,
                idx=msg.start_idx + i,
                code=failed[i][0],
                message=failed[i][1],
            )
        inserted = repo.save_results(
            s,
            job_id=msg.job_id,
            batch_no=msg.batch_no,
            start_idx=msg.start_idx,
            scores=scores.reward,
            cos=scores.cos,
            model_version=msg.model_version,
            truncated=scores.truncated,
            n_tokens=scores.n_tokens,
            components=scores.components,
            skip=frozenset(failed),
            cache_hits=int(stats.get("embed_cache_hits", 0)),
            cache_misses=int(stats.get("embed_cache_misses", 0)),
            scored_with=how,
        )
        ended = repo.job_status(s, job_id=msg.job_id) in FINISHED  # this batch may have been the job's last
    # Counted as soon as its results are committed, before anyone is told the job ended: a client that waited for
    # the job and then reads /metrics sees its last batch.
    metrics.record(
        settings.redis_url,
        {
            **stats,
            "items_scored": inserted,
            "batches": 1,
            "items_failed": float(len(failed)),
            "db_seconds": time.perf_counter() - t0,
        },
    )
    if ended:
        events.publish_finished(settings.redis_url, msg.job_id)  # wakes GET /v1/jobs/{id}?wait=
    try:
        note_served(settings.redis_url, msg.tenant)  # fair share: this tenant does not jump the queue for a while
    except redis.RedisError:
        log.warning("could not note tenant %s as served", msg.tenant)
    feed_quietly(refill_room(settings))  # keep the queue topped up from SQL as batches complete, a few at a time
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


def _quarantine(msg: ScoreBatch, exc: BaseException, lease: int) -> None:
    if len(msg.prompts) == 1:
        log.warning("item %s/%d failed: %s", msg.job_id, msg.start_idx, exc)
        with session_scope() as s:
            new = repo.record_item_failure(
                s,
                job_id=msg.job_id,
                batch_no=msg.batch_no,
                idx=msg.start_idx,
                code=reason_code(exc),
                message=public_message(exc, log, f"item {msg.job_id}/{msg.start_idx}"),
                lease=lease,
            )
        metrics.record(get_settings().redis_url, {"items_failed": float(new)})
        _announce_if_finished(msg.job_id)
        return
    with session_scope() as s:
        halves = repo.split_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=lease)
        messages = build_messages(s, job_id=msg.job_id, model_version=msg.model_version, batches=halves)
    log.warning(
        "batch %s/%d (%d items) failed (%s): split in %d", msg.job_id, msg.batch_no, len(msg.prompts), exc, len(halves)
    )
    enqueue_score_batches(messages, queue=get_settings().scoring_queue)


NON_FINITE = ("non_finite_score", "the model returned a non-finite score (NaN or infinity) for this pair")


def non_finite(scores: Scores, failed: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str]]:
    """The pairs whose score is NaN or infinite (an overflow in a model's fp16 head, a broken checkpoint): the
    item's own failure, recorded with its reason, never a stored score that JSON cannot carry."""
    return {i: NON_FINITE for i, r in enumerate(scores.reward) if i not in failed and not math.isfinite(r)}


def _rows(scores: Scores) -> list[dict[str, Any]]:
    scores.errors.update(non_finite(scores, scores.errors))
    n_tokens = scores.n_tokens or [None] * len(scores.reward)
    parts: list[list[float] | None] = [None for _ in scores.reward]
    if scores.components is not None:
        parts = list(scores.components)
    rows: list[dict[str, Any]] = []
    for i, (r, c, t, n, m) in enumerate(zip(scores.reward, scores.cos, scores.truncated, n_tokens, parts, strict=True)):
        err = scores.errors.get(i)
        rows.append(
            {
                "score": None if err else r,
                "cos": None if err else c,
                "truncated": t,
                "n_tokens": n,
                "components": None if err else m,
                "error": {"code": err[0], "message": err[1]} if err else None,
            }
        )
    return rows


def score_interactive(msg: InteractiveBatch) -> dict[str, Any]:
    """Score one part of an interactive request; nothing is written to SQL. A pair that fails on its own is
    isolated (the part is scored pair by pair) and answered with its reason instead of a score."""
    model = get_model(msg.model_version)
    scope = cache_scope(get_settings(), msg.tenant, msg.request_id)
    try:
        rows = _rows(_score(model, msg.prompts, msg.responses, scope))
    except ModelUnavailable:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        rows = []
        for p, r in zip(msg.prompts, msg.responses, strict=True):
            try:
                rows += _rows(_score(model, [p], [r], scope))
            except Exception as one:
                if is_transient(one):
                    raise
                rows.append(
                    {
                        "score": None,
                        "cos": None,
                        "truncated": False,
                        "n_tokens": None,
                        "components": None,
                        "error": {"code": reason_code(one), "message": public_message(one, log, "a pair")[:500]},
                    }
                )
    stats = model.take_stats()
    scored_with(model, stats)
    metrics.record(get_settings().redis_url, {**stats, "interactive_items": float(len(rows)), "interactive_batches": 1})
    return {"part": msg.part, "kind": model.kind, "rows": rows, "tokens": int(stats.get("tokens", 0))}
