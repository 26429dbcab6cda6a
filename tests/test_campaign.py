"""The fault campaign's quick mode (tests/campaign.py): 24 seeded faults of every kind, 1.5 s apart, against the
whole stack under load, then the checker. The full campaign (500 faults over two seeds) is `python -m
tests.campaign`; its table is in benchmarks/results/fault_campaign.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.campaign import campaign
from tests.conftest import Ledger

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_a_quick_fault_campaign(pg_url: str, tmp_path: Path, ledger: Ledger):
    """pg_url: PostgreSQL is there (the campaign makes a database of its own beside the session's)."""
    report = campaign(24, seed=7, interval=1.5, job_items=160, tmp=tmp_path)
    print("\n" + report.table())
    assert report.violations == []
    assert (report.lost, report.duplicated) == (0, 0)
    assert sum(report.faults.values()) == 24 and report.jobs >= 3 and report.items > 0
    # Recovery times are figures of the full campaign (a benchmark, on a quiet machine), not asserted here: under the
    # whole suite's load they measure the machine. Every stranded batch must have been recovered, though.
    worst = report.worst_recovery
    ledger.add(
        "fault",
        "quick fault campaign: 24 seeded faults (worker, beat and API SIGKILLs, Redis restarts, PostgreSQL cuts, "
        "a worker frozen past its heartbeat) under concurrent jobs, cancels, feedback, a run and activations",
        "PostgreSQL",
        f"{report.jobs} jobs, {report.items} items: 0 lost, 0 duplicated, 0 invariant violations"
        + (f"; a killed worker's batches back in the queue within {worst:.0f} s" if worst is not None else ""),
    )
