"""/v1/training-runs and /v1/schedules: fine-tuning and retraining schedules (the registry: routes/models.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, get_args

from fastapi import APIRouter, Query, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardq.api.deps import CallerDep, SessionDep, SettingsDep, TenantDep, full_id
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.api.schemas import (
    ScheduleIn,
    ScheduleList,
    ScheduleOut,
    TrainingDefaults,
    TrainingParams,
    TrainingRunList,
    TrainingRunOut,
)
from rewardq.storage import cron, registry
from rewardq.storage import training_repository as trepo
from rewardq.storage.clock import utcnow
from rewardq.storage.models import RunStatus, Schedule, TrainingRun
from rewardq.workers import liveness
from rewardq.workers.messages import enqueue_training_run
from rewardq.workers.models import ENSEMBLE, TRAINABLE, ensemble_active
from rewardq.workers.train_params import objective_refused, params_for, planned_steps, resolved, window_rows

runs = APIRouter(prefix="/v1/training-runs", tags=["training"])
schedules = APIRouter(prefix="/v1/schedules", tags=["schedules"])


def run_out(run: TrainingRun) -> TrainingRunOut:
    return TrainingRunOut(
        run_id=run.id, status=run.status, params=run.params, progress=run.progress, loss_curve=run.loss_curve,
        metrics=run.metrics, base_version=run.base_version, start_version=run.start_version,
        result_version=run.result_version,
        n_feedback=run.n_feedback, schedule_id=run.schedule_id, error=run.error, created_at=run.created_at,
        started_at=run.started_at, finished_at=run.finished_at,
    )  # fmt: skip


def _start(session: Session, params: TrainingParams, tenant: str) -> dict[str, object]:
    """The run's start version, resolved to its id (a name may later name another version), and its kind when the
    request names no kind; a version the tenant cannot see, or of a kind no run trains, is refused."""
    if params.start_version is None:
        return {}
    mv = registry.resolve(session, ref=params.start_version, tenant=tenant)
    if mv is None:
        raise invalid([FieldError("start_version", f"unknown model version {params.start_version!r}")])
    if mv.kind not in TRAINABLE:
        raise invalid(
            [
                FieldError(
                    "start_version",
                    f"{mv.version} is a {mv.kind} model, which runs cannot train: rewardq fine-tunes sim_exp and "
                    "classifier versions (a likelihood model scores with a language model's log-probabilities; "
                    "fine-tune it with your own trainer and import the result)",
                )
            ]
        )
    if "kind" in params.model_fields_set and params.kind != mv.kind:
        message = f"{mv.version} is a {mv.kind} version: a {params.kind} run cannot start from it (leave kind out)"
        raise invalid([FieldError("kind", message)])
    return {"start_version": mv.version, "kind": mv.kind}


def _params(params: TrainingParams, admin: bool, session: Session, tenant: str) -> dict[str, object]:
    """Every parameter the run will use (the kind's defaults filled in)."""
    active = registry.active_version(session, tenant=tenant)
    incumbent = registry.get_version(session, version=active) if active else None
    if incumbent is not None and incumbent.kind == ENSEMBLE:
        raise ApiError(409, ensemble_active(incumbent.version), [FieldError("active_version", "an ensemble")])
    if params.gate_margin is not None and params.gate_margin < 0 and not admin:
        # A negative margin promotes a worse model: only the operator may waive the gate.
        raise ApiError(403, "gate_margin below 0 needs an admin key", [FieldError("gate_margin", "admin only")])
    if params.heldout_fraction + params.validation_fraction >= 0.9:
        message = "heldout_fraction + validation_fraction must leave at least 10 % of the feedback to train on"
        raise invalid([FieldError("validation_fraction", message)])
    chosen = resolved({**params.model_dump(exclude_none=True), **_start(session, params, tenant)})
    refused = objective_refused(str(chosen["kind"]), str(chosen["objective"]))
    if refused:
        raise invalid([FieldError("objective", refused)])
    return chosen


@runs.post("", status_code=202, response_model=TrainingRunOut)
def start_run(session: SessionDep, settings: SettingsDep, caller: CallerDep, params: TrainingParams | None = None
              ) -> TrainingRunOut:  # fmt: skip
    """Start a fine-tuning run now on all of the tenant's feedback (parameters optional). A tenant has one queued or
    running run at a time (409), and a run may plan at most REWARDQ_MAX_TRAIN_STEPS steps (422)."""
    tenant = caller.tenant
    stats = trepo.feedback_stats(session, tenant=tenant)
    if stats["total"] < 3:
        raise invalid([FieldError("feedback", f"need at least 3 feedback rows to train, have {stats['total']}")])
    chosen = _params(params or TrainingParams(), caller.admin, session, tenant)
    _check_steps(chosen, stats["total"], settings.max_train_steps, settings.train_window)
    busy = trepo.open_run_of_tenant(session, tenant=tenant)
    if busy is None:
        try:
            run = trepo.create_run(session, tenant=tenant, params=chosen)
            session.commit()
        except IntegrityError:  # another request's run won the race (the unique index of open runs)
            session.rollback()
            busy = trepo.open_run_of_tenant(session, tenant=tenant) or "another"
    if busy is not None:
        raise ApiError(
            409,
            f"training run {busy} is still queued or running: a tenant runs one at a time",
            [FieldError("run_id", busy)],
        )
    try:
        enqueue_training_run(run.id, queue=settings.training_queue)
    except Exception as exc:
        session.delete(run)
        session.commit()
        raise ApiError(503, "could not enqueue the training run (is Redis up?)", headers={"Retry-After": "5"}) from exc
    return run_out(run)


def _check_steps(chosen: dict[str, object], n_feedback: int, limit: int, default_window: int) -> None:
    params = params_for(chosen)
    n_feedback = window_rows(params, n_feedback, default_window)
    steps = planned_steps(params, int(n_feedback * (1 - params.heldout_fraction - params.validation_fraction)))
    if steps > limit:
        raise invalid(
            [
                FieldError(
                    "epochs",
                    f"this run would take about {steps} steps ({params.epochs} epochs of "
                    f"batches of {params.batch_size} over {n_feedback} feedback rows), more "
                    f"than the {limit} allowed (REWARDQ_MAX_TRAIN_STEPS): use fewer epochs "
                    "or a larger batch_size, or a smaller window (REWARDQ_TRAIN_WINDOW)",
                )
            ]
        )


@runs.get("", response_model=TrainingRunList)
def list_runs(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
              ) -> TrainingRunList:  # fmt: skip
    return TrainingRunList(runs=[run_out(r) for r in trepo.list_runs(session, tenant=tenant, limit=limit)])


@runs.get("/defaults", response_model=TrainingDefaults)
def training_defaults(tenant: TenantDep) -> TrainingDefaults:
    """Every parameter a run of each trainable kind uses when the request leaves it out (the dashboard's
    placeholders come from here)."""
    kinds = get_args(TrainingParams.model_fields["kind"].annotation)  # those a run accepts
    return TrainingDefaults(kinds={kind: asdict(params_for({"kind": kind})) for kind in kinds})


@runs.get("/{run_id}", response_model=TrainingRunOut)
def get_run(run_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> TrainingRunOut:
    """One run: its status, progress, loss curve, metrics (the gate's decision) and resulting version."""
    run = trepo.get_run(session, run_id=run_id, tenant=tenant)
    if run is None:
        run = trepo.get_run(
            session, run_id=full_id(session, TrainingRun, run_id, tenant=tenant, noun="run"), tenant=tenant
        )
    if run is None:
        raise ApiError(404, f"training run {run_id!r} not found", [FieldError("run_id", "not found")])
    out = run_out(run)
    if run.status in (RunStatus.queued.value, RunStatus.running.value):
        out.notice = liveness.no_worker_notice(
            settings.redis_url, settings.training_queue, settings.heartbeat_ttl_s, f"training run {run.id}"
        )
    return out


def _schedule_out(s: Schedule) -> ScheduleOut:
    return ScheduleOut(schedule_id=s.id, cron=s.cron, min_new_feedback=s.min_new_feedback, params=s.params,
                       next_run_at=s.next_run_at, last_fired_at=s.last_fired_at, created_at=s.created_at)  # fmt: skip


@schedules.get("", response_model=ScheduleList)
def list_schedules(session: SessionDep, tenant: TenantDep) -> ScheduleList:
    return ScheduleList(schedules=[_schedule_out(s) for s in trepo.list_schedules(session, tenant=tenant)])


@schedules.post("", status_code=201, response_model=ScheduleOut)
def add_schedule(body: ScheduleIn, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> ScheduleOut:
    """A cron schedule for retraining; `rewardq beat` picks it up without a restart."""
    if not cron.is_valid(body.cron):
        raise invalid([FieldError("cron", f"{body.cron!r} is not a valid 5- or 6-field cron expression")])
    gap = cron.shortest_gap(body.cron, utcnow())
    if gap < settings.min_schedule_interval_s:
        raise invalid(
            [
                FieldError(
                    "cron",
                    f"{body.cron!r} fires {gap:.0f} s apart; schedules fire at most every "
                    f"{settings.min_schedule_interval_s} s (REWARDQ_MIN_SCHEDULE_INTERVAL_S)",
                )
            ]
        )
    if trepo.count_schedules(session, tenant=caller.tenant) >= settings.max_schedules_per_tenant:
        raise ApiError(
            403,
            f"schedule quota of {settings.max_schedules_per_tenant} reached "
            "(REWARDQ_MAX_SCHEDULES_PER_TENANT): delete one first",
        )
    params = _params(body.params, caller.admin, session, caller.tenant)
    sched = trepo.create_schedule(session, tenant=caller.tenant, cron=body.cron,
                                  min_new_feedback=body.min_new_feedback, params=params,
                                  next_run_at=cron.next_fire(body.cron, utcnow()))  # fmt: skip
    session.commit()
    return _schedule_out(sched)


@schedules.delete("/{schedule_id}", status_code=204)
def delete_schedule(schedule_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Delete a schedule, named by its id or the first 8 or more characters of it."""
    schedule_id = full_id(session, Schedule, schedule_id, tenant=tenant, noun="schedule")
    if not trepo.delete_schedule(session, tenant=tenant, schedule_id=schedule_id):
        raise ApiError(404, f"schedule {schedule_id!r} not found", [FieldError("schedule_id", "not found")])
    session.commit()
    return Response(status_code=204)


__all__ = ["runs", "schedules"]
