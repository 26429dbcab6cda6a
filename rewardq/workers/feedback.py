"""Feedback rows as a run sees them: the seeded slices (train, validation, gate), and the guard rails over a
tenant's own feedback (duplicates and contradictions merged and counted; too little or too uniform refused)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rating:
    prompt: str
    response: str
    rating: float


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class Feedback:
    ratings: list[Rating] = field(default_factory=list)
    preferences: list[Preference] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ratings) + len(self.preferences)

    def texts(self) -> list[str]:
        out = [t for r in self.ratings for t in (r.prompt, r.response)]
        out += [t for p in self.preferences for t in (p.prompt, p.chosen, p.rejected)]
        return list(dict.fromkeys(out))

    def split(self, heldout_fraction: float, seed: int) -> tuple[Feedback, Feedback]:
        """A seeded split; each kind is split on its own so both sides keep both kinds."""
        train, _, held = self.slices(heldout_fraction, 0.0, seed)
        return train, held

    def slices(self, gate_fraction: float, validation_fraction: float, seed: int) -> tuple[Feedback, ...]:
        """(train, validation, gate): three disjoint seeded slices, each kind sliced on its own. The gate slice is
        the one ``split`` holds out with the same seed, so a gate's numbers stay comparable across versions."""
        rng = random.Random(seed)
        train, val, gate = Feedback(), Feedback(), Feedback()
        for name in ("ratings", "preferences"):
            rows = list(getattr(self, name))
            rng.shuffle(rows)
            n_gate = int(round(len(rows) * gate_fraction)) if len(rows) > 1 else 0
            n_val = int(round(len(rows) * validation_fraction)) if len(rows) > 2 else 0
            getattr(gate, name).extend(rows[:n_gate])
            getattr(val, name).extend(rows[n_gate : n_gate + n_val])
            getattr(train, name).extend(rows[n_gate + n_val :])
        return train, val, gate


def symmetric(data: Feedback) -> Feedback:
    """The feedback plus every rating with prompt and response swapped (for unordered pairs such as STS)."""
    swapped = [Rating(x.response, x.prompt, x.rating) for x in data.ratings]
    return Feedback(ratings=[*data.ratings, *swapped], preferences=list(data.preferences))


def comparisons(data: Feedback, max_rated_pairs: int = 2000) -> int:
    """How many comparisons the feedback implies, as trainer.evaluate counts them: every two ratings that differ
    (among the first ``max_rated_pairs``), and each preference."""
    counts = Counter(x.rating for x in data.ratings[:max_rated_pairs])
    n = sum(counts.values())
    return (n * n - sum(c * c for c in counts.values())) // 2 + len(data.preferences)


def clean(data: Feedback) -> tuple[Feedback, dict[str, Any]]:
    """The feedback with one row per pair, and what was merged. A pair seen twice in a run could land in the
    training and the gate slices both: the gate would then measure memory, not generalisation.

    - duplicates: a row identical to an earlier one (same prompt, response and rating; same preference);
    - contradictory ratings: one (prompt, response) rated differently: kept once, with the mean rating;
    - contradictory preferences: (p, a, b) and (p, b, a) both given: the majority kept once, dropped on a tie;
    - a preference whose chosen and rejected responses are the same text says nothing, and is dropped."""
    out = Feedback()
    by_pair: dict[tuple[str, str], list[float]] = {}
    for r in data.ratings:
        by_pair.setdefault((r.prompt, r.response), []).append(r.rating)
    duplicates = contradictory_ratings = 0
    for (prompt, response), values in by_pair.items():
        duplicates += len(values) - len(set(values))
        if len(set(values)) > 1:
            contradictory_ratings += 1
        out.ratings.append(Rating(prompt, response, sum(values) / len(values)))
    votes: dict[tuple[str, frozenset[str]], Counter[Preference]] = {}
    empty = 0
    for p in data.preferences:
        if p.chosen == p.rejected:
            empty += 1
            continue
        votes.setdefault((p.prompt, frozenset((p.chosen, p.rejected))), Counter())[p] += 1
    contradictory_preferences = ties = 0
    for counted in votes.values():
        duplicates += sum(counted.values()) - len(counted)
        (top, n_top), *rest = counted.most_common()
        if rest:
            contradictory_preferences += 1
            if rest[0][1] == n_top:
                ties += 1
                continue
        out.preferences.append(top)
    report: dict[str, Any] = {
        "rows": len(data),
        "usable": len(out),
        "duplicates": duplicates,
        "contradictory_ratings": contradictory_ratings,
        "contradictory_preferences": contradictory_preferences,
        "dropped_tied_preferences": ties,
        "dropped_same_response": empty,
    }
    return out, report


def refusal(data: Feedback, gate: Feedback, train: Feedback, *, min_rows: int, min_gate_comparisons: int) -> str | None:
    """Why a run on this (cleaned) feedback would be a silently useless model, or None when it may train."""
    if len(data) < min_rows:
        return (
            f"too little feedback: {len(data)} usable rows (after merging duplicates), a run needs at least "
            f"{min_rows} (REWARDQ_MIN_TRAIN_FEEDBACK)"
        )
    if not data.preferences and len({x.rating for x in data.ratings}) < 2:
        return f"feedback too uniform: all {len(data.ratings)} ratings are equal, so nothing can be ranked"
    if comparisons(train) == 0:
        return "feedback too uniform: the training slice implies no comparison (its ratings are all equal)"
    n_gate = comparisons(gate)
    if n_gate < min_gate_comparisons:
        return (
            f"feedback too uniform or too little: the gate slice ({len(gate)} rows) implies {n_gate} comparisons, "
            f"fewer than the {min_gate_comparisons} needed to judge a model (REWARDQ_MIN_GATE_COMPARISONS)"
        )
    return None


def warnings(report: dict[str, Any], n_gate_comparisons: int, advised_gate_comparisons: int = 100) -> list[str]:
    """What a reader of the run's numbers should know, though the run went ahead."""
    out = []
    if report["duplicates"]:
        out.append(f"{report['duplicates']} duplicated rows were counted once")
    if report["contradictory_ratings"]:
        out.append(f"{report['contradictory_ratings']} pairs were rated differently: their mean rating was used")
    if report["contradictory_preferences"]:
        out.append(
            f"{report['contradictory_preferences']} preferences were also given the other way round: the majority "
            f"was kept ({report['dropped_tied_preferences']} ties dropped)"
        )
    if n_gate_comparisons < advised_gate_comparisons:
        out.append(
            f"the gate slice implies only {n_gate_comparisons} comparisons: its accuracy is a rough estimate "
            "(add feedback or raise heldout_fraction)"
        )
    return out
