"""The model registry: versions (shared, or owned by the tenant whose run made them) and the active version of
each tenant, which falls back to the operator's default. Every change of an active version is one
single-row upsert or compare-and-set on ``active_versions``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, exists, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from rewardq.storage.clock import utcnow
from rewardq.storage.models import DEFAULT_SCOPE, ActiveVersion, ModelVersion


def _visible(tenant: str | None) -> Any:
    return True if tenant is None else or_(ModelVersion.owner.is_(None), ModelVersion.owner == tenant)


def get_version(session: Session, *, version: str, tenant: str | None = None) -> ModelVersion | None:
    """The version, or None when it does not exist or belongs to another tenant (``tenant`` None: any)."""
    if "\x00" in version:  # no id or name holds NUL (and PostgreSQL's text cannot even be compared with one)
        return None
    return session.scalar(select(ModelVersion).where(ModelVersion.version == version, _visible(tenant)))


def resolve(session: Session, *, ref: str, tenant: str | None) -> ModelVersion | None:
    """The version ``ref`` names, by id or by name: the tenant's own version of that name first, then a shared one
    (names are unique within an owner). None when neither exists or the version is another tenant's."""
    mv = get_version(session, version=ref, tenant=tenant)
    if mv is not None or "\x00" in ref:
        return mv
    owners = (
        [ModelVersion.owner.is_(None)]
        if tenant is None
        else [ModelVersion.owner == tenant, ModelVersion.owner.is_(None)]
    )
    for owner in owners:
        mv = session.scalar(select(ModelVersion).where(ModelVersion.name == ref, owner))
        if mv is not None:
            return mv
    return None


def list_versions(session: Session, *, tenant: str | None = None) -> list[ModelVersion]:
    q = select(ModelVersion).where(_visible(tenant))
    return list(session.scalars(q.order_by(ModelVersion.created_at, ModelVersion.version)))


def register(
    session: Session,
    *,
    version: str,
    kind: str,
    base_model: str,
    path: str | None,
    config: dict[str, Any],
    owner: str | None = None,
    name: str | None = None,
    n_heads: int = 1,
    metrics: dict[str, Any] | None = None,
    run_id: str | None = None,
    score_stats: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register a version if its id is new (ids are content hashes, of the owner's and the files': the same files of
    the same owner are the same version). An id already registered to another owner is refused: a version is
    listed, pinned and activated by its owner only, so it must never change hands."""
    mv = session.get(ModelVersion, version)
    if mv is not None and mv.owner != owner:
        raise ValueError(f"model version {version!r} is already registered to another owner")
    if mv is None:
        mv = ModelVersion(
            version=version,
            kind=kind,
            name=name,
            owner=owner,
            base_model=base_model,
            path=path,
            n_heads=n_heads,
            config=config,
            metrics=metrics or {},
            run_id=run_id,
            score_stats=score_stats,
        )
        session.add(mv)
        session.flush()
    return mv


def members(session: Session, *, version: str) -> list[dict[str, Any]] | None:
    """An ensemble's members ({version, weight}, in order), or None for any other version."""
    row = session.execute(select(ModelVersion.kind, ModelVersion.config).where(ModelVersion.version == version)).first()
    if row is None or row.kind != "ensemble":
        return None
    return [{"version": str(m["version"]), "weight": float(m["weight"])} for m in row.config.get("members") or []]


def components_of(scores: list[Any] | None, members: list[dict[str, Any]] | None) -> list[Any] | None:
    """A result's member scores as its readers see them: [{version, weight, score}] in the ensemble's order."""
    if scores is None or members is None or len(scores) != len(members):
        return None
    return [{**m, "score": float(x)} for m, x in zip(members, scores, strict=True)]


def set_score_stats(session: Session, *, version: str, stats: dict[str, Any], overwrite: bool = False) -> bool:
    """Store a version's score distribution (once, unless ``overwrite``): True if this call stored it."""
    q = update(ModelVersion).where(ModelVersion.version == version)
    if not overwrite:
        q = q.where(ModelVersion.score_stats.is_(None))
    return bool(session.execute(q.values(score_stats=stats).returning(ModelVersion.version)).all())


def score_stats(session: Session, *, version: str) -> dict[str, Any] | None:
    return session.scalar(select(ModelVersion.score_stats).where(ModelVersion.version == version))


def _upsert(session: Session, scope: str, version: str, overwrite: bool) -> None:
    dialect = session.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(ActiveVersion)
    stmt = ins.values(scope=scope, version=version, updated_at=utcnow())
    if overwrite:
        session.execute(
            stmt.on_conflict_do_update(index_elements=["scope"], set_={"version": version, "updated_at": utcnow()})
        )
    else:
        session.execute(stmt.on_conflict_do_nothing(index_elements=["scope"]))


def ensure_default(session: Session, *, version: str) -> None:
    """Make ``version`` the operator's default unless there already is one."""
    _upsert(session, DEFAULT_SCOPE, version, overwrite=False)


def default_version(session: Session) -> str | None:
    return session.scalar(select(ActiveVersion.version).where(ActiveVersion.scope == DEFAULT_SCOPE))


def tenant_choice(session: Session, *, tenant: str) -> str | None:
    """The version the tenant chose itself, or None when it follows the default."""
    return session.scalar(select(ActiveVersion.version).where(ActiveVersion.scope == tenant))


def active_version(session: Session, *, tenant: str) -> str | None:
    """The version the tenant's new jobs use: its own choice, else the operator's default."""
    return tenant_choice(session, tenant=tenant) or default_version(session)


def activate(session: Session, *, scope: str, version: str) -> None:
    """Make ``version`` the active one of ``scope`` (a tenant, or DEFAULT_SCOPE): one upsert, whatever was there."""
    _upsert(session, scope, version, overwrite=True)


def follow_default(session: Session, *, tenant: str) -> None:
    """Forget the tenant's own choice: its new jobs use the operator's default again."""
    session.execute(delete(ActiveVersion).where(ActiveVersion.scope == tenant))


def promote(session: Session, *, tenant: str, version: str, expected: str) -> bool:
    """Compare-and-set: make ``version`` the tenant's active version only if its active version is still
    ``expected`` (the one the gate compared against). False when anything changed it meanwhile."""
    # RETURNING, not rowcount: an ORM-executed INSERT ... SELECT reports rowcount -1 on psycopg.
    moved = session.execute(
        update(ActiveVersion)
        .where(ActiveVersion.scope == tenant, ActiveVersion.version == expected)
        .values(version=version, updated_at=utcnow())
        .returning(ActiveVersion.scope)
    ).all()
    if moved:
        return True
    # No choice of its own yet: it followed the default, so the default must still be ``expected``, and no
    # concurrent promotion may have created the tenant's row (the primary key refuses a second insert).
    dialect = session.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(ActiveVersion)
    own = exists().where(ActiveVersion.scope == tenant)
    default_is_expected = exists().where(ActiveVersion.scope == DEFAULT_SCOPE, ActiveVersion.version == expected)
    source = select(literal(tenant), literal(version), literal(utcnow())).where(~own, default_is_expected)
    stmt = ins.from_select(["scope", "version", "updated_at"], source).on_conflict_do_nothing(index_elements=["scope"])
    return bool(session.execute(stmt.returning(ActiveVersion.scope)).all())
