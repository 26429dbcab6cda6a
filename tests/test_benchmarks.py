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
