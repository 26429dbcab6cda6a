"""One training run from start to finish: feedback from SQL (duplicates merged, too little or too uniform feedback
refused), three disjoint slices (train; validation, which picks the best epoch; gate), fit, save a version,
evaluate it next to the tenant's active one on the gate slice, and let the gate promote it or not (a
compare-and-set: the promotion happens only if the version the gate compared against is still the tenant's active
one)."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from rewardq import conversations
from rewardq.storage import registry
from rewardq.storage import training_repository as trepo
from rewardq.storage.db import session_scope
from rewardq.storage.models import RunStatus
from rewardq.storage.score_stats import summarize
from rewardq.storage.settings import get_settings
from rewardq.workers import engine, liveness
from rewardq.workers.errors import public_message
from rewardq.workers.evaluation import PRIMARY_METRIC, BestEpoch, evaluate
from rewardq.workers.feedback import Feedback, Preference, Rating, clean, comparisons, refusal, warnings
from rewardq.workers.messages import run_key
from rewardq.workers.models import ENSEMBLE, ensemble_active
from rewardq.workers.registry import resolve_encoder
from rewardq.workers.train_params import TrainParams, objective_refused, params_for, planned_steps

log = logging.getLogger(__name__)

LOST = "lost"  # execute_run's answer when the run was taken over by another worker while this one held it
MAX_GATES = 3  # the active version moved while the run trained: gate again against the new one, this many times


class RunError(Exception):
    """A run that cannot proceed for a reason the user can act on (recorded on the run)."""


@dataclass(frozen=True)
class Start:
    """The version a run trains from: its id, kind, files (None: the configured encoder, REWARDQ_MODEL or the bundled
    MiniLM), registry config and display name."""

    version: str
    kind: str
    path: Path | None
    config: dict[str, Any]
    base_model: str


def _base_start(kind: str) -> Start:
    from rewardq.workers.registry import base_version_id

    encoder_path, name = resolve_encoder(get_settings().model)
    return Start(base_version_id(encoder_path), kind, None, {}, name)


def start_of(session: Any, params: TrainParams, tenant: str, active: str | None) -> Start:
    """Where a run starts: the version it names (checked again: it may have gone since the run was made), else the
    tenant's active version when it is of the run's kind, else the configured encoder (a new model of the kind). A
    tenant whose active version is an ensemble has no run (RunError): the gate would replace the ensemble."""
    from rewardq.workers.models import version_dir

    incumbent = registry.get_version(session, version=active) if active else None
    if incumbent is not None and incumbent.kind == ENSEMBLE:
        raise RunError(ensemble_active(incumbent.version))
    refused = objective_refused(params.kind, params.objective)
    if refused:
        raise RunError(refused)
    chosen = params.start_version or active
    mv = registry.get_version(session, version=chosen, tenant=tenant) if chosen else None
    if params.start_version and mv is None:
        raise RunError(f"the start version {params.start_version} is gone: name another (start_version)")
    if mv is None or mv.kind != params.kind:  # a run's kind is one that trains (the API takes no other)
        if mv is not None and params.start_version:
            raise RunError(f"the start version {mv.version} is not a {params.kind} version")
        return _base_start(params.kind)
    path = None if mv.path is None else version_dir(mv.path, get_settings().artifacts_dir)
    return Start(mv.version, mv.kind, path, dict(mv.config or {}), mv.base_model)


def _load_feedback(
    tenant: str, max_id: int, params: TrainParams, default_window: int
) -> tuple[Feedback, dict[str, int]]:
    """The run's feedback up to ``max_id`` (the watermark: everything up to it counts as consumed, trained on or
    not): the newest ``params.window`` rows (``default_window``, REWARDQ_TRAIN_WINDOW, when the run names none; 0:
    all) and ``params.window_sample`` of the older ones drawn uniformly, so a run's cost stays bounded however much
    feedback a tenant has collected. Also what the window held, for the run's report."""
    window = default_window if params.window is None else params.window
    data = Feedback()
    # A conversation's prompt: a classifier reads its messages (its chat template); sim-exp trains on the text it
    # embeds when it scores (rewardq.conversations.text).
    prompt_of = (lambda p: p) if params.kind == "classifier" else conversations.text

    def add(row: Any) -> None:
        if row.kind == "preference":
            data.preferences.append(Preference(prompt_of(row.prompt), row.chosen or "", row.rejected or ""))
        else:
            data.ratings.append(Rating(prompt_of(row.prompt), row.response or "", float(row.rating or 0.0)))

    with session_scope() as s:
        start = trepo.window_start(s, tenant=tenant, max_id=max_id, window=window)
        older = trepo.sample_before(s, tenant=tenant, before_id=start, k=params.window_sample, seed=params.seed)
        for row in older:
            add(row)
        n_window = 0
        for row in trepo.iter_feedback(s, tenant=tenant, max_id=max_id, min_id=start):
            add(row)
            n_window += 1
    return data, {"window": window, "newest": n_window, "older_sampled": len(older), "from_id": start}


