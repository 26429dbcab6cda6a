"""vLLM's score API: POST /score with ``text_1`` and ``text_2`` (a string or a list each: one-to-many when text_1
is one text, else zipped), answered as ``{"object": "list", "data": [{"index", "object": "score", "score"}],
"usage"}``, through the interactive lane. Batch files in the OpenAI/vLLM format: ``api.formats``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from rewardq.api.deps import SessionDep, SettingsDep, TenantDep, read_body
from rewardq.api.errors import FieldError, invalid
from rewardq.api.lane import NORMALIZE_DOC, Normalize, check_items, normalized, resolve_version, score_pairs
from rewardq.api.parsing import loads
from rewardq.client.formats import FormatError, score_pairs_of, score_response
from rewardq.storage.settings import Settings

router = APIRouter(tags=["integrations"])


def is_vllm_score(doc: Any) -> bool:
    """A vLLM score body (``text_1`` and ``text_2``), told apart from rewardq's own ``{"items": [...]}`` by shape:
    POST /v1/score takes either (vLLM serves its score API at /v1/score too)."""
    return isinstance(doc, dict) and "items" not in doc and ("text_1" in doc or "text_2" in doc)


async def score_doc(
    doc: Any, session: Session, settings: Settings, tenant: str, normalize: Normalize = "none"
) -> dict[str, Any]:
    """Score a vLLM body and answer in vLLM's shape."""
    try:
        pairs = score_pairs_of(doc)
    except FormatError as exc:
        field, _, message = str(exc).partition(": ")
        raise invalid([FieldError(field, message)]) from exc
    items = check_items([{"prompt": a, "response": b} for a, b in pairs], settings)
    model = doc.get("model")
    version = await resolve_version(session, tenant, model if isinstance(model, str) and model else None)
    scored = await score_pairs(settings, tenant, version, [it.prompt for it in items], [it.response for it in items])
    failed = [i for i, row in enumerate(scored.rows) if row["error"]]
    if failed:
        row = scored.rows[failed[0]]
        raise invalid([FieldError("text_2", f"{row['error']['code']}: {row['error']['message']}", failed[0])])
    scores = await normalized(session, version, [float(row["score"]) for row in scored.rows], normalize)
    return score_response(version, scores, scored.tokens)


@router.post("/score", summary="vLLM-compatible scoring")
async def vllm_score(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    normalize: Annotated[Normalize, Query(description=NORMALIZE_DOC)] = "none",
) -> dict[str, Any]:
    """`{"model"?, "text_1", "text_2"}`: `model` is a version's id or name (default: your active version)."""
    try:
        doc = loads(await read_body(request, settings.max_json_bytes))
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc
    return await score_doc(doc, session, settings, tenant, normalize)
