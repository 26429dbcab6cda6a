"""/v1/models: the versions a tenant may use (shared ones and its own), its active version, and, for admin
keys, importing shared models and setting the operator's default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardq.api.deps import AdminDep, CallerDep, SessionDep, SettingsDep, TenantDep, read_body
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.schemas import EnsembleCreate, ErrorOut, ModelImport, ModelList, ModelVersionOut
from rewardq.storage import lifecycle, registry
from rewardq.storage.models import DEFAULT_SCOPE, EnsembleMember, ModelVersion
from rewardq.workers.importer import ImportRefused, import_folder
from rewardq.workers.models import ENSEMBLE

router = APIRouter(prefix="/v1/models", tags=["models"])

_SETTINGS = (
    "max_length", "truncation_side", "reduction", "dtype", "input", "pooling", "format", "normalize", "members"
)  # fmt: skip


def _model_out(mv: ModelVersion, active: str | None, default: str | None) -> ModelVersionOut:
    return ModelVersionOut(
        version=mv.version,
        kind=mv.kind,
        name=mv.name,
        base_model=mv.base_model.replace("\\", "/").rsplit("/", 1)[-1],  # rows made before paths were kept out
        owner="shared" if mv.owner is None else "own",
        active=mv.version == active,
        default=mv.version == default,
        n_heads=mv.n_heads,
        settings={k: mv.config[k] for k in _SETTINGS if k in mv.config},
        metrics=mv.metrics,
        score_stats=mv.score_stats,
        run_id=mv.run_id,
        created_at=mv.created_at,
    )


def model_list(session: Session, tenant: str) -> ModelList:
    active, default = registry.active_version(session, tenant=tenant), registry.default_version(session)
    versions = registry.list_versions(session, tenant=tenant)
    return ModelList(active=active, default=default, models=[_model_out(mv, active, default) for mv in versions])


def _visible(session: Session, version: str, tenant: str) -> ModelVersion:
    """The version ``version`` names (its id or its name), if the tenant may see it."""
    mv = registry.resolve(session, ref=version, tenant=tenant)
    if mv is None:
        raise ApiError(404, f"model version {version!r} not found", [FieldError("version", "not found")])
    return mv


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, tenant: TenantDep) -> ModelList:
    """The shared versions and your own, with held-out metrics; `active` is the one your new jobs are pinned to."""
    return model_list(session, tenant)


@router.post("/{version}/activate", response_model=ModelList, responses={403: {"model": ErrorOut}})
def activate(
    version: str,
    session: SessionDep,
    caller: CallerDep,
    default: Annotated[bool, Query(description="admin keys: make it the default of every tenant instead")] = False,
) -> ModelList:
    """Make a version the one your new jobs use (promote, or roll back). Jobs already submitted keep theirs."""
    if default and not caller.admin:
        raise ApiError(403, "setting the default version needs an admin key")
    mv = _visible(session, version, caller.tenant)
    if default and mv.owner is not None:
        raise invalid([FieldError("version", "a tenant's own version cannot be every tenant's default")])
    registry.activate(session, scope=DEFAULT_SCOPE if default else caller.tenant, version=mv.version)
    session.commit()
    return model_list(session, caller.tenant)


@router.delete("/active", response_model=ModelList)
def follow_default(session: SessionDep, tenant: TenantDep) -> ModelList:
    """Drop your own choice: your new jobs use the operator's default version again."""
    registry.follow_default(session, tenant=tenant)
    session.commit()
    return model_list(session, tenant)


@router.post("/import", response_model=ModelVersionOut, responses={c: {"model": ErrorOut} for c in (403, 409, 422)})
async def import_model(
    body: ModelImport, response: Response, session: SessionDep, settings: SettingsDep, caller: AdminDep
) -> ModelVersionOut:
    """Register a local Hugging Face folder (on the API's machine) as a shared version of a kind: it is checked
    (safetensors only, no remote code, one score for a classifier; for sim_exp a sentence-transformers folder's
    pooling) and copied into REWARDQ_ARTIFACTS_DIR; the version id is a hash of its content. Importing the same
    folder again returns the same version (200)."""
    options = body.model_dump(
        include={"max_length", "truncation_side", "reduction", "dtype", "normalize"}, exclude_none=True
    )
    try:
        done = await run_in_threadpool(import_folder, Path(body.path), body.kind, settings.artifacts_dir, options)
    except ImportRefused as exc:
        raise invalid([FieldError("path", str(exc))]) from exc

    name = body.name or Path(body.path).name

    def register() -> tuple[ModelVersion, bool]:
        existed = registry.get_version(session, version=done.version) is not None
        taken = registry.resolve(session, ref=name, tenant=None)
        if not existed and taken is not None and taken.name == name:
            raise ApiError(
                409,
                f"a shared version is already named {name!r} ({taken.version}): a name stands for one version, "
                "give this one another (--name)",
                [FieldError("name", "taken")],
            )
        mv = registry.register(
            session,
            version=done.version,
            kind=body.kind,
            name=name,
            base_model=done.base_model,
            path=done.directory.name,
            config=done.config,
        )
        session.commit()
        return mv, existed

    mv, existed = await run_in_threadpool(register)
    response.status_code = 200 if existed else 201
    return _model_out(mv, registry.active_version(session, tenant=caller.tenant), registry.default_version(session))


def _name_taken(session: Session, tenant: str, name: str, version: str) -> None:
    taken = registry.resolve(session, ref=name, tenant=tenant)
    if taken is not None and taken.owner == tenant and taken.name == name and taken.version != version:
        raise ApiError(
            409,
            f"your version {taken.version} is already named {name!r}: a name stands for one version, give this "
            "one another",
            [FieldError("name", "taken")],
        )