def _fault_kill(marker: str, data: Feedback) -> None:
    """Testing aid (REWARDQ_FAULT_KILL_MARKER): a run whose feedback holds the marker kills its worker process, as
    an out-of-memory kill or a native crash would."""
    if marker and any(marker in r.prompt or marker in r.response for r in data.ratings):
        os.kill(os.getpid(), signal.SIGKILL)


def gate(candidate: dict[str, Any], active: dict[str, Any], margin: float) -> bool:
    c, a = candidate.get(PRIMARY_METRIC), active.get(PRIMARY_METRIC)
    return c is not None and (a is None or c >= a + margin)


def execute_run(run_id: str) -> str:
    """Run ``run_id`` to its end state; returns that status. A run is claimed once (a compare-and-set on
    ``queued``): a redelivered message for a run that ended, or that a live worker is training, does nothing. The
    worker's heartbeat is the claim's lease: if it stops, the sweeper puts the run back for another worker."""
    settings = get_settings()
    worker = liveness.ensure_heartbeat(settings.redis_url, settings.heartbeat_ttl_s)
    with session_scope() as s:
        run = trepo.get_run(s, run_id=run_id)
        if run is None or run.status != RunStatus.queued.value:
            log.info("run %s is %s: nothing to do", run_id, run.status if run else "missing")
            return run.status if run else "missing"
        active = registry.active_version(s, tenant=run.tenant)
        stats = trepo.feedback_stats(s, tenant=run.tenant)
        tenant, raw_params = run.tenant, dict(run.params)
        try:
            start: Start | RunError = start_of(s, params_for(raw_params), tenant, active)
        except RunError as exc:
            start = exc
        lease = trepo.start_run(
            s,
            run_id=run_id,
            base_version=active or "",
            start_version=start.version if isinstance(start, Start) else None,
            n_feedback=stats["total"],
            max_feedback_id=stats["max_id"],
            worker=worker,
        )
    if lease is None:
        log.info("run %s was claimed by another worker", run_id)
        return RunStatus.running.value
    liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, run_key(run_id))
    try:
        if active is None:
            raise RunError("no active model version: run 'rewardq db upgrade' or start a worker")
        if isinstance(start, RunError):
            raise start
        return _train_and_gate(run_id, tenant, raw_params, active, stats["max_id"], settings.gate_margin, lease, start)
    except trepo.LeaseLost:
        # Frozen past its heartbeat (a long GC or swap pause, a stopped process, a partition), it lost the run to
        # another worker: it writes nothing, and what it trained is discarded (its files stay unregistered).
        log.warning("training run %s was taken over by another worker while this one held it: stopping", run_id)
        return LOST
    except Exception as exc:
        error = public_message(exc, log, f"training run {run_id}", own=(RunError,))[:2000]
        log.warning("training run %s failed: %s", run_id, error)
        if isinstance(exc, SoftTimeLimitExceeded):
            error = f"the run took longer than REWARDQ_RUN_TIME_LIMIT_S ({settings.run_time_limit_s:.0f} s)"
        with session_scope() as s:
            trepo.finish_run(
                s,
                run_id=run_id,
                status=RunStatus.failed,
                error=error,
                lease=lease,
            )
        return RunStatus.failed.value
    finally:
        liveness.working_on(settings.redis_url, settings.heartbeat_ttl_s, run_key(run_id), done=True)


