"""Model versions on disk: heads (and trained encoder layers) as safetensors, a config with a content hash."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workers.model import Heads, RewardModel

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "rewardq.json"
ENCODER_DIR = "encoder"


def _content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_version(model: RewardModel, artifacts_dir: Path, *, base_model: str, base_encoder: str | None,
                 train_layers: int, params: dict[str, Any]) -> tuple[str, Path, dict[str, Any]]:  # fmt: skip
    """Write a trained model under ``artifacts_dir/<version>``; the version id is its content hash."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=artifacts_dir))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
        save_file(state, str(tmp / HEADS_FILE))
        if train_layers > 0:
            model.encoder.save_pretrained(tmp / ENCODER_DIR, safe_serialization=True)
            model.tokenizer.save_pretrained(tmp / ENCODER_DIR)
        digest = _content_hash(tmp)
        version = "ft-" + digest[:12]
        config = {
            "version": version,
            "base_model": base_model,
            "base_encoder": base_encoder,  # None: the bundled encoder, resolved on each machine
            "encoder": ENCODER_DIR if train_layers > 0 else None,
            "n_heads": model.heads.n_heads,
            "dim": model.dim,
            "train_layers": train_layers,
            "params": params,
            "content_hash": digest,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        dest = artifacts_dir / version
        if dest.exists():  # identical content: keep the copy already there
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
        return version, dest, config
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_version(path: Path, default_encoder: str, *, max_length: int, encode_batch_size: int) -> RewardModel:
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("encoder"):
        encoder_path = str(path / config["encoder"])
    else:
        encoder_path = config.get("base_encoder") or default_encoder
    heads = Heads(int(config["dim"]), int(config["n_heads"]), trained=True)
    heads.load_state_dict(load_file(str(path / HEADS_FILE)))
    model = RewardModel(config["version"], encoder_path, heads=heads, max_length=max_length,
                        encode_batch_size=encode_batch_size)  # fmt: skip
    model.heads.to(torch.float32)
    return model
