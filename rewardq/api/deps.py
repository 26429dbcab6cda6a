"""FastAPI dependencies as Annotated aliases: settings, a DB session, the caller (tenant and role)."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from rewardq.api import last_good
from rewardq.api.errors import ApiError, FieldError
from rewardq.api.parsing import NDJSON_TYPES
from rewardq.storage import keys, ui_sessions
from rewardq.storage import repository as repo
from rewardq.storage.db import get_sessionmaker
from rewardq.storage.settings import Settings, get_settings
from rewardq.workers import metrics

DEFAULT_TENANT = "default"
log = logging.getLogger(__name__)


def _session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with get_sessionmaker(settings.database_url)() as session:
        yield session


UI_COOKIE = "__Host-rewardq_session"  # https, or a loopback host: Secure, Path=/, no Domain (what __Host- demands)
UI_COOKIE_PLAIN = "rewardq_session"  # plain http to another host, where a browser would drop a Secure cookie
UI_HEADER = "x-rewardq-ui"  # sent by the dashboard's scripts; a cross-site form cannot set it


def auth_required(settings: Settings, session: Session) -> bool:
    """Auth is on unless the operator allowed anonymous use (REWARDQ_ALLOW_ANONYMOUS) and no key was ever made, in
    REWARDQ_API_KEYS or with `rewardq keys create`: revoking the last key never opens the API."""
    if not settings.allow_anonymous or settings.api_key_map():
        return True
    # Through a brief outage (last_good) only "keys were made" is remembered: a "none yet" is asked again, so a key
    # made just before a cut can never leave the API anonymous during it.
    made = lambda: keys.any_keys(session, revoked_too=True) or None  # noqa: E731
    return bool(last_good.read(session, ("keys made",), made, settings.score_stale_s))


NO_KEYS = (
    "no API keys, and anonymous use is not allowed: make a key with `rewardq keys create TENANT` (or set "
    "REWARDQ_API_KEYS='tenant:KEY' with KEY at least 32 characters), or set REWARDQ_ALLOW_ANONYMOUS=1 to serve "
    "without keys on a trusted loopback"
)
ANONYMOUS_WARNING = (
    "REWARDQ_ALLOW_ANONYMOUS=1 and no API keys: ANYONE WHO CAN REACH THIS API IS ITS ADMIN (every tenant's jobs, "
    "models and training). Bind it to 127.0.0.1 only, or create a key with `rewardq keys create TENANT`."
)


def check_auth_setup(settings: Settings) -> str | None:
    """Before the API serves anything: refuse to start open by accident (RuntimeError saying what to do; a
    malformed or short key in REWARDQ_API_KEYS is a ValueError). Returns a warning when it will serve anonymously."""
    if settings.api_key_map():
        return None
    try:
        with get_sessionmaker(settings.database_url)() as session:
            usable, made = keys.any_keys(session), keys.any_keys(session, revoked_too=True)
    except SQLAlchemyError as exc:  # not migrated, or down: auth stays on unless anonymous use is allowed
        log.warning("could not look for API keys: %s", exc)
        return ANONYMOUS_WARNING if settings.allow_anonymous else None
    if usable:
        return None
    if made and settings.allow_anonymous:  # every key revoked: locked, never open
        return "every API key is revoked: every request is refused (401) until `rewardq keys create TENANT`"
    if not settings.allow_anonymous:
        raise RuntimeError(NO_KEYS)
    return ANONYMOUS_WARNING


@dataclass(frozen=True)
class Caller:
    """Who is calling: a tenant, and whether its key is an admin key (imports shared models, sets the default)."""

    tenant: str
    admin: bool = False


ANONYMOUS = Caller(DEFAULT_TENANT, admin=True)  # without keys the operator's own loopback use: no roles to check


def caller_for_key(settings: Settings, session: Session, token: str) -> Caller | None:
    found = None
    for key, principal in settings.api_key_map().items():
        # Compare against every key, in constant time, so timing says nothing about which one matched.
        if hmac.compare_digest(key.encode(), token.encode()):
            found = principal
    if found is None:
        # Through a brief database outage, the answer this process read last for this key (last_good: a scoring
        # request needs nothing else from the database), keyed by the key's hash, never the key.
        lookup = lambda: keys.principal_for(session, key=token)  # noqa: E731
        found = last_good.read(session, ("key", keys.hash_key(token)), lookup, settings.score_stale_s)
    return Caller(*found) if found else None


def tenant_for_key(settings: Settings, session: Session, token: str) -> str | None:
    caller = caller_for_key(settings, session, token)
    return caller.tenant if caller else None


def request_key(request: Request) -> str:
    """The API key a request carries in its headers ('' if none).

    `Authorization: Bearer <key>`, or Basic with the key as the password: what an HTTP client sends for a
    URL like http://rewardq:KEY@host/get_reward (OpenRLHF's reward client sends no header of its own)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token
    if scheme.lower() == "basic" and token:
        try:
            user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return "\0invalid"  # never a key: answered 401
        return password or user
    return ""


