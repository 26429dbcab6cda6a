"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from api.procs import Proc, wait_for

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(ok: bool, what: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is required under CI=true")
        pytest.skip(f"{what} not available")


@dataclass
class Stack:
    db_url: str
    queue: str
    client: TestClient
    worker: Proc
    env: dict[str, str]


def wait_job(client: TestClient, job_id: str, timeout: float = 180) -> dict[str, object]:
    box: dict[str, dict[str, object]] = {}

    def done() -> bool:
        box["job"] = client.get(f"/v1/jobs/{job_id}").json()
        return box["job"]["status"] in ("succeeded", "failed", "cancelled")

    wait_for(done, timeout, f"job {job_id}")
    return box["job"]
