"""Batch scoring: the per-process model cache and the score-then-upsert step behind each task."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from rewardq.storage import registry
from rewardq.storage import repository as repo
from rewardq.storage.db import session_scope
from rewardq.storage.models import FINISHED
from rewardq.storage.settings import Settings, get_settings
from rewardq.workers import events, liveness, metrics, writer
from rewardq.workers.calibration import calibrate
from rewardq.workers.celery_app import queue_lists
from rewardq.workers.errors import (
    RETRY_BACKOFF_MAX_S,
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
    note_served_into,
)
from rewardq.workers.models import ENSEMBLE, load_model
from rewardq.workers.models.base import Preempted

if TYPE_CHECKING:
    from rewardq.workers.models.base import RewardModel, Scores

log = logging.getLogger(__name__)

_MAX_LOADED = 2
_running: OrderedDict[str, None] = OrderedDict()  # jobs this process has seen out of 'queued' (newest last)
_RUNNING_KEPT = 1024
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


def release_for_retry(msg: ScoreBatch, lease: int) -> bool:
    """A batch that failed for a transient reason (a database or Redis outage) or a model this worker cannot load,
    and will be retried: note it as enqueued again, so its next take is not counted as a worker death, unless
    another worker took it since (``lease``). Best effort: the outage may still last."""
    try:
        with session_scope() as s:
            return repo.hand_back_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=lease)
    except Exception as exc:
        log.warning("batch %s/%d: could not note the retry (%s)", msg.job_id, msg.batch_no, exc)
        return False


def score_batch(msg: ScoreBatch, queue: str | None = None) -> int:
    """Score one message and upsert its results with the job's progress in one transaction: on this thread, or on
    the process's writer (workers.writer) when it has one, which lets this thread take the next message at once.

    Returns the number of new result rows (handed to the writer: the rows it will write, unless the batch was taken
    by another worker meanwhile), 0 for a redelivered, superseded, cancelled or stopped batch.
    A batch that fails for a reason of its own (not a service outage) is split in halves until
    the failing item is alone; that item goes to the error ledger and the rest is scored.
    A batch taken from the bulk queue (``queue``) stops between encoder passes when interactive work waits and
    goes back to that queue; the passes done are kept, so it resumes where it stopped.
    """
    settings = get_settings()
    worker = liveness.ensure_heartbeat(settings.redis_url, settings.heartbeat_ttl_s)
    key = batch_key(msg.job_id, msg.batch_no)
    # Said in the heartbeat before the take, so a sweeper that sees the take also sees the work; in the same round
    # trip, its message no longer waits in a queue (the sweeper's membership test for lost messages).
    if (
        liveness.working_on(
            settings.redis_url, settings.heartbeat_ttl_s, key, also=lambda p: p.srem(QUEUED_BATCHES, key)
        )
        is None
    ):
        log.warning("could not note batch %s/%d as taken", msg.job_id, msg.batch_no)
    took: list[int] = []  # the take's lease, once taken
    handed = False  # to the writer, or written: the heartbeat is then cleared by the write
    try:
        scored = _take_and_score(msg, queue, settings, worker, took)
        if scored is None:
            return 0
        behind = writer.current()
        handed = True
        if behind is None:
            return _write(scored, settings)
        liveness.writing(key)
        behind.submit(functools.partial(_write_behind, scored, settings))
        return len(msg.prompts) - len(scored.failed)
    except Exception as exc:
        handed = False
        if took and (is_transient(exc) or isinstance(exc, ModelLoadFailed)):
            release_for_retry(msg, took[0])  # tasks.score_batch retries it
        raise
    finally:
        if not handed:
            liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key, done=True)


@dataclass
class _Scored:
    """A batch scored and not yet written: what the write stage needs."""

    msg: ScoreBatch
    queue: str | None
    lease: int
    scores: Scores
    failed: dict[int, tuple[str, str]]
    stats: dict[str, float]
    how: str


def _take_and_score(
    msg: ScoreBatch, queue: str | None, settings: Settings, worker: str, took: list[int]
) -> _Scored | None:
    with session_scope() as s:
        take = repo.start_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, worker=worker, live_job=True)
        if take is None:
            log.info("skipping batch %s/%d: its job ended or is gone, or the batch is done", *_ref(msg))
            return None
        if msg.job_id not in _running:  # a job leaves 'queued' once: a take of its next batch needs no statement
            repo.mark_running(s, job_id=msg.job_id)
    _running[msg.job_id] = None
    while len(_running) > _RUNNING_KEPT:
        _running.popitem(last=False)
    took.append(take.lease)
    if take.deaths >= settings.max_worker_deaths:  # it kills its workers (OOM, a crash, the time limit): no more
        _quarantine(msg, WorkerLost(f"its worker died {take.deaths} times scoring it"), take.lease)
        return None
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
        return None
    except (ModelUnavailable, ModelLoadFailed):
        raise  # the job's failure (no such version) or this worker's (tasks.score_batch): never split for it
    except Exception as exc:
        if is_transient(exc):
            raise
        _quarantine(msg, exc, take.lease)
        return None
    stats = model.take_stats()
    how = scored_with(model, stats)
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
    return _Scored(msg, queue, take.lease, scores, failed, stats, how)


def _write(b: _Scored, settings: Settings, behind: bool = False) -> int:
    """The write stage: the batch's results and failures, fenced on its lease, in one transaction; then one Redis
    round trip for the counters, the tenant served, the job's finish notice, the heartbeat and the queue's depth;
    then a feed if the queue has room for a quarter of its high-water mark. ``behind``: on the writer's thread, which
    clears only the heartbeat's ``batch@write`` (this process may have taken the batch again meanwhile)."""
    msg = b.msg
    key = batch_key(msg.job_id, msg.batch_no) + (liveness.WRITING if behind else "")
    while settings.fault_write_hold_file and os.path.exists(settings.fault_write_hold_file):
        time.sleep(0.02)  # testing aid: a write held, as a slow database holds it
    t0 = time.perf_counter()
    with session_scope() as s:
        # Fenced once for the whole transaction (the job held and the batch's row locked until it commits): the
        # writes below do not check the lease again (fenced=True; it was two statements more per write).
        if not repo.fence_batch(s, job_id=msg.job_id, batch_no=msg.batch_no, lease=b.lease):
            log.warning("batch %s/%d: another worker took it since, or its job is gone: dropped", *_ref(msg))
            liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key, done=True,
                                also=lambda p: metrics.record_into(p, {"batches_fenced": 1.0}))  # fmt: skip
            return 0
        new_failures = 0
        for i in sorted(b.failed):
            new_failures += repo.record_item_failure(
                s,
                job_id=msg.job_id,
                batch_no=msg.batch_no,
                idx=msg.start_idx + i,
                code=b.failed[i][0],
                message=b.failed[i][1],
                lease=b.lease,
                advance=False,  # counted below, with the results, in one statement
                fenced=True,
            )
        inserted = repo.save_results(
            s,
            job_id=msg.job_id,
            batch_no=msg.batch_no,
            start_idx=msg.start_idx,
            scores=b.scores.reward,
            cos=b.scores.cos,
            model_version=msg.model_version,
            truncated=b.scores.truncated,
            n_tokens=b.scores.n_tokens,
            components=b.scores.components,
            skip=frozenset(b.failed),
            scored_with=b.how,
            lease=b.lease,
            advance=False,
            fenced=True,
        )
        repo.advance_job(
            s,
            job_id=msg.job_id,
            batch_no=msg.batch_no,
            done=inserted,
            failed=new_failures,
            cache_hits=int(b.stats.get("embed_cache_hits", 0)),
            cache_misses=int(b.stats.get("embed_cache_misses", 0)),
        )
    # This write closed the job (its batch was the last to commit): in its transaction on SQLite, right after its
    # commit on PostgreSQL (session_scope).
    ended = msg.job_id in s.info.get(repo.CLOSED, {})
    counters = {
        **b.stats,
        "items_scored": inserted,
        "batches": 1,
        "items_failed": float(len(b.failed)),
        "db_seconds": time.perf_counter() - t0,
    }
    lists = queue_lists(settings.scoring_queue)

    def also(pipe: Any) -> None:
        # Counted as soon as its results are committed, before anyone is told the job ended (commands run in order):
        # a client that waited for the job and then reads /metrics sees its last batch.
        metrics.record_into(pipe, counters)
        if ended:
            pipe.publish(events.channel(msg.job_id), b"1")  # wakes GET /v1/jobs/{id}?wait=
        note_served_into(pipe, msg.tenant)  # fair share: this tenant does not jump the queue for a while
        for name in lists:
            pipe.llen(name)

    replies = liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, key, done=True, also=also)
    if replies is None:
        log.warning("batch %s/%d written; its counters and notices not sent: Redis unreachable", *_ref(msg))
        feed_quietly(refill_room(settings))  # it says whether Redis is back
    elif settings.queue_high_water - sum(int(n) for n in replies[-len(lists) :]) >= refill_room(settings):
        feed_quietly(refill_room(settings))  # keep the queue topped up from SQL as batches complete, a few at a time
    return inserted