def _loopback(host: str | None) -> bool:
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_cookie(request: Request) -> tuple[str, bool]:
    """The dashboard's session cookie for this request: its name, and whether it is Secure.

    Secure (and so the `__Host-` name) over https, including behind a TLS proxy whose `X-Forwarded-Proto` uvicorn
    trusts, and on a loopback host, which browsers treat as secure over plain http too. Plain http to any other
    host gets a cookie without Secure, which a browser would otherwise drop; sign-in logs a warning then. A
    request is only ever read with the name it would be given, so a cookie set over plain http (by anyone on the
    network) is never taken for an https one."""
    if request.url.scheme == "https" or _loopback(request.url.hostname):
        return UI_COOKIE, True
    return UI_COOKIE_PLAIN, False


def session_token(request: Request) -> str:
    """The dashboard session id in the request's cookie ('' if none)."""
    return request.cookies.get(ui_cookie(request)[0], "")


def _principal_for_key_hash(settings: Settings, session: Session, key_hash: str) -> tuple[str, bool] | None:
    found = None
    for key, principal in settings.api_key_map().items():
        if hmac.compare_digest(keys.hash_key(key).encode(), key_hash.encode()):
            found = principal
    return found or keys.principal_for_hash(session, key_hash=key_hash)


def caller_for_session(settings: Settings, session: Session, token: str) -> tuple[Caller, str] | None:
    """The caller of an unexpired dashboard session whose key is still valid (still in REWARDQ_API_KEYS for the
    same tenant, or not revoked), with the hash of that key; None otherwise."""
    row = ui_sessions.find_session(session, token=token)
    if row is None:
        return None
    principal = _principal_for_key_hash(settings, session, row.key_hash)
    if principal is None or principal[0] != row.tenant:
        return None
    return Caller(*principal), row.key_hash


def _caller(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(_session)],
) -> Caller:
    """The caller, from `Authorization: Bearer <key>` or the dashboard's session cookie. Each key is rate limited (each
    client address when anonymous), and so are failed authentications per client address. The key lookup's
    connection goes back to the pool here: a request that then waits for a thread (hundreds of long polls arriving
    at once) holds none."""
    try:
        return _identify(request, settings, session)
    finally:
        session.rollback()


caller_of = _caller  # for a dependency that accepts another credential first (api.routes.ops: /metrics)


