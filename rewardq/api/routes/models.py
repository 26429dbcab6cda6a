"""/v1/models: the versions a tenant may use (shared ones and its own), its active version, and, for admin
keys, importing shared models and setting the operator's default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from rewardq.api.deps import AdminDep, CallerDep, SessionDep, SettingsDep, TenantDep
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.schemas import ErrorOut, ModelImport, ModelList, ModelVersionOut
from rewardq.storage import registry
from rewardq.storage.models import DEFAULT_SCOPE, ModelVersion
from rewardq.workers.importer import ImportRefused, import_folder

router = APIRouter(prefix="/v1/models", tags=["models"])

_SETTINGS = ("max_length", "truncation_side", "reduction", "dtype", "input", "pooling", "format", "normalize")


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
