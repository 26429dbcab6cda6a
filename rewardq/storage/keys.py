"""API keys made with `rewardq keys create`: generated here, shown once, stored as a SHA-256 only."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from rewardq.storage.clock import utcnow
from rewardq.storage.models import ApiKey
from rewardq.storage.ui_sessions import delete_sessions_of_key


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, tenant: str, admin: bool = False) -> str:
    key = "rq_" + secrets.token_urlsafe(32)
    session.add(ApiKey(key_hash=hash_key(key), tenant=tenant, prefix=key[:10], admin=admin))
    session.flush()
    return key


def any_keys(session: Session, *, revoked_too: bool = False) -> bool:
    """Whether a usable key exists (``revoked_too``: whether a key was ever made)."""
    cond = exists() if revoked_too else exists().where(ApiKey.revoked_at.is_(None))
    return bool(session.scalar(select(cond.select_from(ApiKey))))


def principal_for(session: Session, *, key: str) -> tuple[str, bool] | None:
    """(tenant, admin) of an unrevoked key, or None."""
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    # The lookup is by hash; the compare on the digests keeps the final check constant-time as well.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.tenant, row.admin


def principal_for_hash(session: Session, *, key_hash: str) -> tuple[str, bool] | None:
    """(tenant, admin) of the unrevoked key whose SHA-256 is ``key_hash`` (a dashboard session's key), or None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    return (row.tenant, row.admin) if row is not None else None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, *, prefix: str) -> str | None:
    """Revoke the unrevoked key with this prefix; returns its tenant, or None when there is none (or several)."""
    rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))))
    if len(rows) != 1:
        return None
    rows[0].revoked_at = utcnow()
    delete_sessions_of_key(session, key_hash=rows[0].key_hash)  # its dashboard sessions end with it
    return rows[0].tenant
