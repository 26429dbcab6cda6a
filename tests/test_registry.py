"""The model registry: shared and owned versions, an active version per tenant over the operator's default, roles,
and promotions that are compare-and-set (forced interleavings on SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy.exc import IntegrityError

from rewardq.storage import registry
from rewardq.storage.db import get_sessionmaker, session_scope
from rewardq.storage.models import DEFAULT_SCOPE, ActiveVersion
from tests.conftest import make_client


def _versions(db_url: str, owner: str | None = None, n: int = 3) -> list[str]:
    names = [f"v-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    with session_scope(db_url) as s:
        for v in names:
            registry.register(s, version=v, kind="sim_exp", base_model="test", path=None, config={}, owner=owner)
    return names


def test_each_tenant_has_its_own_active_version_over_the_default(db_url: str):
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    own = _versions(db_url, owner=a, n=1)[0]
    shared = _versions(db_url, n=1)[0]
    with session_scope(db_url) as s:
        default = registry.default_version(s)
        assert default and registry.active_version(s, tenant=a) == registry.active_version(s, tenant=b) == default
        registry.activate(s, scope=a, version=own)
    with session_scope(db_url) as s:
        assert registry.active_version(s, tenant=a) == own and registry.active_version(s, tenant=b) == default
        assert registry.get_version(s, version=own, tenant=b) is None  # another tenant's version does not exist
        assert registry.get_version(s, version=own, tenant=a) is not None
        assert own not in {mv.version for mv in registry.list_versions(s, tenant=b)}
        assert {own, shared} <= {mv.version for mv in registry.list_versions(s, tenant=a)}
        registry.follow_default(s, tenant=a)
    with session_scope(db_url) as s:
        assert registry.active_version(s, tenant=a) == default
        with pytest.raises(IntegrityError):  # one active version per scope is a constraint, not a convention
            with s.begin_nested():
                s.add(ActiveVersion(scope=DEFAULT_SCOPE, version=shared))
                s.flush()


def test_promotion_is_a_compare_and_set_on_the_version_the_gate_saw(db_url: str):
    """Two runs both gated against v0: the first promotes, the second must not overwrite it."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    v1, v2, v3 = _versions(db_url, owner=tenant)
    with session_scope(db_url) as s:
        v0 = registry.active_version(s, tenant=tenant)
    with session_scope(db_url) as s:
        assert registry.promote(s, tenant=tenant, version=v1, expected=v0)  # it followed the default: a new row
    with session_scope(db_url) as s:
        assert not registry.promote(s, tenant=tenant, version=v2, expected=v0)  # gated against a stale v0
        assert registry.active_version(s, tenant=tenant) == v1
        assert registry.promote(s, tenant=tenant, version=v3, expected=v1)  # its own row: an UPDATE … WHERE
    with session_scope(db_url) as s:
        assert registry.active_version(s, tenant=tenant) == v3
    # A tenant that follows the default, while the operator moves the default: the gate's comparison is stale.
    other = f"o-{uuid.uuid4().hex[:6]}"
    with session_scope(db_url) as s:
        registry.activate(s, scope=DEFAULT_SCOPE, version=v2)
    try:
        with session_scope(db_url) as s:
            assert not registry.promote(s, tenant=other, version=v1, expected=v0)
            assert registry.active_version(s, tenant=other) == v2
    finally:
        with session_scope(db_url) as s:
            registry.activate(s, scope=DEFAULT_SCOPE, version=v0)


@pytest.mark.parametrize("has_row", [False, True], ids=["follows-default", "own-choice"])
def test_concurrent_promotions_from_the_same_version_one_wins(db_url: str, has_row: bool):
    """Forced interleaving: A promotes and holds its transaction open; B promotes against the same expected
    version while A's write is uncommitted; A commits. B must report False and change nothing."""
    tenant = f"c-{uuid.uuid4().hex[:6]}"
    va, vb = _versions(db_url, owner=tenant, n=2)
    with session_scope(db_url) as s:
        v0 = registry.default_version(s)
        if has_row:
            registry.activate(s, scope=tenant, version=v0)
    maker = get_sessionmaker(db_url)
    a = maker()
    b_started, out = threading.Event(), {}

    def b() -> None:
        with maker() as s, s.begin():
            b_started.set()
            out["b"] = registry.promote(s, tenant=tenant, version=vb, expected=v0)

    try:
        with a.begin():
            assert registry.promote(a, tenant=tenant, version=va, expected=v0)
            t = threading.Thread(target=b)
            t.start()
            assert b_started.wait(10)
            t.join(0.5)  # B blocks on A's uncommitted row (PostgreSQL) or on the write lock (SQLite)
        t.join(30)
    finally:
        a.close()
    assert not t.is_alive() and out["b"] is False
    with session_scope(db_url) as s:
        assert registry.active_version(s, tenant=tenant) == va


