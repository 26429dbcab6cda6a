"""OpenRLHF's remote reward model protocol: POST /get_reward (also /openrlhf/get_reward) with
``{"query": [prompt + response, ...], "prompts": [...], "labels": [...]}``, answered with
``{"rewards": [...], "scores": [...], "extra_logs": {...}}``, through the interactive lane.

How a query is scored (docs/rlhf.md):
- with ``prompts``, each query is split into its prompt and response, and the version scores the pair as it scores
  a job's: a chat classifier applies its template, unless the prompt went through the template already (OpenRLHF's
  ``--apply_chat_template``), which it then scores as the text it is, as serve_rm does;
- without ``prompts`` (serve_rm ignores them), a classifier scores each query as it is, without special tokens:
  serve_rm's tokenization. A sim-exp or likelihood version scores a (prompt, response) pair, so it needs prompts.

OpenRLHF's client sends no Authorization header: give it the key in the URL's credentials,
``--remote_rm_url http://rewardq:KEY@host:8000/get_reward``; its HTTP client turns those into Basic auth.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

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
from rewardq.workers.models import TEXT_ONLY

router = APIRouter(tags=["integrations"])


def split_queries(queries: list[Any], prompts: list[Any]) -> list[dict[str, Any]]:
    """Items {prompt, response}: each query with its prompt prefix removed (where the prompt is not a prefix,
    as when decoding changed its spaces, the text after the prompt's last occurrence is the response)."""
    items = []
    for i, (q, p) in enumerate(zip(queries, prompts, strict=True)):
        if not isinstance(q, str) or not isinstance(p, str):
            raise invalid([FieldError("query" if not isinstance(q, str) else "prompts", "must be a string", i)])
        if q.startswith(p):
            response = q[len(p) :]
        elif p and p in q:
            response = q[q.rindex(p) + len(p) :]
        else:
            raise invalid([FieldError("prompts", "the prompt is not part of its query", i)])
        items.append({"prompt": p, "response": response})
    return items


@router.post("/get_reward", summary="OpenRLHF remote reward model")
@router.post("/openrlhf/get_reward", summary="OpenRLHF remote reward model (prefixed)")
async def get_reward(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    model_version: Annotated[
        str | None, Query(max_length=256, description="an id or a name; default: your active one")
    ] = None,
    normalize: Annotated[Normalize, Query(description=NORMALIZE_DOC)] = "none",
) -> dict[str, Any]:
    body = await read_body(request, settings.max_json_bytes)
    try:
        doc = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("query"), list):
        raise invalid([FieldError("query", 'the body must be {"query": [...], "prompts": [...]}')])
    queries, prompts = doc["query"], doc.get("prompts")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)):
        raise invalid([FieldError("prompts", "a list as long as query, each query's prompt")])
    if prompts is None:  # the query alone, as serve_rm reads it (checked as a pair with an empty prompt)
        bad = next((i for i, q in enumerate(queries) if not isinstance(q, str)), None)
        if bad is not None:
            raise invalid([FieldError("query", "must be a string", bad)])
        items = check_items([{"prompt": "", "response": q} for q in queries], settings)
    else:
        items = check_items(split_queries(queries, prompts), settings)
    version = await resolve_version(session, settings, tenant, model_version)
    if prompts is None:
        kind = await run_in_threadpool(kind_of, session, settings, version)
        if kind != "classifier":
            raise invalid(
                [
                    FieldError(
                        "prompts",
                        f"{version} is a {kind} version, which scores a (prompt, response) pair: send each query's "
                        "prompt in prompts (a classifier scores a query alone, as OpenRLHF's serve_rm does)",
                    )
                ]
            )
    texts = [TEXT_ONLY if prompts is None else it.prompt for it in items]
    scored = await score_pairs(settings, tenant, version, texts, [it.response for it in items])
    rewards = await normalized(session, settings, version, scored.scores("query"), normalize)
    extra = {"rewardq_truncated": [float(row["truncated"]) for row in scored.rows]}
    if scored.kind == "likelihood":
        extra["rewardq_n_tokens"] = [float(row["n_tokens"] or 0) for row in scored.rows]
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra, "model_version": version}
