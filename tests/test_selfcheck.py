"""The worker proves its compiled kernels before it trusts them (kernels.selfcheck, workers.kernel_check), here under
the Triton interpreter with a wrong result injected; and `rewardq selfcheck` on a CPU machine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewardq import kernels
from rewardq.kernels.selfcheck import describe_failures, failed_kernels, run_checks
from rewardq.storage.settings import Settings
from tests.conftest import ROOT, worker_env


def test_every_kernel_passes_its_checks_and_an_injected_error_is_caught(monkeypatch):
    checks = run_checks("cpu", ["float32", "bfloat16"])
    assert {c.kernel for c in checks} == {"sim_exp", "logprob"} and all(c.ok for c in checks), describe_failures(checks)
    assert any(c.strided for c in checks) and {c.dtype for c in checks} == {"float32", "bfloat16"}
    monkeypatch.setenv("REWARDQ_SELFCHECK_INJECT", "sim_exp")
    checks = run_checks("cpu", ["float32"])
    assert failed_kernels(checks) == ["sim_exp"]
    message = describe_failures(checks)
    # The shapes, the layout and the error against the tolerance, for each failed check.
    assert "sim_exp float32 B37xK3xd385 strided: max |error| 0.01 > tolerance" in message, message


def test_a_failed_kernel_runs_the_torch_path_and_the_other_stays_compiled(monkeypatch, caplog):
    from rewardq.workers.kernel_check import check_kernels

    monkeypatch.setenv("REWARDQ_SELFCHECK_INJECT", "logprob")
    monkeypatch.delenv(kernels.FALLBACK_ENV, raising=False)
    with caplog.at_level(logging.ERROR):
        outcome = check_kernels(Settings(kernel="auto"), device="cpu")  # as a CUDA worker would, on the interpreter
    assert outcome is not None and outcome.fallback == ["logprob"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "N37xH64xV1000 strided" in errors[0].getMessage()  # one clear error, with shapes
    assert os.environ[kernels.FALLBACK_ENV] == "logprob"
    monkeypatch.setenv("REWARDQ_KERNEL", "triton")
    assert kernels.path("logprob", "cpu") == "torch" and kernels.path("sim_exp", "cpu") == "triton"
    monkeypatch.delenv(kernels.FALLBACK_ENV)
    assert kernels.path("logprob", "cpu") == "triton"


def test_a_worker_forced_to_triton_refuses_to_start_with_a_wrong_kernel(tmp_path: Path):
    env = worker_env(
        f"sqlite:///{tmp_path / 'none.db'}",
        "test-selfcheck-unused",
        REWARDQ_KERNEL="triton",
        TRITON_INTERPRET="1",
        REWARDQ_SELFCHECK_INJECT="sim_exp",
    )
    done = subprocess.run(
        [sys.executable, "-m", "rewardq", "worker", "-Q", "test-selfcheck-unused"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "REWARDQ_KERNEL=triton forbids the torch path" in done.stderr and "B37xK3xd385 strided" in done.stderr
    assert "consuming" not in done.stderr  # it never took work


def test_rewardq_selfcheck_on_a_cpu_machine(tmp_path: Path):
    out = tmp_path / "selfcheck.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the command sets it itself for the interpreter checks
    done = subprocess.run(
        [sys.executable, "-m", "rewardq", "selfcheck", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "GPU figures need a GPU" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["device"]["type"] == "cpu" and doc["device"]["torch"] and doc["device"]["triton"]
    assert doc["checks"]["passed"] and doc["checks"]["count"] >= 14
    assert doc["benchmarks"] == {} and "GPU" in doc["note"]


@pytest.mark.parametrize("how", ["device script dry run"])
def test_the_device_script_dry_run(tmp_path: Path, how: str):
    """benchmarks/device_check.sh, as a GPU machine would run it, here on the CPU: it writes the JSON to $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "selfcheck.json").read_text())
    assert doc["checks"]["passed"] and doc["device"]["type"] == "cpu"
    bench = doc["benchmarks"]
    assert {"sim_exp", "logprob", "pipeline_fp32", "probe"} <= set(bench), bench
    assert all(r["exit"] == 0 for r in bench.values()), bench
    assert set(bench["probe"]["figures"]["profiles"]) == {"exact", "fast"}
    # benchmark_sim_exp.py --dry-run: the GPU table's code (timings, GB/s, ratios) on the CPU at toy sizes.
    kernel = bench["sim_exp"]["figures"]
    assert len(kernel["rows"]) == 4 and kernel["meta"]["copy_gbs"] > 0
    for row in kernel["rows"]:
        assert row["max_err"] < 1e-4
        for key in ("fwd_gbs", "fwd_pct_copy", "fwd_x_eager", "fwd_x_compile", "fwdbwd_gbs", "fwdbwd_x_compile"):
            assert row[key] > 0, key
    # benchmark_logprob.py --dry-run: its GPU table's code, likewise.
    [row] = bench["logprob"]["figures"]["rows"]
    assert row["triton_max_err"] < 1e-4 and row["speed_x_eager"] > 0 and row["speed_x_compile"] > 0
    assert [r["pairs"] for r in bench["pipeline_fp32"]["figures"]["rows"]] == [32, 32]


def test_selfcheck_steps_keep_to_the_budget_report_as_they_go_and_keep_the_carried_packages(monkeypatch, tmp_path):
    """A step that would start with too little of the command's budget left is skipped and says so; each result is
    reported as it comes (the JSON is rewritten after every step); the pipeline steps' PYTHONPATH keeps what was
    already there (device_check.sh puts the packages it carried to a GPU machine there) after the repository."""
    import time

    from rewardq.api import selfcheck

    skipped = selfcheck._bench("sim_exp", ["-c", "pass"], tmp_path, deadline=time.monotonic() + 5)
    assert skipped == {"skipped": "out of time: 5 s of the command's budget left"}

    seen: list[tuple[str, dict | None]] = []

    def fake_bench(name, argv, out_dir, env=None, deadline=None):
        seen.append((name, env))
        return {"exit": 0, "seconds": 0.0}

    monkeypatch.setattr(selfcheck, "_bench", fake_bench)
    monkeypatch.setenv("PYTHONPATH", "/carried/site")
    monkeypatch.setenv("REWARDQ_REDIS_URL", "redis://127.0.0.1:6379/0")
    progress: list[int] = []
    out: dict = {}
    selfcheck.gpu_benchmarks(tmp_path, dry_run=False, out=out, progress=lambda: progress.append(len(out)))
    names = ["sim_exp", "logprob", "pipeline_fp32", "pipeline_bf16", "probe", "pipeline_fp32_batch2048"]
    assert [name for name, _ in seen] == names
    assert progress == [1, 2, 3, 4, 5, 6]
    for name, env in seen:
        if name.startswith("pipeline"):
            assert env is not None and env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/carried/site"]
    assert seen[-1][1] is not None and seen[-1][1]["REWARDQ_BATCH_SIZE"] == "2048"
