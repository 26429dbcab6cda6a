"""Our top-level ``kernels`` package must not confuse transformers, which probes for Hugging Face's ``kernels``."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import kernels
assert kernels.__file__ and 'torch' not in sys.modules, 'kernels/__init__ must stay light'
from transformers import AutoModel
from transformers.utils.import_utils import is_kernels_available
from workers.registry import default_encoder_path
model = AutoModel.from_pretrained(default_encoder_path())
print(type(model).__name__, is_kernels_available())
"""


def test_encoder_loads_through_transformers_with_our_kernels_importable():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["BertModel", "False"]
