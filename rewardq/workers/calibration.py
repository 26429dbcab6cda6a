"""A version's score distribution, measured once: on its run's held-out feedback for a trained version (runs.py),
or, for the base and imported versions, on a fixed reference sample the first time a worker loads it. Results
then carry score_z and percentile, which compare across versions whose raw scores differ in scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rewardq.storage import registry
from rewardq.storage.db import session_scope
from rewardq.storage.score_stats import summarize
from rewardq.workers.models.base import RewardModel

log = logging.getLogger(__name__)

# The bundled sample of (prompt, response) pairs (package data of rewardq.client.samples; read as a file).
REFERENCE = Path(__file__).resolve().parent.parent / "client" / "samples" / "sample.jsonl"


def reference_pairs() -> list[tuple[str, str]]:
    with open(REFERENCE, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(r["prompt"], r["response"]) for r in rows]


def calibrate(version: str, model: RewardModel) -> None:
    """Store the version's score distribution on the reference sample, unless it has one (a compare-and-set:
    of several workers loading it at once, one stores it). Never fails the scoring that loaded the model."""
    try:
        with session_scope() as s:
            if registry.score_stats(s, version=version) is not None:
                return
        pairs = reference_pairs()
        scores = model.score([p for p, _ in pairs], [r for _, r in pairs])
        model.take_stats()  # calibration is not a job's work: keep it out of the next batch's counters
        kept = [x for i, x in enumerate(scores.reward) if i not in scores.errors]
        stats = summarize(kept, f"its scores on the bundled reference sample ({len(kept)} pairs)")
        if stats is not None:
            with session_scope() as s:
                registry.set_score_stats(s, version=version, stats=stats)
    except Exception:
        log.exception("could not measure the score distribution of %s", version)
