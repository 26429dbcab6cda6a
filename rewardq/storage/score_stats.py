"""A version's score distribution on known pairs, and a score's place in it (score_z, percentile): pure Python,
so the API can use it. Scores change scale from one version to the next; these make them comparable."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

QUANTILES = 101  # q0 .. q100


def summarize(scores: Sequence[float], source: str) -> dict[str, Any] | None:
    """{n, mean, std, quantiles[101], source} of ``scores``; None for fewer than two."""
    xs = sorted(float(x) for x in scores if math.isfinite(x))
    if len(xs) < 2:
        return None
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))

    def quantile(q: float) -> float:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "n": n,
        "mean": mean,
        "std": std,
        "quantiles": [quantile(i / (QUANTILES - 1)) for i in range(QUANTILES)],
        "source": source,
    }


def place(score: float | None, stats: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(score_z, percentile 0-100) of ``score`` in the version's distribution; (None, None) without stats."""
    if score is None or not stats:
        return None, None
    z = (score - stats["mean"]) / stats["std"] if stats.get("std") else 0.0
    qs: list[float] = stats["quantiles"]
    if score <= qs[0]:
        return z, 0.0
    if score >= qs[-1]:
        return z, 100.0
    i = bisect.bisect_right(qs, score) - 1
    span = qs[i + 1] - qs[i]
    frac = (score - qs[i]) / span if span > 0 else 0.5
    return z, round((i + frac) * 100 / (len(qs) - 1), 3)