def test_concurrent_activations_never_deadlock(db_url: str):
    tenant = f"d-{uuid.uuid4().hex[:6]}"
    versions = _versions(db_url, owner=tenant, n=4)
    barrier, errors = threading.Barrier(4), []

    def activate(v: str) -> None:
        try:
            barrier.wait(10)
            for _ in range(5):
                with session_scope(db_url) as s:
                    registry.activate(s, scope=tenant, version=v)
        except Exception as exc:  # a deadlock or serialization error would land here
            errors.append(exc)

    threads = [threading.Thread(target=activate, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with session_scope(db_url) as s:
        assert registry.active_version(s, tenant=tenant) in versions


def test_roles_and_tenancy_of_the_models_api(db_url: str, redis_url: str):
    alice_own = _versions(db_url, owner="alice", n=1)[0]
    shared = _versions(db_url, n=1)[0]
    keys = ",".join(
        [
            "alice:key-alice-0123456789abcdef0123456789",
            "bob:key-bob-0123456789abcdef01234567890",
            "ops:key-ops-0123456789abcdef0123456789012:admin",
        ]
    )
    with make_client(db_url, "test-registry", api_keys=keys) as c:
        alice = {"Authorization": "Bearer key-alice-0123456789abcdef0123456789"}
        bob = {"Authorization": "Bearer key-bob-0123456789abcdef01234567890"}
        ops = {"Authorization": "Bearer key-ops-0123456789abcdef0123456789012"}
        default = c.get("/v1/models", headers=bob).json()["default"]
        listed = {m["version"]: m for m in c.get("/v1/models", headers=alice).json()["models"]}
        assert listed[alice_own]["owner"] == "own" and listed[shared]["owner"] == "shared"
        assert alice_own not in {m["version"] for m in c.get("/v1/models", headers=bob).json()["models"]}
        # Bob can neither activate nor score with alice's version: it does not exist for him.
        assert c.post(f"/v1/models/{alice_own}/activate", headers=bob).status_code == 404
        resp = c.post(
            "/v1/jobs", headers=bob, json={"items": [{"prompt": "p", "response": "r"}], "model_version": alice_own}
        )
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "model_version"
        # Alice's activation changes alice's jobs only.
        assert c.post(f"/v1/models/{alice_own}/activate", headers=alice).json()["active"] == alice_own
        assert c.get("/v1/models", headers=bob).json()["active"] == default
        # Only admin keys set the default or import shared models.
        assert c.post(f"/v1/models/{shared}/activate", headers=alice, params={"default": "true"}).status_code == 403
        resp = c.post("/v1/models/import", headers=bob, json={"path": "/tmp", "kind": "classifier"})
        assert resp.status_code == 403
        resp = c.post(f"/v1/models/{alice_own}/activate", headers=ops, params={"default": "true"})
        assert resp.status_code == 404  # the operator does not see a tenant's own version either
        try:
            out = c.post(f"/v1/models/{shared}/activate", headers=ops, params={"default": "true"}).json()
            assert out["default"] == shared
            assert c.get("/v1/models", headers=bob).json()["active"] == shared  # bob follows the default
            assert c.get("/v1/models", headers=alice).json()["active"] == alice_own  # alice chose her own
            assert c.delete("/v1/models/active", headers=alice).json()["active"] == shared
        finally:
            c.post(f"/v1/models/{default}/activate", headers=ops, params={"default": "true"})
        # A negative gate margin (promote a worse model) is the operator's call only.
        c.post("/v1/feedback", headers=alice, json=[{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
        resp = c.post("/v1/training-runs", headers=alice, json={"gate_margin": -0.5})
        assert resp.status_code == 403 and resp.json()["errors"][0]["field"] == "gate_margin"
        resp = c.post("/v1/schedules", headers=alice, json={"cron": "0 3 * * *", "params": {"gate_margin": -0.1}})
        assert resp.status_code == 403


def test_a_version_is_named_by_its_id_or_its_name_unique_per_owner(db_url: str, redis_url: str):
    """Issue #38, item 3: vLLM sends the served model's name; rewardq took only version ids (422 unknown model
    version 'my-rm'). A name now stands for its version within its owner: the tenant's own first, then a shared
    one; another tenant's name is as unknown as its id, and a second version of an owner cannot take a name."""
    tag = uuid.uuid4().hex[:8]
    shared, own, other = f"s-{tag}", f"o-{tag}", f"x-{tag}"
    name = f"my-rm-{tag}"
    with session_scope(db_url) as s:
        registry.register(s, version=shared, kind="sim_exp", base_model="t", path=None, config={}, name=name)
        registry.register(s, version=other, kind="sim_exp", base_model="t", path=None, config={}, name=name,
                          owner="bob")  # fmt: skip
    with session_scope(db_url) as s:
        assert registry.resolve(s, ref=name, tenant="alice").version == shared
        assert registry.resolve(s, ref=name, tenant="bob").version == other  # bob's own comes first
        assert registry.resolve(s, ref=shared, tenant="alice").version == shared  # the id still works
        assert registry.resolve(s, ref=other, tenant="alice") is None  # bob's, by id: unknown to alice
        registry.register(s, version=own, kind="sim_exp", base_model="t", path=None, config={}, name=name,
                          owner="alice")  # fmt: skip
    with session_scope(db_url) as s:
        assert registry.resolve(s, ref=name, tenant="alice").version == own
    with pytest.raises(IntegrityError), session_scope(db_url) as s:  # a second shared version of that name
        registry.register(s, version=f"t-{tag}", kind="sim_exp", base_model="t", path=None, config={}, name=name)

    keys = "alice:key-alice-0123456789abcdef0123456789,carol:key-carol-0123456789abcdef012345678"
    with make_client(db_url, "test-registry-names", api_keys=keys) as c:
        carol = {"Authorization": "Bearer key-carol-0123456789abcdef012345678"}
        item = {"items": [{"prompt": "p", "response": "r"}], "model_version": name}
        resp = c.post("/v1/jobs", headers=carol, json=item)
        assert resp.status_code == 202 and resp.json()["model_version"] == shared, resp.text  # pinned to the id
        alice = {"Authorization": "Bearer key-alice-0123456789abcdef0123456789"}
        assert c.post("/v1/jobs", headers=alice, json=item).json()["model_version"] == own
        assert c.post(f"/v1/models/{name}/activate", headers=carol).json()["active"] == shared
        bad = c.post("/v1/jobs", headers=carol, json={**item, "model_version": f"nope-{tag}"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "model_version"


def test_names_given_twice_before_they_had_to_be_unique_are_kept_apart_by_the_migration(tmp_path):
    """Migration 0018 on a database whose two shared versions share a name: the older keeps it, the newer gets its
    id's start appended, and the unique index then holds."""
    from sqlalchemy import create_engine, text

    from rewardq.storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'names.db'}"
    upgrade(url, revision="0017")
    engine = create_engine(url)
    with engine.begin() as conn:
        for version, when in (("aaaa1111", "2026-01-01"), ("bbbb2222", "2026-02-01"), ("cccc3333", "2026-03-01")):
            conn.execute(
                text(
                    "INSERT INTO model_versions (version, kind, name, owner, base_model, n_heads, config, metrics,"
                    " created_at) VALUES (:v, 'sim_exp', 'rm', NULL, 't', 1, '{}', '{}', :t)"
                ),
                {"v": version, "t": when},
            )
    upgrade(url)
    with engine.begin() as conn:
        names = dict(conn.execute(text("SELECT version, name FROM model_versions")).tuples().all())
    assert names == {"aaaa1111": "rm", "bbbb2222": "rm-bbbb2222", "cccc3333": "rm-cccc3333"}
    engine.dispose()
