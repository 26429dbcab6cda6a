"""rewardq installs one top-level module, ``rewardq``: Hugging Face's ``kernels`` (which transformers requires and
probes for) stays importable and working beside it, from the repository root and from anywhere else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import importlib.util, sys
import rewardq.kernels
assert 'torch' not in sys.modules, 'rewardq.kernels must stay light'
spec = importlib.util.find_spec('kernels')
print('hf-kernels', spec is not None and 'rewardq' not in (spec.origin or ''))
from transformers import AutoModel
from rewardq.workers.registry import default_encoder_path
model = AutoModel.from_pretrained(default_encoder_path())
from rewardq.kernels import EPS
print(type(model).__name__, EPS)
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_encoder_loads_through_transformers_beside_hugging_faces_kernels(where: str, tmp_path: Path):
    cwd = ROOT if where == "root" else tmp_path
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=240, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "hf-kernels True"
    assert lines[1] == "BertModel 1e-08"


def test_no_top_level_module_but_rewardq():
    """The source tree holds one import package: what a wheel installs at the top level is `rewardq` alone."""
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests", "benchmarks"}
    assert tops == {"rewardq"}
