"""Bring your own reward model: check a local Hugging Face folder and copy it, content-addressed, into the
artifacts directory. No torch here: the API runs this; workers load the copy by kind.

Refused: folders without safetensors weights (pickle checkpoints are never loaded), configs that need
``trust_remote_code`` (an ``auto_map``), architectures transformers cannot load for the kind, and
classifiers whose head is not one score (``num_labels`` != 1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PREFIX = {"classifier": "clf-", "likelihood": "lm-"}
HEAD_SUFFIXES = {"classifier": ("ForSequenceClassification",), "likelihood": ("ForCausalLM", "LMHeadModel")}
DEFAULT_MAX_LENGTH = {"classifier": 512, "likelihood": 1024}
CHOICES = {
    "truncation_side": ("left", "right"),
    "reduction": ("mean", "sum"),
    "dtype": ("float32", "bfloat16", "float16"),
}


class ImportRefused(ValueError):
    """The folder cannot be registered as that kind; the message says why and what to do."""


@dataclass(frozen=True)
class Imported:
    version: str
    directory: Path
    config: dict[str, Any]
    base_model: str


def content_hash(root: Path, files: Iterable[Path] | None = None) -> str:
    """SHA-256 over the relative names and bytes of ``files`` (default: every file under ``root``)."""
    h = hashlib.sha256()
    for f in sorted(files if files is not None else (p for p in root.rglob("*") if p.is_file())):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _architecture_ok(model_type: str, kind: str) -> bool | None:
    """Whether transformers can build this model type for the kind (None: transformers not importable here)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    names = (
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        if kind == "classifier"
        else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    return model_type in names


def check_folder(src: Path, kind: str) -> tuple[dict[str, Any], list[Path]]:
    """The folder's config.json and the files to copy (everything but pickle weights), or ImportRefused."""
    if kind not in PREFIX:
        raise ImportRefused(f"kind must be one of {', '.join(PREFIX)}, got {kind!r}")
    if "\x00" in str(src) or not src.is_dir():
        raise ImportRefused(f"{str(src)!r} is not a directory on the API's machine")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ImportRefused(f"{src} has no config.json: not a Hugging Face model folder (save it with save_pretrained)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"config.json is not readable JSON: {exc}") from exc
    files = [
        p for p in src.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    ]
    # A link that leads out of the folder would copy whatever it points to (another model, a key file) into the
    # registry: refused. Links inside the folder (a Hugging Face cache snapshot's) are followed.
    outside = [p for p in files if p.is_symlink() and not p.resolve().is_relative_to(src)]
    if outside:
        raise ImportRefused(
            f"{outside[0].relative_to(src)} is a symbolic link to a file outside {src}: copy the file in instead"
        )
    weights = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not weights:
        found = f" (found {', '.join(sorted(p.name for p in pickles)[:3])})" if pickles else ""
        raise ImportRefused(
            f"no safetensors weights in {src}{found}: pickle checkpoints are refused because loading "
            "them can run code; re-save with model.save_pretrained(dir, safe_serialization=True)"
        )
    if config.get("auto_map"):
        raise ImportRefused("config.json has an auto_map: this model needs trust_remote_code, which rewardq never sets")
    model_type = str(config.get("model_type") or "")
    auto = "AutoModelForSequenceClassification" if kind == "classifier" else "AutoModelForCausalLM"
    if _architecture_ok(model_type, kind) is False:
        raise ImportRefused(f"model_type {model_type!r} cannot be loaded with {auto} (kind {kind!r})")
    saved_as = [str(a) for a in config.get("architectures") or []]
    if saved_as and not any(a.endswith(HEAD_SUFFIXES[kind]) for a in saved_as):
        # Weights saved without the kind's head would load with a random one: scores would be noise.
        raise ImportRefused(
            f"the folder holds a {saved_as[0]}, which has no {kind} head; {auto} needs one of "
            f"*{', *'.join(HEAD_SUFFIXES[kind])}"
        )
    if kind == "classifier":
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if int(labels) != 1:
            raise ImportRefused(
                f"a classifier reward model has one output (num_labels=1), this one has {labels}: "
                "save it as TRL's RewardTrainer does (AutoModelForSequenceClassification, num_labels=1)"
            )
    return config, [p for p in files if p.suffix not in PICKLE_SUFFIXES]


def version_options(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The per-version settings stored with it (token limit, truncation side, reduction, dtype), defaults filled."""
    out: dict[str, Any] = {"max_length": int(given.get("max_length") or DEFAULT_MAX_LENGTH[kind])}
    for key in ("truncation_side", "dtype") + (("reduction",) if kind == "likelihood" else ()):
        value = given.get(key) or CHOICES[key][0]
        if value not in CHOICES[key]:
            raise ImportRefused(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        out[key] = value
    if not 8 <= out["max_length"] <= 131072:
        raise ImportRefused("max_length must be between 8 and 131072 tokens")
    return out


def import_folder(src: Path, kind: str, artifacts_dir: Path, options: dict[str, Any] | None = None) -> Imported:
    """Copy the folder under ``artifacts_dir/<version>``; the version id is the hash of what was copied and the
    version's settings, so importing the same folder twice gives the same version."""
    try:
        src = src.expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop, no home directory
        raise ImportRefused(f"{str(src)!r} is not a usable path: {exc}") from exc
    config, files = check_folder(src, kind)
    settings = version_options(kind, options or {})
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=artifacts_dir))
    try:
        for f in files:
            dest = tmp / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
        (tmp / "rewardq.json").write_text(json.dumps({"kind": kind, **settings}, sort_keys=True))
        version = PREFIX[kind] + content_hash(tmp)[:12]
        dest_dir = artifacts_dir / version
        if dest_dir.exists():  # the same content: keep the copy already there
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The architecture, never the folder's path: responses must not show the server's file system.
    base = str((config.get("architectures") or [config.get("model_type") or kind])[0])
    return Imported(version, dest_dir, {**settings, "model_type": config.get("model_type")}, base[:512])
