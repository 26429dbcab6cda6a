"""A producer's install: `pip install '.[client]'` in a fresh venv, without torch, triton or celery, then the real
CLI from that venv submits, follows and fetches a job on a live API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import SECRET, Live

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the client is the same whatever the database
def test_client_extra_installs_alone_and_drives_a_live_api(live: Live, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", f"{ROOT}[client]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert "project.license" not in pip.stderr  # setuptools' deprecation warning is gone
    server_only = ("torch", "triton", "celery", "sqlalchemy", "fastapi")
    probe = f"import importlib.util as u; print([m for m in {server_only!r} if u.find_spec(m)])"
    assert (
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"id": f"c{i}", "prompt": f"question {i}", "response": f"answer {i}"}) + "\n" for i in range(12)
        )
    )
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "REWARDQ_API_URL": live.url,
        "REWARDQ_API_KEY": SECRET,
        "HOME": str(tmp_path),
    }

    def rewardq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "rewardq"), *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
        )

    out = rewardq("submit", str(pairs), "--wait")
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = out.stdout.splitlines()[0].strip()
    assert json.loads(rewardq("status", job_id).stdout)["progress"]["done"] == 12
    assert rewardq("results", job_id, "--format", "parquet", "-o", "out.parquet").returncode == 0
    assert rewardq("results", job_id, "-o", "out.jsonl").returncode == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 12
    assert (tmp_path / "out.parquet").stat().st_size > 0
