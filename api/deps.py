"""FastAPI dependencies as Annotated aliases: settings, a DB session, the caller's tenant."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from storage.db import get_sessionmaker
from storage.settings import Settings, get_settings

DEFAULT_TENANT = "default"


def _session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with get_sessionmaker(settings.database_url)() as session:
        yield session


def _tenant(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    keys = settings.api_key_map()
    if not keys:
        return DEFAULT_TENANT
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    tenant = None
    for key, owner in keys.items():
        # Compare against every key, in constant time, so timing says nothing about which one matched.
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
TenantDep = Annotated[str, Depends(_tenant)]
