"""API keys made with `rewardq keys create`: generated here, shown once, stored as a SHA-256 only."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from storage.models import ApiKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, tenant: str, admin: bool = False) -> str:
    key = "rq_" + secrets.token_urlsafe(32)
    session.add(ApiKey(key_hash=hash_key(key), tenant=tenant, prefix=key[:10], admin=admin))
    session.flush()
    return key


def any_keys(session: Session) -> bool:
    return bool(session.scalar(select(exists().where(ApiKey.revoked_at.is_(None)))))


def principal_for(session: Session, *, key: str) -> tuple[str, bool] | None:
    """(tenant, admin) of an unrevoked key, or None."""
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    # The lookup is by hash; the compare on the digests keeps the final check constant-time as well.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.tenant, row.admin


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