_ENSEMBLE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EnsembleCreate"}}},
    }
}
_ENSEMBLE_MAX_BYTES = 64 << 10  # 8 members of 256-character names: a few KiB; read no more than this


async def _ensemble_body(request: Request) -> EnsembleCreate:
    """The body, read up to _ENSEMBLE_MAX_BYTES (413 past it) before it is parsed."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "use application/json", [FieldError("content-type", "unsupported")])
    raw = await read_body(request, _ENSEMBLE_MAX_BYTES)
    try:
        return EnsembleCreate.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise invalid([FieldError(where, str(first["msg"]))]) from exc


@router.post(
    "/ensemble",
    response_model=ModelVersionOut,
    openapi_extra=_ENSEMBLE_BODY,
    responses={c: {"model": ErrorOut} for c in (409, 413, 415, 422)},
)
async def create_ensemble(
    request: Request, response: Response, session: SessionDep, tenant: TenantDep
) -> ModelVersionOut:
    """A weighted sum of versions (yours or shared), R = sum of weight x R_member, as a version of your own: name it
    (by its id or name) wherever a version is named, in a job, /v1/score or a protocol route. Each result keeps its
    member scores (`components`). The same members and weights are the same ensemble (200); a new one is 201."""
    body = await _ensemble_body(request)
    return await run_in_threadpool(_create_ensemble, body, response, session, tenant)


def inline_ensemble(session: Session, tenant: str, weights: dict[str, Any]) -> str:
    """The id of the ensemble ``{version: weight, ...}`` names in a job or a /v1/score body (made on first use)."""
    try:
        body = EnsembleCreate.model_validate({"members": [{"version": v, "weight": w} for v, w in weights.items()]})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise invalid([FieldError("model_version", f"{first['msg']} ({'.'.join(map(str, first['loc']))})")]) from exc
    return _create_ensemble(body, Response(), session, tenant).version


def _create_ensemble(body: EnsembleCreate, response: Response, session: Session, tenant: str) -> ModelVersionOut:
    members: list[dict[str, float | str]] = []
    kinds: list[str] = []
    for i, m in enumerate(body.members):
        mv = registry.resolve(session, ref=m.version, tenant=tenant)
        if mv is None:
            raise invalid([FieldError("members", f"unknown model version {m.version!r} (an id or a name)", i)])
        if mv.kind == ENSEMBLE:
            raise invalid([FieldError("members", f"{m.version!r} is an ensemble: name its members instead", i)])
        if any(x["version"] == mv.version for x in members):
            raise invalid([FieldError("members", f"{m.version!r} ({mv.version}) is named twice", i)])
        if m.weight == 0:
            raise invalid([FieldError("members", f"{m.version!r} has weight 0: leave it out", i)])
        members.append({"version": mv.version, "weight": m.weight})
        kinds.append(mv.kind)
    # The owner's and the members' (in any order): the same ensemble of the same tenant is one version, never another
    # tenant's.
    key = json.dumps(sorted((str(m["version"]), float(m["weight"])) for m in members))
    version = "ens-" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:20]
    existing = registry.get_version(session, version=version, tenant=tenant)
    if existing is None:
        if body.name:
            _name_taken(session, tenant, body.name, version)
        try:
            registry.register(
                session,
                version=version,
                kind=ENSEMBLE,
                name=body.name,
                base_model=ENSEMBLE,
                path=None,
                config={"members": members, "member_kinds": kinds},
                owner=tenant,
            )
            session.add_all([EnsembleMember(ensemble=version, member=str(m["version"])) for m in members])
            session.commit()
        except (IntegrityError, ValueError) as exc:  # the same request at once, a name or a member gone meanwhile
            session.rollback()
            existing = registry.get_version(session, version=version, tenant=tenant)
            if existing is None:
                message = "the ensemble could not be made: its name was taken or a member removed meanwhile; try again"
                raise ApiError(409, message, [FieldError("members", "changed meanwhile")]) from exc
    if existing is not None:
        if body.name and existing.name != body.name:
            raise ApiError(
                409,
                f"this ensemble exists already as {existing.version}"
                + (f", named {existing.name!r}" if existing.name else ", without a name"),
                [FieldError("name", "differs")],
            )
        response.status_code = 200
    else:
        response.status_code = 201
    mv = registry.get_version(session, version=version, tenant=tenant)
    assert mv is not None
    return _model_out(mv, registry.active_version(session, tenant=tenant), registry.default_version(session))


@router.delete("/{version}", response_model=ModelList, responses={c: {"model": ErrorOut} for c in (404, 409)})
def delete_ensemble(version: str, session: SessionDep, tenant: TenantDep) -> ModelList:
    """Delete one of your ensembles (by its id or name), unless something uses it: your active version, or a job that
    was scored with it (it keeps its version: delete the job first). Other versions are collected by retention."""
    mv = _visible(session, version, tenant)
    if mv.kind != ENSEMBLE or mv.owner != tenant:
        raise ApiError(409, f"{version!r} is not one of your ensembles: only those are deleted here")
    if not lifecycle.delete_version(session, version=mv.version):
        session.rollback()
        raise ApiError(
            409,
            f"{mv.version} is in use: it is an active version, or a job was scored with it (delete the job first)",
            [FieldError("version", "in use")],
        )
    session.commit()
    return model_list(session, tenant)