def _identify(request: Request, settings: Settings, session: Session) -> Caller:
    address = request.client.host if request.client else "unknown"
    if not auth_required(settings, session):
        _limit(settings, f"addr:{address}", settings.rate_limit_per_minute, "requests per minute from this address")
        return ANONYMOUS
    key = request_key(request)
    token = "" if key else session_token(request)
    if not key and not token:
        raise ApiError(401, "missing 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    if key:
        stop_guessing(settings, address)
        caller = caller_for_key(settings, session, key)
        if caller is None:
            note_failed_auth(settings, address)
            raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        key_hash = keys.hash_key(key)
    else:
        if request.method not in ("GET", "HEAD") and request.headers.get(UI_HEADER) != "1":
            # The cookie alone never authorises a change: that would let another site's form act as the user.
            raise ApiError(403, f"cookie-authenticated changes need the {UI_HEADER} header")
        # Not a failed authentication: a session id is 256 random bits, never guessed, and a dashboard tab left
        # open past its session must not lock its address out of signing in again.
        found = caller_for_session(settings, session, token)
        if found is None:
            raise ApiError(401, "dashboard session ended or expired: sign in again at /ui/login",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        caller, key_hash = found
    _limit(settings, f"key:{key_hash[:24]}", settings.rate_limit_per_minute, "requests per minute")
    return caller


def _tenant(caller: Annotated[Caller, Depends(_caller)]) -> str:
    return caller.tenant


def _admin(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if not caller.admin:
        raise ApiError(403, "this needs an admin key (rewardq keys create TENANT --admin)")
    return caller


_local: dict[str, int] = {}  # the counters while Redis is unreachable: per process, so still a limit
_local_lock = threading.Lock()


def _count(settings: Settings, name: str, add: int = 1) -> int:
    """Add ``add`` to a counter of the current minute and return it; counted in Redis, so every API process
    shares it, or in this process while Redis is unreachable (a limit never fails open)."""
    key = f"rewardq:ratelimit:{name}:{int(time.time() // 60)}"
    try:
        pipe = metrics.client(settings.redis_url).pipeline()
        pipe.incrby(key, add)
        pipe.expire(key, 120)
        return int(pipe.execute()[0])
    except redis.RedisError:
        with _local_lock:
            if len(_local) > 10_000:  # forget past minutes only, so a flood of new names never resets a count
                for old in [k for k in _local if not k.endswith(f":{int(time.time() // 60)}")]:
                    del _local[old]
            _local[key] = _local.get(key, 0) + add
            return _local[key]


def stop_guessing(settings: Settings, address: str) -> None:
    """429 once this client address has failed REWARDQ_AUTH_FAILURES_PER_MINUTE authentications this minute:
    checked before the key, so guessing stops there whatever the guess."""
    limit = settings.auth_failures_per_minute
    if limit and _count(settings, f"authfail:{address}", add=0) >= limit:
        raise _too_many(limit, "failed authentications per minute from this address")


def note_failed_auth(settings: Settings, address: str) -> None:
    if settings.auth_failures_per_minute:
        _count(settings, f"authfail:{address}")


def _too_many(limit: int, what: str) -> ApiError:
    retry = max(1, int(60 - time.time() % 60) + 1)
    return ApiError(429, f"rate limit of {limit} {what} exceeded", headers={"Retry-After": str(retry)})


def _limit(settings: Settings, name: str, limit: int, what: str) -> None:
    if limit and _count(settings, name) > limit:
        raise _too_many(limit, what)


def request_content_type(request: Request) -> str:
    """The body's media type, refused with 415 unless it is JSON or JSON Lines."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", *NDJSON_TYPES):
        raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}; use application/json or "
                            "application/x-ndjson", [FieldError("content-type", "unsupported")])  # fmt: skip
    return ctype


async def read_body(request: Request, limit: int, hint: str = "") -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (``hint``: what to do
    instead, appended to the message)."""
    more = f"; {hint}" if hint else ""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}{more}",
                       [FieldError("body", "too large")])  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes{more}",
                           [FieldError("body", "too large")])  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
CallerDep = Annotated[Caller, Depends(_caller)]
TenantDep = Annotated[str, Depends(_tenant)]
AdminDep = Annotated[Caller, Depends(_admin)]


def full_id(session: Session, table: Any, given: str, *, tenant: str, noun: str) -> str:
    """The id of the tenant's row of ``table`` (jobs, training runs, schedules) that ``given`` names: the one id that
    starts with it (8 or more characters), else ``given`` itself; 409 when several ids start with it."""
    ids = repo.matching_ids(session, table, prefix=given.lower(), tenant=tenant)
    if len(ids) > 1:
        raise ApiError(
            409,
            f"{noun} id {given!r} matches several {noun}s: give more of it",
            [FieldError(f"{noun}_id", "ambiguous")],
        )
    return ids[0] if ids else given
