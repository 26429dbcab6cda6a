"""One training run from start to finish: feedback from SQL, fit, save a version, evaluate it next to the
active one on held-out feedback, and let the gate promote it or not."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from storage import repository as repo
from storage import training_repository as trepo
from storage.db import session_scope
from storage.models import RunStatus
from storage.settings import get_settings
from workers import engine
from workers.registry import resolve_encoder
from workers.trainer import Feedback, Preference, Rating, TrainParams, evaluate, fit

log = logging.getLogger(__name__)

PRIMARY_METRIC = "pairwise_accuracy"


class RunError(Exception):
    """A run that cannot proceed for a reason the user can act on (recorded on the run)."""


def train_params(raw: dict[str, Any]) -> TrainParams:
    known = {k: v for k, v in raw.items() if k in TrainParams.__dataclass_fields__}
    return TrainParams(**known)


def _load_feedback(tenant: str, max_id: int) -> Feedback:
    data = Feedback()
    with session_scope() as s:
        for row in trepo.iter_feedback(s, tenant=tenant, max_id=max_id):
            if row.kind == "preference":
                data.preferences.append(Preference(row.prompt, row.chosen or "", row.rejected or ""))
            else:
                data.ratings.append(Rating(row.prompt, row.response or "", float(row.rating or 0.0)))
    return data


def gate(candidate: dict[str, Any], active: dict[str, Any], margin: float) -> bool:
    c, a = candidate.get(PRIMARY_METRIC), active.get(PRIMARY_METRIC)
    return c is not None and (a is None or c >= a + margin)


def execute_run(run_id: str) -> str:
    """Run ``run_id`` to its end state; returns that status. Redelivered runs that already ended do nothing."""
    settings = get_settings()
    with session_scope() as s:
        run = trepo.get_run(s, run_id=run_id)
        if run is None or run.status in trepo.FINISHED_RUNS:
            return run.status if run else "missing"
        active = repo.active_model_version(s)
        if active is None:
            raise RunError("no active model version")
        stats = trepo.feedback_stats(s, tenant=run.tenant)
        tenant, raw_params, active_version = run.tenant, dict(run.params), active.version
        trepo.start_run(s, run_id=run_id, base_version=active_version, n_feedback=stats["total"],
                        max_feedback_id=stats["max_id"])  # fmt: skip
    try:
        return _train_and_gate(run_id, tenant, raw_params, active_version, stats["max_id"], settings.gate_margin)
    except Exception as exc:
        log.exception("training run %s failed", run_id)
        with session_scope() as s:
            trepo.finish_run(s, run_id=run_id, status=RunStatus.failed, error=f"{type(exc).__name__}: {exc}"[:2000])
        return RunStatus.failed.value


def _train_and_gate(run_id: str, tenant: str, raw_params: dict[str, Any], active_version: str, max_id: int,
                    default_margin: float) -> str:  # fmt: skip
    from workers.artifacts import save_version
    from workers.model import RewardModel

    settings = get_settings()
    params = train_params(raw_params)
    margin = float(raw_params.get("gate_margin", default_margin))
    data = _load_feedback(tenant, max_id)
    train, held = data.split(params.heldout_fraction, params.seed)
    if len(train) < 2:
        raise RunError(f"need at least 2 feedback rows to train on, have {len(train)}")
    if not held.preferences and len(held.ratings) < 2:
        raise RunError("the held-out split is too small to evaluate: add feedback or raise heldout_fraction")

    encoder_path, base_name = resolve_encoder(settings.model)
    model = RewardModel("candidate", encoder_path, max_length=settings.max_length,
                        encode_batch_size=settings.encode_batch_size)  # fmt: skip
    last_write = [0.0]
    last: dict[str, Any] = {}

    def progress(p: dict[str, Any]) -> None:
        curve_so_far = p.pop("curve")
        last.clear()
        last.update(p)
        # Throttled: a progress row per second at most, whatever the step rate.
        if time.monotonic() - last_write[0] < 1.0 and p["step"] < p["total_steps"]:
            return
        last_write[0] = time.monotonic()
        with session_scope() as s:
            trepo.set_run_progress(s, run_id=run_id, progress=p, loss_curve=curve_so_far)

    t0 = time.perf_counter()
    curve = fit(model, train, params, progress=progress)
    train_s = time.perf_counter() - t0
    candidate = evaluate(model, held)
    incumbent = evaluate(engine.get_model(active_version), held)
    promoted = gate(candidate, incumbent, margin)
    version, path, config = save_version(model, settings.artifacts_dir, base_model=base_name,
                                         base_encoder=settings.model or None, train_layers=params.train_layers,
                                         params={**asdict(params), "gate_margin": margin})  # fmt: skip
    metrics = {
        "candidate": candidate,
        "active": {**incumbent, "version": active_version},
        "gate": {"metric": PRIMARY_METRIC, "margin": margin, "decision": "promoted" if promoted else "rejected"},
        "train_seconds": round(train_s, 2),
        "n_train": len(train),
        "n_heldout": len(held),
    }
    with session_scope() as s:
        trepo.register_version(s, version=version, base_model=base_name, path=str(path.resolve()),
                               n_heads=params.n_heads, config=config, metrics=candidate, run_id=run_id)  # fmt: skip
        if promoted:
            trepo.activate_version(s, version=version)
        trepo.set_run_progress(s, run_id=run_id, loss_curve=curve, progress={**last, "done": True})
        trepo.finish_run(s, run_id=run_id, status=RunStatus.succeeded if promoted else RunStatus.rejected,
                         metrics=metrics, result_version=version)  # fmt: skip
    log.info("run %s: %s %s (%s %.4f vs %.4f)", run_id, "promoted" if promoted else "rejected", version,
             PRIMARY_METRIC, candidate[PRIMARY_METRIC] or 0, incumbent[PRIMARY_METRIC] or 0)  # fmt: skip
    return RunStatus.succeeded.value if promoted else RunStatus.rejected.value