def _fit(
    params: TrainParams, train: Feedback, progress: Any, early: BestEpoch | None = None, start: Start | None = None
) -> tuple[Any, list[float], str]:
    """(trained model, loss curve, base model name) for the run's kind, trained from ``start`` (default: a new model
    on the configured encoder); with ``early``, at its best epoch on that validation slice."""
    from rewardq.workers.precision import resolve_autocast

    settings = get_settings()
    start = start or _base_start(params.kind)
    encoder_path, _ = resolve_encoder(settings.model)
    if params.kind == "classifier":
        from rewardq.workers.models.classifier import ClassifierModel
        from rewardq.workers.trainer import fit_classifier

        if start.path is None:  # a new score head on the encoder
            model: Any = ClassifierModel(
                "candidate",
                encoder_path,
                model=new_cross_encoder(encoder_path, params.seed),
                max_length=params.max_length,
                truncation_side="right",
                encode_batch_size=settings.encode_batch_size,
            )
        else:  # its own weights (in float32 whatever it serves in), its token limit and truncation side
            openrlhf = start.config.get("format") == "openrlhf"
            model = ClassifierModel(
                "candidate",
                str(start.path),
                max_length=int(start.config.get("max_length") or params.max_length),
                truncation_side=str(start.config.get("truncation_side") or "left"),
                encode_batch_size=settings.encode_batch_size,
                value_head={"normalize": False} if openrlhf else None,
            )
        # REWARDQ_PRECISION=fast trains in bf16 autocast on fp32 weights; the version is saved, evaluated and served
        # in float32, so its scores stay exact.
        model.train_autocast = "bf16" if resolve_autocast(settings, model.device.type) == "bf16" else "off"
        return model, fit_classifier(model, train, params, progress=progress, early_stopping=early), start.base_model
    if params.kind != "sim_exp":
        raise RunError(f"training is available for the sim_exp and classifier kinds, not {params.kind!r}")
    from rewardq.workers.models.sim_exp import SimExpModel, set_precision
    from rewardq.workers.trainer import fit

    if start.path is None:
        model = SimExpModel(
            "candidate", encoder_path, max_length=settings.max_length, encode_batch_size=settings.encode_batch_size
        )
    else:  # its encoder (a trained version's, or an imported sentence encoder with its pooling); new heads
        from rewardq.workers.artifacts import load_version

        model = load_version(
            start.path, encoder_path, max_length=settings.max_length, encode_batch_size=settings.encode_batch_size
        )
    # REWARDQ_PRECISION=fast trains in bf16 autocast too, on fp32 weights (the saved version is fp32), and the
    # candidate is evaluated in the precision the worker serves in, as the active version is.
    set_precision(model, resolve_autocast(settings, model.device.type))
    return model, fit(model, train, params, progress=progress, early_stopping=early), start.base_model