WRITE_RETRY_S = float(RETRY_BACKOFF_MAX_S)  # how long the writer retries a write that meets a transient error


def _write_behind(b: _Scored, settings: Settings) -> None:
    """_write on the writer's thread. Its message is acked already, so a failure is handled here. A transient one (the
    database gone, a deadlock) is retried with backoff for up to WRITE_RETRY_S, the scores kept and the lease still
    fencing each try (the task's own retry backed off likewise, but scored the batch again); then the batch is
    handed back and queued again. Any other fails the job, as the task's failure did."""
    msg = b.msg
    writing = batch_key(msg.job_id, msg.batch_no) + liveness.WRITING
    deadline = time.monotonic() + WRITE_RETRY_S
    tries = 0
    while True:
        try:
            _write(b, settings, behind=True)
            return
        except Exception as exc:
            failure = exc
        tries += 1
        wait = get_exponential_backoff_interval(2, tries, 10, full_jitter=True)
        if not is_transient(failure) or time.monotonic() + wait > deadline:
            break
        log.warning("batch %s/%d: write failed (%s); try %d again in %.1f s", *_ref(msg), failure, tries + 1, wait)
        time.sleep(wait)
    try:
        # Said first, so a take of the batch again by this process is never undone by it.
        liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, writing, done=True)
        if is_transient(failure):
            log.warning("batch %s/%d: its results could not be written (%s): queued again", *_ref(msg), failure)
            if release_for_retry(msg, b.lease):  # else the sweeper takes it back: this worker no longer works on it
                enqueue_score_batches([msg], queue=b.queue or settings.scoring_queue)
        else:
            fail_job(msg.job_id, public_message(failure, log, f"job {msg.job_id}"))
    except Exception:
        log.exception("batch %s/%d: its failed write could not be handed back; the sweeper will", *_ref(msg))


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
