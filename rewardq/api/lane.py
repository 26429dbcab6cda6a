"""The interactive lane: a small request's pairs go to the workers over the `interactive` queue (served before
bulk work) in parts of REWARDQ_BATCH_SIZE, and the API waits for their replies. Nothing is written to SQL.
POST /v1/score, OpenRLHF's /get_reward and vLLM's /score all come through here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from rewardq.api import last_good
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.parsing import validate_items
from rewardq.api.routes.jobs import pinned_version
from rewardq.storage import registry
from rewardq.storage.repository import NewItem
from rewardq.storage.score_stats import place
from rewardq.storage.settings import Settings
from rewardq.workers import events, metrics
from rewardq.workers.messages import InteractiveBatch, enqueue_interactive


@dataclass
class Scored:
    model_version: str
    kind: str
    rows: list[dict[str, Any]]  # per pair: score, cos, truncated, n_tokens, error
    tokens: int = 0  # tokens the workers encoded for it (none for texts their caches held)

    def scores(self, field: str) -> list[float]:
        """Every pair's score, for the protocols that answer all or nothing: the first pair that could not be scored
        is a 422 naming ``field`` (the request's field that held it) and its index."""
        failed = next((i for i, row in enumerate(self.rows) if row["error"]), None)
        if failed is not None:
            error = self.rows[failed]["error"]
            raise invalid([FieldError(field, f"{error['code']}: {error['message']}", failed)])
        return [float(row["score"]) for row in self.rows]


def check_items(raw: Any, settings: Settings) -> list[NewItem]:
    """{prompt, response, id?} objects, at most REWARDQ_INTERACTIVE_MAX_ITEMS, each checked as a job's items are."""
    if isinstance(raw, list) and len(raw) > settings.interactive_max_items:
        raise invalid(
            [
                FieldError(
                    "items",
                    f"at most {settings.interactive_max_items} pairs per interactive request "
                    "(REWARDQ_INTERACTIVE_MAX_ITEMS); submit a job for more",
                )
            ],
            status=413,
        )
    return validate_items(raw, max_items=settings.interactive_max_items, max_chars=settings.max_text_chars)


async def resolve_version(
    session: Session, settings: Settings, tenant: str, requested: str | dict[str, Any] | None
) -> str:
    """The version to score with; the session's pooled connection goes back to the pool after, so a request that
    then waits for the workers holds none (the session takes a new one if it is used again). Through a brief
    database outage, the last version this process resolved for the same request (last_good); an inline ensemble
    (a mapping, which may create its version) always needs the database."""

    def resolve() -> str:
        try:
            if isinstance(requested, dict):
                return pinned_version(session, tenant, requested)
            fetch = lambda: pinned_version(session, tenant, requested)  # noqa: E731
            return last_good.read(session, ("version", tenant, requested), fetch, settings.score_stale_s)
        finally:
            session.close()

    return await run_in_threadpool(resolve)


def kind_of(session: Session, settings: Settings, version: str) -> str:
    """The version's kind as the protocol routes read it (an ensemble of classifiers counts as a classifier: each of
    its members scores a text alone); run in a thread, the session's connection goes back to the pool after."""

    def fetch() -> str:
        mv = registry.get_version(session, version=version)
        if mv is None:
            return "unknown"
        if mv.kind == "ensemble" and set(mv.config.get("member_kinds") or ()) == {"classifier"}:
            return "classifier"
        return mv.kind

    try:
        return last_good.read(session, ("kind", version), fetch, settings.score_stale_s)
    finally:
        session.close()


def score_facts(
    session: Session, settings: Settings, version: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The version's score statistics (for score_z and percentile) and its ensemble members, as last read through a
    brief database outage (last_good)."""

    def fetch() -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
        return registry.score_stats(session, version=version), registry.members(session, version=version)

    return last_good.read(session, ("facts", version), fetch, settings.score_stale_s)


# + tenant: its requests on the interactive lane now (a Redis sorted set; not the counter "rewardq:interactive:pairs:"
# older versions kept, which an API of each version may meet during an upgrade)
LANE_PAIRS = "rewardq:interactive:share:"

# One member per request on the lane, "<request id>:<pairs>", scored by the time it must be gone by (its wait, and
# some): the share held is the sum over the live members. A request gives its member back when it ends; one whose API
# process died is dropped at its own deadline, whatever the tenant sends since (a single counter's expiry would be
# pushed back by every new request, and a steady loop would never get the dead request's pairs back).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    held = held + tonumber(string.match(m, ':(%d+)$'))
end
local n, limit, hold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if held + n > limit then
    return {0, held}
end
redis.call('ZADD', KEYS[1], now + hold, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(hold) + 1)
return {1, held}
"""


def lane_held(client: redis.Redis, tenant: str) -> int:
    """The pairs the tenant's live requests hold on the lane (expired members left out)."""
    now = float(client.time()[0])
    members: list[Any] = list(client.zrangebyscore(LANE_PAIRS + tenant, now, "+inf"))
    return sum(int(bytes(m).rsplit(b":", 1)[1]) for m in members)


@asynccontextmanager
async def lane_share(settings: Settings, tenant: str, n: int) -> AsyncIterator[None]:
    """Hold ``n`` of the tenant's REWARDQ_INTERACTIVE_TENANT_MAX_PAIRS on the interactive lane while the body runs;
    429 when they would pass it. The workers serve the lane before bulk work, so without a share one tenant's
    stream of large requests would hold every other tenant's requests, and all bulk work, behind it. A request's
    share lapses on its own at its deadline should its API process die holding it (_TAKE)."""
    client = metrics.client(settings.redis_url)
    key = LANE_PAIRS + tenant
    member = f"{uuid.uuid4().hex}:{n}"
    hold = settings.interactive_timeout_s * 2 + 10  # the request's wait for the workers, with room to spare
    try:
        took, held = client.eval(_TAKE, 1, key, n, settings.interactive_tenant_max_pairs, hold, member)
    except redis.RedisError as exc:
        raise ApiError(503, "could not reach the queue (is Redis up?)", headers={"Retry-After": "5"}) from exc
    if not took:
        raise ApiError(
            429,
            f"this tenant already has {held} pairs on the interactive lane; {n} more would pass the "
            f"{settings.interactive_tenant_max_pairs} allowed (REWARDQ_INTERACTIVE_TENANT_MAX_PAIRS): retry when "
            "they are answered, or submit a job",
            headers={"Retry-After": "1"},
        )
    try:
        yield
    finally:
        try:
            client.zrem(key, member)
        except redis.RedisError:
            pass  # it lapses at its deadline


async def score_pairs(
    settings: Settings, tenant: str, version: str, prompts: Sequence[str], responses: Sequence[str]
) -> Scored:
    """Score the pairs through the interactive queue and wait for every part (504 after the timeout), within the
    tenant's share of the lane (lane_share)."""
    async with lane_share(settings, tenant, len(prompts)):
        return await _score_pairs(settings, tenant, version, prompts, responses)


async def _score_pairs(
    settings: Settings, tenant: str, version: str, prompts: Sequence[str], responses: Sequence[str]
) -> Scored:
    request_id = uuid.uuid4().hex
    size = settings.batch_size
    parts = [
        InteractiveBatch(
            request_id=request_id,
            part=k,
            model_version=version,
            prompts=list(prompts[lo : lo + size]),
            responses=list(responses[lo : lo + size]),
            tenant=tenant,
        )
        for k, lo in enumerate(range(0, len(prompts), size))
    ]
    timeout = settings.interactive_timeout_s
    try:
        await run_in_threadpool(enqueue_interactive, parts, settings.interactive_queue, timeout)
    except Exception as exc:
        raise ApiError(503, "could not reach the queue (is Redis up?)", headers={"Retry-After": "5"}) from exc
    try:
        replies = await events.await_replies(settings.redis_url, request_id, len(parts), timeout)
    except TimeoutError as exc:
        raise ApiError(
            504,
            f"no worker answered within {timeout:.0f}s ({exc}): is a worker consuming the "
            f"'{settings.interactive_queue}' queue? (rewardq worker serves it by default)",
            headers={"Retry-After": "5"},
        ) from exc
    except (redis.ConnectionError, OSError) as exc:
        raise ApiError(503, "lost the queue while waiting (is Redis up?)", headers={"Retry-After": "5"}) from exc

    rows: list[dict[str, Any]] = []
    kind, tokens = "", 0
    for reply in sorted(replies, key=lambda r: int(r.get("part") or 0)):
        if reply.get("error"):
            err = reply["error"]
            status = 503 if err.get("code") in ("model_unavailable", "model_load_failed", "scoring_error") else 422
            raise ApiError(
                status,
                f"the worker could not score this request: {err.get('code')}",
                [FieldError("model_version", str(err.get("message", "")))],
            )
        kind = reply.get("kind", kind)
        tokens += int(reply.get("tokens", 0))
        rows += reply["rows"]
    return Scored(version, kind, rows, tokens)


Normalize = Literal["none", "z"]
NORMALIZE_DOC = (
    "none: raw rewards; z: each reward as (score - mean) / std of the version's scores on known pairs (score_z, "
    "what the README recommends for RLHF: a reward model's scale then never sets the policy's step size)"
)


async def normalized(
    session: Session, settings: Settings, version: str, scores: list[float], how: Normalize
) -> list[float]:
    """``scores`` as asked: raw, or each one's z-score in the version's distribution (409 when the version has none
    yet: a worker records it when it first loads the version, so it exists once anything was scored with it)."""
    if how == "none":
        return scores
    stats, _ = await run_in_threadpool(score_facts, session, settings, version)
    zs = [place(x, stats)[0] for x in scores]
    if any(z is None for z in zs):
        raise ApiError(409, f"no score distribution is known for version {version} yet: ask again without normalize")
    return [float(z) for z in zs if z is not None]