def new_cross_encoder(encoder_path: str, seed: int) -> Any:
    """A cross-encoder to train: the encoder's weights with a new one-output score head (TRL's reward model format),
    the head drawn from the run's ``seed``, whatever the process drew from torch's generator before (a worker runs
    many runs); the process's generator is left as it was."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(encoder_path, num_labels=1, use_safetensors=True)


def _save(
    model: Any, params: TrainParams, base_name: str, margin: float, owner: str, start: Start | None = None
) -> tuple[str, Path, dict[str, Any]]:
    from rewardq.workers.artifacts import save_classifier, save_version

    settings = get_settings()
    stored = {**asdict(params), "gate_margin": margin}
    if start is not None:
        stored["start_version"] = start.version
    if params.kind == "classifier":
        return save_classifier(model, settings.artifacts_dir, base_model=base_name, params=stored, owner=owner)
    return save_version(
        model,
        settings.artifacts_dir,
        base_model=base_name,
        base_encoder=settings.model or None,
        train_layers=params.train_layers,
        params=stored,
        owner=owner,
        # Trained from a version's own files: the encoder goes with it (those files may be deleted), with how it pools
        # and its token limit.
        own_encoder=start is not None and start.path is not None,
    )


def _train_and_gate(
    run_id: str,
    tenant: str,
    raw_params: dict[str, Any],
    active_version: str,
    max_id: int,
    default_margin: float,
    lease: int,
    start: Start | None = None,
) -> str:
    params = params_for(raw_params)
    margin = float(raw_params.get("gate_margin", default_margin))
    settings = get_settings()
    loaded, window = _load_feedback(tenant, max_id, params, settings.train_window)
    data, report = clean(loaded)
    report["window"] = window
    _fault_kill(settings.fault_kill_marker, data)
    train, val, held = data.slices(params.heldout_fraction, params.validation_fraction, params.seed)
    report.update(train=len(train), validation=len(val), gate=len(held), gate_comparisons=comparisons(held))
    reason = refusal(
        data, held, train, min_rows=settings.min_train_feedback, min_gate_comparisons=settings.min_gate_comparisons
    )
    if reason is not None:
        log.info("run %s rejected before training: %s", run_id, reason)
        with session_scope() as s:
            trepo.finish_run(
                s,
                run_id=run_id,
                status=RunStatus.rejected,
                error=reason,
                lease=lease,
                metrics={"feedback": report, "guard": {"decision": "rejected", "reason": reason}},
            )
        return RunStatus.rejected.value
    report["warnings"] = warnings(report, report["gate_comparisons"])
    limit, steps = settings.max_train_steps, planned_steps(params, len(train))
    if steps > limit:  # the feedback grew since the run was accepted (or a schedule)
        raise RunError(
            f"this run would take about {steps} steps on {len(train)} feedback rows, "
            f"more than the {limit} allowed (REWARDQ_MAX_TRAIN_STEPS): use fewer epochs, a larger batch_size or a "
            "smaller window (REWARDQ_TRAIN_WINDOW)"
        )
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
            trepo.set_run_progress(s, run_id=run_id, lease=lease, progress=p, loss_curve=curve_so_far)

    t0 = time.perf_counter()
    early = BestEpoch(val, params.patience)
    model, curve, base_name = _fit(params, train, progress, early, start)
    train_s = time.perf_counter() - t0
    held_scores: list[float] = []
    candidate = evaluate(model, held, collect=held_scores)
    stats = summarize(held_scores, f"its scores on the run's held-out feedback ({len(held)} rows)")
    version, path, config = _save(model, params, base_name, margin, tenant, start)
    compared = active_version
    for _ in range(MAX_GATES):
        with session_scope() as s:
            now = registry.get_version(s, version=compared)
            if now is not None and now.kind == ENSEMBLE:  # activated while the run trained
                raise RunError(ensemble_active(compared))
        incumbent = evaluate(engine.get_model(compared), held)
        passes = gate(candidate, incumbent, margin)
        with session_scope() as s:
            # Fenced: the version, the promotion and the run's end are written only while this worker still holds the
            # run, in one transaction that holds its row (a worker that lost it to another promotes nothing).
            trepo.fence(s, run_id=run_id, lease=lease)
            registry.register(
                s,
                version=version,
                kind=params.kind,
                base_model=base_name,
                path=path.name,
                owner=tenant,
                n_heads=params.n_heads,
                config=config,
                metrics=candidate,
                run_id=run_id,
                score_stats=stats,
            )
            promoted = passes and registry.promote(s, tenant=tenant, version=version, expected=compared)
            if promoted or not passes:
                decision = "promoted" if promoted else "rejected"
                metrics = {
                    "candidate": candidate,
                    "active": {**incumbent, "version": compared},
                    "gate": {"metric": PRIMARY_METRIC, "margin": margin, "decision": decision},
                    "validation": early.summary(params.epochs),
                    "feedback": report,
                    "train_seconds": round(train_s, 2),
                    "train_precision": getattr(model, "train_autocast", getattr(model, "autocast", "off")),
                    "n_train": len(train),
                    "n_validation": len(val),
                    "n_heldout": len(held),
                }
                trepo.set_run_progress(s, run_id=run_id, lease=lease, loss_curve=curve, progress={**last, "done": True})
                trepo.finish_run(
                    s,
                    run_id=run_id,
                    status=RunStatus.succeeded if promoted else RunStatus.rejected,
                    metrics=metrics,
                    result_version=version,
                    lease=lease,
                )
                log.info(
                    "run %s: %s %s (%s %.4f vs %.4f of %s)",
                    run_id,
                    decision,
                    version,
                    PRIMARY_METRIC,
                    candidate[PRIMARY_METRIC] or 0,
                    incumbent[PRIMARY_METRIC] or 0,
                    compared,
                )
                return RunStatus.succeeded.value if promoted else RunStatus.rejected.value
            moved_to = registry.active_version(s, tenant=tenant)
        log.info(
            "run %s: the active version moved from %s to %s during the run; gating again", run_id, compared, moved_to
        )
        compared = moved_to or compared
    raise RunError(f"the active version kept changing during the gate ({MAX_GATES} tries); nothing was promoted")
