"""A bounded property-based fuzz run of the OpenAPI schema (schemathesis): no input may get a 5xx."""

from __future__ import annotations

import json
import uuid

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from rewardq.storage.db import session_scope
from rewardq.storage.models import Schedule
from tests.conftest import Ledger, make_client
from tests.support import Stack

EXAMPLES = 25


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: object, value: object) -> bytes:
    # The schema says "one object a line"; generated values become lines, whatever they are.
    values = value if isinstance(value, list) else [value]
    return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in values).encode("utf-8", "surrogatepass")


def test_no_generated_request_gets_a_server_error(stack: Stack, ledger: Ledger):
    """Against the stack's worker: the interactive operations (/v1/score, /get_reward, /score) answer from it."""
    operations: list[str] = []
    calls: list[int] = []
    db_url = stack.db_url
    # Bounded inputs keep each scored request short: the fuzz looks for 5xx answers, not for slow ones.
    # With auth on, as deployed: every generated request carries a tenant's admin key (the widest role).
    key = "fuzz-" + uuid.uuid4().hex + uuid.uuid4().hex
    auth = {"Authorization": f"Bearer {key}"}
    with make_client(
        db_url,
        stack.queue,
        f"{stack.queue}-training",
        interactive_max_items=64,
        max_text_chars=2000,
        allow_anonymous=False,
        api_keys=f"fuzz-{key[5:13]}:{key}:admin",
    ) as client:
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
        for result in schema.get_all_operations():
            operation = result.ok()
            operations.append(operation.label)

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)  # fmt: skip
            def fuzz(case: schemathesis.Case) -> None:
                calls.append(case.call_and_validate(checks=[not_a_server_error], timeout=120, headers=auth).status_code)

            fuzz()
    with session_scope(db_url) as s:
        s.query(Schedule).delete()  # no fuzzed schedule may fire in a later test
    assert len(operations) >= 15, operations
    assert len(calls) >= 5 * len(operations) and max(calls) < 500
    assert any(400 <= c < 500 for c in calls) and any(c < 300 for c in calls)
    assert calls.count(401) < len(calls) // 10  # the key was accepted: the fuzz reached the handlers
    backend = "PostgreSQL" if db_url.startswith("postgresql") else "SQLite"
    ledger.add(
        "fuzz",
        f"schemathesis with an API key: up to {EXAMPLES} generated requests for each of the {len(operations)} "
        "operations",
        backend,
        "no 5xx",
    )
