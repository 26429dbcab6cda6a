"""vLLM's score API: POST /score with ``text_1`` and ``text_2`` (a string or a list each: one-to-many when text_1
is one text, else zipped), answered as ``{"object": "list", "data": [{"index", "object": "score", "score"}],
"usage"}``, through the interactive lane; and /classify and /pooling for classifier versions (each text scored as it
is), in vLLM's ClassificationResponse and PoolingResponse shapes. Batch files in the OpenAI/vLLM format:
``api.formats``."""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from rewardq.api.deps import SessionDep, SettingsDep, TenantDep, read_body
from rewardq.api.errors import FieldError, invalid
from rewardq.api.lane import (
    NORMALIZE_DOC,
    Normalize,
    check_items,
    kind_of,
    normalized,
    resolve_version,
    score_pairs,
)
from rewardq.api.parsing import loads
from rewardq.client.formats import FormatError, score_pairs_of, score_response
from rewardq.storage.settings import Settings
from rewardq.workers.models import TEXT_ONLY

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
    version = await resolve_version(session, settings, tenant, model if isinstance(model, str) and model else None)
    scored = await score_pairs(settings, tenant, version, [it.prompt for it in items], [it.response for it in items])
    scores = await normalized(session, settings, version, scored.scores("text_2"), normalize)
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
    return await score_doc(await _body(request, settings), session, settings, tenant, normalize)


def _texts(doc: Any, settings: Settings) -> tuple[list[str], list[str]]:
    """(prompts, texts) to score: vLLM's ``input``, one text or a list of texts, each scored as it is (prompt
    TEXT_ONLY); or its chat form, ``messages``, one conversation ending with the assistant's answer, which the
    classifier's chat template renders (rewardq.conversations). Token ids are refused with what to send."""
    if not isinstance(doc, dict):
        raise invalid([FieldError("body", 'must be {"model"?, "input": "..." or ["...", ...]}')])
    if "messages" in doc:
        if "input" in doc:
            raise invalid([FieldError("messages", "give input or messages, not both")])
        [item] = check_items([{"messages": doc["messages"]}], settings)
        return [item.prompt], [item.response]
    given = doc.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts:
        raise invalid([FieldError("input", "a text or a non-empty list of texts")])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise invalid([FieldError("input", "must be text (token ids are not accepted)", bad)])
    checked = [it.response for it in check_items([{"prompt": "", "response": t} for t in texts], settings)]
    return [TEXT_ONLY] * len(checked), checked


async def _score_texts(doc: Any, session: Session, settings: Settings, tenant: str) -> tuple[str, list[float], int]:
    """Each text scored as it is by a classifier version (the version's id, the rewards, the tokens)."""
    prompts, texts = _texts(doc, settings)
    model = doc.get("model")
    version = await resolve_version(session, settings, tenant, model if isinstance(model, str) and model else None)
    kind = await run_in_threadpool(kind_of, session, settings, version)
    if kind != "classifier":
        message = f"{version} is a {kind} version, which scores (prompt, response) pairs: use /score or /v1/score"
        raise invalid([FieldError("model", message)])
    scored = await score_pairs(settings, tenant, version, prompts, texts)
    return version, scored.scores("input"), scored.tokens


def _usage(tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}


async def _body(request: Request, settings: Settings) -> Any:
    """The request's JSON, read within REWARDQ_MAX_JSON_BYTES."""
    try:
        return loads(await read_body(request, settings.max_json_bytes))
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc


@router.post("/classify", summary="vLLM-compatible classification")
@router.post("/v1/classify", summary="vLLM-compatible classification (prefixed)")
async def vllm_classify(request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
                        ) -> dict[str, Any]:  # fmt: skip
    """`{"model"?, "input", "use_activation"?}` for a classifier version: each text scored as it is (no special
    tokens added), or `{"model"?, "messages"}`: one conversation through the model's chat template. Answered in
    vLLM's ClassificationResponse shape; a reward model has one class: `probs` is `[sigmoid(reward)]`, as vLLM
    activates a one-label model, or `[reward]` with `"use_activation": false`."""
    doc = await _body(request, settings)
    version, rewards, tokens = await _score_texts(doc, session, settings, tenant)
    active = doc.get("use_activation", doc.get("activation", True))
    probs = [1.0 / (1.0 + math.exp(-r)) if active is not False else r for r in rewards]
    data = [{"index": i, "label": "LABEL_0", "probs": [p], "num_classes": 1} for i, p in enumerate(probs)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": version,
            "data": data, "usage": _usage(tokens)}  # fmt: skip


@router.post("/pooling", summary="vLLM-compatible pooling")
@router.post("/v1/pooling", summary="vLLM-compatible pooling (prefixed)")
async def vllm_pooling(request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
                       ) -> dict[str, Any]:  # fmt: skip
    """`{"model"?, "input"}` for a classifier version: each text's pooled output, the reward head's one value
    (`data: [reward]`, a sequence's reward; not per-token values), in vLLM's PoolingResponse shape."""
    doc = await _body(request, settings)
    if isinstance(doc, dict) and doc.get("encoding_format", "float") != "float":
        raise invalid([FieldError("encoding_format", "only float is served")])
    version, rewards, tokens = await _score_texts(doc, session, settings, tenant)
    data = [{"index": i, "object": "pooling", "data": [r]} for i, r in enumerate(rewards)]
    return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": version,
            "data": data, "usage": _usage(tokens)}  # fmt: skip
