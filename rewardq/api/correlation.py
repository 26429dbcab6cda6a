"""Request ids: every response carries an X-Request-ID, and an unexpected failure answers a generic message that
quotes it while the details (exception, traceback) go to the API's log under the same id. A tenant never sees SQL,
host names or file paths; the operator finds the full story by the id the tenant quotes."""

from __future__ import annotations

import re
import uuid
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

_current: ContextVar[str] = ContextVar("rewardq_request_id", default="")
_GIVEN = re.compile(r"[A-Za-z0-9._:-]{8,64}")  # a caller's own id is kept when it is this plain (log-safe)

Scope = MutableMapping[str, Any]


SCOPE_KEY = "rewardq.request_id"


def request_id(scope: Scope | None = None) -> str:
    """The id of the request being served: from its ASGI scope when given (an error handler that runs outside this
    middleware), else from the context; a new one outside any request."""
    return (scope or {}).get(SCOPE_KEY) or _current.get() or uuid.uuid4().hex[:16]


class RequestIds:
    """ASGI middleware: the caller's X-Request-ID when it is plain, else a new one; echoed on the response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _GIVEN.fullmatch(given) else uuid.uuid4().hex[:16]
        token = _current.set(rid)
        scope[SCOPE_KEY] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
