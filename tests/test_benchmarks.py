"""The benchmark scripts run (on a CPU-only machine, the kernel benchmark falls back to a correctness check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_without_gpu_checks_correctness():
    if torch.cuda.is_available():
        return  # on a GPU the benchmark is a long run, not a test
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_sim_exp.py")], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA GPU found" in out.stdout and out.stdout.strip().endswith("OK")


def test_kernel_benchmark_gpu_code_path_runs_as_a_dry_run_on_cpu(tmp_path):
    """The GPU table code (timings, GB/s, ratios, JSON) exercised on CPU at toy sizes."""
    import json

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_sim_exp.py"), "--dry-run",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "sim_exp_dry_run_cpu.json").read_text())
    assert len(doc["rows"]) == 4 and doc["meta"]["copy_gbs"] > 0
    for row in doc["rows"]:
        assert row["max_err"] < 1e-4
        for key in ("fwd_gbs", "fwd_pct_copy", "fwd_x_eager", "fwd_x_compile", "fwdbwd_gbs", "fwdbwd_x_compile"):
            assert row[key] > 0, key
