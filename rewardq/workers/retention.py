"""REWARDQ_RETENTION_DAYS: beat deletes the jobs that ended and the feedback given longer ago than that, a bounded
number of rows per tick (`rewardq purge` runs the same once, to the end). And fine-tuned versions nothing uses:
rejected candidates after REWARDQ_REJECTED_VERSION_DAYS, versions past a tenant's newest REWARDQ_KEEP_VERSIONS."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rewardq.storage import lifecycle
from rewardq.storage.db import session_scope
from rewardq.storage.settings import Settings, get_settings
from rewardq.workers.messages import forget_batches

log = logging.getLogger(__name__)

ROWS_PER_TICK = 50_000  # about a second of deleting on SQLite: beat's other work waits no longer than that
EVERY_S = 3600.0  # a purge that found nothing more to delete looks again an hour later
BACKLOG_S = 5.0  # one that stopped at ROWS_PER_TICK goes on this soon
RETRY_S = 60.0  # one that failed (the database or Redis out) tries again this soon


@dataclass
class Purged:
    jobs: int = 0
    items: int = 0
    results: int = 0
    item_errors: int = 0
    batches: int = 0
    feedback: int = 0
    more: bool = False  # the row budget ran out before everything expired was deleted

    def __bool__(self) -> bool:
        return bool(self.jobs or self.items or self.results or self.item_errors or self.batches or self.feedback)


def purge(days: float, *, max_rows: int | None = ROWS_PER_TICK, settings: Settings | None = None) -> Purged:
    """Delete jobs that ended and feedback created more than ``days`` ago (by the database's clock), at most
    ``max_rows`` rows of jobs and as many of feedback (None: no bound). Safe to run in several beats at once: each
    job is deleted under its row lock, re-checking its age, and a second deleter finds less or nothing to delete."""
    if days <= 0:
        raise ValueError("the retention must be more than 0 days")
    settings = settings or get_settings()
    url = settings.database_url
    cutoff = lifecycle.retention_cutoff(url, days)
    out = Purged()
    left = max_rows
    while not out.more and (left is None or left > 0):
        with session_scope(url) as s:
            ids = lifecycle.expired_jobs(s, cutoff=cutoff)
        if not ids:
            break
        for job_id in ids:
            gone = lifecycle.delete_job(url, job_id=job_id, where=lifecycle.finished_before(cutoff), max_rows=left)
            if gone is None:
                continue  # another purge (or a DELETE) took it
            for name, n in gone.rows().items():
                setattr(out, name, getattr(out, name) + n)
            if left is not None:
                left -= sum(gone.rows().values())
            if not gone.complete:
                out.more = True  # the budget ran out in the middle of it (or another deleter has it): next tick
                break
            out.jobs += 1
            forget_batches(settings.redis_url, job_id, gone.batch_nos)
    if left is not None and left <= 0:
        out.more = True  # maybe: the next tick finds out
    out.feedback, done = lifecycle.delete_feedback(url, tenant=None, before=cutoff, max_rows=max_rows)
    out.more = out.more or not done
    return out


def collect_versions(settings: Settings | None = None, limit: int = 100) -> list[str]:
    """Delete fine-tuned versions nothing uses: candidates their gate rejected more than REWARDQ_REJECTED_VERSION_DAYS
    ago, and a tenant's versions past its newest REWARDQ_KEEP_VERSIONS; each row in its own transaction (checked
    again as it is deleted), then its folder under REWARDQ_ARTIFACTS_DIR. Returns the versions deleted."""
    settings = settings or get_settings()
    url = settings.database_url
    rejected_before = None
    if settings.rejected_version_days > 0:
        rejected_before = lifecycle.retention_cutoff(url, settings.rejected_version_days)
    if rejected_before is None and settings.keep_versions <= 0:
        return []
    with session_scope(url) as s:
        picks = lifecycle.collectable_versions(
            s, rejected_before=rejected_before, keep_newest=settings.keep_versions, limit=limit
        )
    root = Path(settings.artifacts_dir).resolve()
    gone = []
    for version, path in picks:
        with session_scope(url) as s:
            if not lifecycle.delete_version(s, version=version):
                continue
        gone.append(version)
        folder = (root / path).resolve() if path else None
        if folder is not None and folder.parent == root and folder.is_dir():  # its own folder, and nothing else
            shutil.rmtree(folder, ignore_errors=True)
    return gone


def purge_tick() -> float:
    """Beat's call: versions nothing uses collected, then one bounded purge when REWARDQ_RETENTION_DAYS is set;
    returns the seconds until the next."""
    failed = False
    try:
        collected = collect_versions()
        if collected:
            log.info("deleted %d fine-tuned version(s) nothing used: %s", len(collected), ", ".join(collected))
    except Exception:  # the database is out: not a reason to stop beat, nor to skip the purge below
        log.exception("collecting unused versions failed")
        failed = True
    days = get_settings().retention_days
    if days <= 0:
        return RETRY_S if failed else EVERY_S
    try:
        out = purge(days)
    except Exception:  # the database or Redis is out: not a reason to stop beat
        log.exception("retention purge failed")
        return RETRY_S
    if out:
        log.info("retention purge (%g days): %s", days, out)
    return BACKLOG_S if out.more else EVERY_S
