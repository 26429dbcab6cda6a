"""Dashboard sessions: made on sign-in, looked up on every cookie request, deleted on sign-out or expiry.

The cookie holds a random id; only its SHA-256 is stored, so a copy of the table signs nobody in."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rewardq.storage.models import UiSession, db_now, now_sql


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(session: Session, *, tenant: str, admin: bool, key_hash: str, hours: float) -> str:
    """A new session for the key whose SHA-256 is ``key_hash``, ending ``hours`` from now; returns its id."""
    token = secrets.token_urlsafe(32)
    now = db_now(session)
    session.add(UiSession(id_hash=_hash(token), tenant=tenant, admin=admin, key_hash=key_hash, created_at=now,
                          expires_at=now + timedelta(hours=hours)))  # fmt: skip
    session.flush()
    return token


def find_session(session: Session, *, token: str) -> UiSession | None:
    """The unexpired session with this id, or None."""
    return session.scalar(
        select(UiSession).where(UiSession.id_hash == _hash(token), UiSession.expires_at > now_sql(session))
    )


def delete_session(session: Session, *, token: str) -> bool:
    res = session.execute(delete(UiSession).where(UiSession.id_hash == _hash(token)))
    return bool(res.rowcount)  # type: ignore[attr-defined]


def delete_sessions_of_key(session: Session, *, key_hash: str) -> int:
    res = session.execute(delete(UiSession).where(UiSession.key_hash == key_hash))
    return int(res.rowcount)  # type: ignore[attr-defined]


def purge_expired(session: Session) -> int:
    res = session.execute(delete(UiSession).where(UiSession.expires_at <= now_sql(session)))
    return int(res.rowcount)  # type: ignore[attr-defined]
