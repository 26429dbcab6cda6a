"""Fine-tuned versions on disk, content-addressed under REWARDQ_ARTIFACTS_DIR/<version>: safetensors weights
and a ``rewardq.json`` with the kind, the parameters and the content hash. The version id is ``ft-`` + a hash of
the owner and the content (version_id): the same files trained by two tenants are two versions, each its owner's
alone, so a tenant never meets an id another tenant owns, nor learns from one that it trained on the same data."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rewardq.storage.clock import utcnow
from rewardq.workers.importer import content_hash
from rewardq.workers.models.classifier import ClassifierModel
from rewardq.workers.models.sim_exp import Heads, SimExpModel

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "rewardq.json"
ENCODER_DIR = "encoder"


def version_id(owner: str | None, digest: str) -> str:
    """A fine-tuned version's id: its owner's and its content's, so ids are unique per owner."""
    return "ft-" + hashlib.sha256(f"{owner or ''}\0{digest}".encode()).hexdigest()[:12]


def _stage(
    artifacts_dir: Path, write: Callable[[Path], None], config: dict[str, Any], owner: str | None
) -> tuple[str, Path, dict[str, Any]]:
    """Write the files in a staging folder, name the version by its owner and their hash, then move it into place
    once."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=artifacts_dir))
    try:
        write(tmp)
        digest = content_hash(tmp)
        version = version_id(owner, digest)
        config = {
            "version": version,
            **config,
            "content_hash": digest,
            "created_at": utcnow().isoformat(),
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


def save_version(
    model: SimExpModel,
    artifacts_dir: Path,
    *,
    base_model: str,
    base_encoder: str | None,
    train_layers: int,
    params: dict[str, Any],
    owner: str | None = None,
    own_encoder: bool = False,
) -> tuple[str, Path, dict[str, Any]]:
    """A trained sim-exp model: its heads, and the encoder when layers of it were trained or when it was trained from
    a version's own encoder (``own_encoder``: with its pooling and token limit)."""
    with_encoder = train_layers > 0 or own_encoder

    def write(tmp: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
        save_file(state, str(tmp / HEADS_FILE))
        if with_encoder:
            model.encoder.save_pretrained(tmp / ENCODER_DIR, safe_serialization=True)
            model.tokenizer.save_pretrained(tmp / ENCODER_DIR)

    config = {
        "kind": "sim_exp",
        "base_model": base_model,
        "base_encoder": base_encoder,  # None: the bundled encoder, resolved on each machine
        "encoder": ENCODER_DIR if with_encoder else None,
        "pooling": model.pooling,
        **({"max_length": model.max_length} if own_encoder else {}),
        "n_heads": model.heads.n_heads,
        "dim": model.dim,
        "train_layers": train_layers,
        "params": params,
    }
    return _stage(artifacts_dir, write, config, owner)


def save_classifier(
    model: ClassifierModel,
    artifacts_dir: Path,
    *,
    base_model: str,
    params: dict[str, Any],
    owner: str | None = None,
) -> tuple[str, Path, dict[str, Any]]:
    """A trained cross-encoder: a Hugging Face folder (TRL's format) that `rewardq models import` would accept."""

    def write(tmp: Path) -> None:
        model.model.save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)

    config = {
        "kind": "classifier",
        "base_model": base_model,
        "max_length": model.max_length,
        "truncation_side": model.truncation_side,
        "dtype": "float32",
        "params": params,
    }
    if model.value_head is not None:
        # Trained from an OpenRLHF reward model: saved in its format, unnormalized (the mean and std in its config
        # describe the rewards of the model it started from, not of this one).
        model.model.normalize = False
        model.model.raw_config = {**model.model.raw_config, "normalize_reward": False}
        config.update(format="openrlhf", value_head_prefix=model.model.prefix, normalize=False)
    return _stage(artifacts_dir, write, config, owner)


def load_version(path: Path, default_encoder: str, *, max_length: int, encode_batch_size: int) -> SimExpModel:
    """A sim-exp version's files: a trained one (heads, and its encoder when it trained layers of it), or an imported
    sentence encoder (rewardq.workers.importer: no heads, the untrained formula on its own encoder and pooling, and
    its own token limit)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("encoder") is not None:
        encoder_path = str(path / config["encoder"])
    else:
        encoder_path = config.get("base_encoder") or default_encoder
    heads = None
    if (path / HEADS_FILE).is_file():
        heads = Heads(int(config["dim"]), int(config["n_heads"]), trained=True)
        heads.load_state_dict(load_file(str(path / HEADS_FILE)))
    model = SimExpModel(
        str(config.get("version") or path.name),
        encoder_path,
        heads=heads,
        max_length=int(config.get("max_length") or max_length),
        encode_batch_size=encode_batch_size,
        pooling=str(config.get("pooling") or "mean"),
    )
    model.heads.to(torch.float32)
    return model
