"""Bring your own reward model: check a local Hugging Face folder and copy it, content-addressed, into the
artifacts directory. No torch here: the API runs this; workers load the copy by kind.

Refused: folders without safetensors weights (pickle checkpoints are never loaded), configs that need
``trust_remote_code`` (an ``auto_map``), architectures transformers cannot load for the kind, and
classifiers whose head is not one score (``num_labels`` != 1).

A sim-exp version is a sentence encoder: a sentence-transformers folder (``modules.json``: a Transformer, a Pooling
and optionally a Normalize module; see sentence_encoder) or a plain encoder folder, which is mean-pooled as
sentence-transformers itself would pool it.
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
PREFIX = {"classifier": "clf-", "likelihood": "lm-", "sim_exp": "enc-"}
HEAD_SUFFIXES = {"classifier": ("ForSequenceClassification",), "likelihood": ("ForCausalLM", "LMHeadModel")}
DEFAULT_MAX_LENGTH = {"classifier": 512, "likelihood": 1024, "sim_exp": 256}
# sentence-transformers' pooling modes that a sim-exp version scores with. Mean over sqrt(length) is mean scaled per
# text, which no cosine can tell apart: it is scored as mean. Max over tokens, weighted mean and the last token are
# refused (not implemented here).
POOLING_MODES = {"cls": "cls", "mean": "mean", "mean_sqrt_len_tokens": "mean"}
# The boolean keys of pooling configs saved by sentence-transformers before v6 (v6 writes "pooling_mode": "cls").
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
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
    names: dict[str, Any] = {
        "classifier": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "likelihood": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "sim_exp": modeling_auto.MODEL_MAPPING_NAMES,
    }
    return model_type in names[kind]


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{what} is not readable JSON: {exc}") from exc


def sentence_encoder(src: Path) -> dict[str, Any]:
    """How a sentence-transformers folder encodes: ``{"encoder": the Transformer module's folder, relative ("" for
    the root), "pooling": "mean" or "cls", "max_length": its max_seq_length or None}``. A folder without
    ``modules.json`` is a plain encoder: mean pooling, as sentence-transformers gives one. Refused: modules after
    the pooling that change the embedding (Dense, LayerNorm, ...), pooling modes not implemented, lower-casing, and a
    default prompt (sentence-transformers would prepend it to every text)."""
    if not (src / "modules.json").is_file():
        return {"encoder": "", "pooling": "mean", "max_length": None}
    modules = _json(src / "modules.json", "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ImportRefused("modules.json is not a list of modules")
    # "sentence_transformers.models.Pooling" before v6, "sentence_transformers.sentence_transformer.modules.[...]"
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise ImportRefused(
            f"modules.json holds {' -> '.join(kinds) or 'nothing'}: a sim-exp version takes a Transformer, a Pooling "
            "and optionally a Normalize module (cosine ignores the norm); other modules are not supported"
        )
    encoder, pooling_dir = (str(m.get("path") or "") for m in modules[:2])
    for rel in (encoder, pooling_dir):
        where = (src / rel).resolve()
        if not where.is_relative_to(src) or not where.is_dir():
            raise ImportRefused(f"modules.json names the folder {rel!r}, which is not inside {src}")
    pool_cfg = _json(src / pooling_dir / "config.json", f"{pooling_dir}/config.json")
    if not isinstance(pool_cfg, dict):
        raise ImportRefused(f"{pooling_dir}/config.json is not a pooling configuration")
    given = pool_cfg.get("pooling_mode")
    if isinstance(given, str):
        modes = [given]
    elif isinstance(given, list):
        modes = [str(m) for m in given]
    else:
        modes = [mode for key, mode in _LEGACY_POOLING.items() if pool_cfg.get(key) is True]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ImportRefused(
            f"the pooling is {' + '.join(modes) or 'none'}: a sim-exp version pools by one of "
            f"{', '.join(POOLING_MODES)}"
        )
    bert_cfg_path = src / encoder / "sentence_bert_config.json"
    bert_cfg = _json(bert_cfg_path, "sentence_bert_config.json") if bert_cfg_path.is_file() else {}
    if bert_cfg.get("do_lower_case"):
        raise ImportRefused("sentence_bert_config.json sets do_lower_case, which rewardq does not apply")
    st_cfg_path = src / "config_sentence_transformers.json"
    st_cfg = _json(st_cfg_path, "config_sentence_transformers.json") if st_cfg_path.is_file() else {}
    if st_cfg.get("default_prompt_name"):
        raise ImportRefused(
            f"config_sentence_transformers.json sets default_prompt_name {st_cfg['default_prompt_name']!r}: "
            "rewardq scores the texts as they are; save the model without a default prompt"
        )
    # sentence-transformers before v6 keeps the limit in sentence_bert_config.json, v6 in the tokenizer's config.
    max_len = bert_cfg.get("max_seq_length")
    tok_cfg_path = src / encoder / "tokenizer_config.json"
    if not max_len and tok_cfg_path.is_file():
        tok_max = _json(tok_cfg_path, "tokenizer_config.json").get("model_max_length")
        max_len = tok_max if isinstance(tok_max, int) and tok_max <= 131072 else None
    return {"encoder": encoder, "pooling": POOLING_MODES[modes[0]], "max_length": int(max_len) if max_len else None}


def openrlhf_format(config: dict[str, Any]) -> bool:
    """A reward model saved by OpenRLHF's train_rm: its own RewardModel class (a base model and a value head), with
    ``value_head_prefix`` in its config (OpenRLHF writes it since 0.3)."""
    return "value_head_prefix" in config or [str(a) for a in config.get("architectures") or []] == ["RewardModel"]


def _safetensors_keys(files: list[Path]) -> set[str]:
    """The tensor names in safetensors files, read from their headers (8 bytes of length, then JSON)."""
    keys: set[str] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= 100 << 20:
                    raise ValueError(f"a header of {size} bytes")
                keys.update(k for k in json.loads(fh.read(size)) if k != "__metadata__")
        except (OSError, ValueError) as exc:
            raise ImportRefused(f"{f.name} is not a readable safetensors file: {exc}") from exc
    return keys


def check_folder(src: Path, kind: str) -> tuple[dict[str, Any], list[Path]]:
    """The folder's config.json and the files to copy (everything but pickle weights), or ImportRefused."""
    if kind not in PREFIX:
        raise ImportRefused(f"kind must be one of {', '.join(PREFIX)}, got {kind!r}")
    if "\x00" in str(src) or not src.is_dir():
        raise ImportRefused(f"{str(src)!r} is not a directory on the API's machine")
    cfg_path = src / (sentence_encoder(src)["encoder"] if kind == "sim_exp" else "") / "config.json"
    if not cfg_path.is_file():
        raise ImportRefused(f"{src} has no config.json: not a Hugging Face model folder (save it with save_pretrained)")
    config = _json(cfg_path, "config.json")
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
    if kind == "classifier" and openrlhf_format(config):
        prefix = str(config.get("value_head_prefix") or "score")
        if _architecture_ok(model_type, "sim_exp") is False:  # its base loads with AutoModel
            raise ImportRefused(f"model_type {model_type!r} cannot be loaded with AutoModel (OpenRLHF's base model)")
        if f"{prefix}.weight" not in _safetensors_keys(weights):
            raise ImportRefused(
                f"an OpenRLHF reward model (value_head_prefix {prefix!r}) without a {prefix}.weight tensor: was it "
                "saved by train_rm? (a critic or an SFT model has no reward head)"
            )
        return config, [p for p in files if p.suffix not in PICKLE_SUFFIXES]
    auto = {"classifier": "AutoModelForSequenceClassification", "likelihood": "AutoModelForCausalLM"}.get(
        kind, "AutoModel"
    )
    if _architecture_ok(model_type, kind) is False:
        raise ImportRefused(f"model_type {model_type!r} cannot be loaded with {auto} (kind {kind!r})")
    saved_as = [str(a) for a in config.get("architectures") or []]
    if kind in HEAD_SUFFIXES and saved_as and not any(a.endswith(HEAD_SUFFIXES[kind]) for a in saved_as):
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
    """The per-version settings stored with it (token limit, truncation side, reduction, dtype), defaults filled. A
    sim-exp version has only a token limit per text (and how the folder pools, from sentence_encoder)."""
    out: dict[str, Any] = {"max_length": int(given.get("max_length") or DEFAULT_MAX_LENGTH[kind])}
    if kind == "sim_exp":
        unsupported = sorted(k for k in ("truncation_side", "dtype", "reduction") if given.get(k))
        if unsupported:
            raise ImportRefused(f"{', '.join(unsupported)}: not a setting of a sim_exp version")
    keys = () if kind == "sim_exp" else ("truncation_side", "dtype") + (("reduction",) if kind == "likelihood" else ())
    for key in keys:
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
    given = dict(options or {})
    encoding = sentence_encoder(src) if kind == "sim_exp" else {}
    if encoding:  # its own token limit unless the import names one; and its encoder folder and pooling
        given["max_length"] = given.get("max_length") or encoding.pop("max_length")
        encoding.pop("max_length", None)
    settings = {**version_options(kind, given), **encoding}
    if given.get("normalize") is not None and not (kind == "classifier" and openrlhf_format(config)):
        raise ImportRefused("normalize: a setting of an OpenRLHF reward model (value_head_prefix in its config) only")
    if kind == "classifier" and openrlhf_format(config):
        # OpenRLHF's serve_rm normalizes with --reward.normalize_enable; the import's option, default what the config
        # says, and the mean and std its evaluation wrote.
        normalize = given.get("normalize")
        settings.update(format="openrlhf", value_head_prefix=str(config.get("value_head_prefix") or "score"),
                        normalize=bool(config.get("normalize_reward") if normalize is None else normalize))  # fmt: skip
        if settings["normalize"] and not isinstance(config.get("std"), (int, float)):
            raise ImportRefused("normalize: config.json has no mean and std (OpenRLHF writes them when it evaluates)")
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
