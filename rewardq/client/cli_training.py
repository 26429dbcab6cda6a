"""CLI commands for feedback, training runs, model versions and retraining schedules."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from rewardq.client.cli_common import DefaultGroup, client, connection, echo_json, errors


@click.group(cls=DefaultGroup, default="add")
def feedback() -> None:
    """Add feedback (`rewardq feedback FILE`, short for `rewardq feedback add FILE`), or delete yours."""


@feedback.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@connection
@click.pass_context
def feedback_add(ctx: click.Context, file: str) -> None:
    """Add feedback from FILE (JSON Lines, or a JSON array): preferences {prompt, chosen, rejected} or ratings
    {prompt, response, rating} (any real scale: within a run only their order matters)."""
    with errors(ctx), client(ctx) as c:
        echo_json(c.add_feedback(file))


@feedback.command("delete")
@click.option(
    "--before",
    default=None,
    help="only feedback added before this ISO 8601 date or time, UTC unless it names a zone (2025-01-31, "
    "2025-01-31T12:00:00+02:00)  [default: all of it]",
)
@connection
@click.pass_context
def feedback_delete(ctx: click.Context, before: str | None) -> None:
    """Delete your feedback (all of it, or what was added before --before); prints how many rows went. Runs already
    trained keep their versions; it cannot be undone."""
    with errors(ctx), client(ctx) as c:
        echo_json(c.delete_feedback(before))


# Every training option shows its default; None means "the kind's default" (see docs/retraining.md).
_TRAIN_OPTIONS = [
    click.option(
        "--kind",
        type=click.Choice(["sim_exp", "classifier"]),
        default=None,
        help="sim_exp: heads and top encoder layers; classifier: a cross-encoder  [default: --from's kind, else "
        "sim_exp]",
    ),
    click.option(
        "--from",
        "start_version",
        default=None,
        metavar="VERSION",
        help="the version to train from, by id or name (sim_exp or classifier)  [default: your active version when it "
        "is of the run's kind, else the base encoder]",
    ),
    click.option("--epochs", type=int, default=None, help="passes over the training split  [default: 3; classifier 2]"),
    click.option(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of the trained encoder layers  [default: 5e-5; classifier 1e-4]",
    ),
    click.option(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of heads, alpha and w (classifier: the score head)  [default: 1e-2; classifier 2e-3]",
    ),
    click.option("--n-heads", type=int, default=None, help="K, the number of heads (sim_exp)  [default: 1]"),
    click.option(
        "--train-layers",
        type=int,
        default=None,
        help="top encoder layers fine-tuned, 0: heads only (sim_exp)  [default: 4]",
    ),
    click.option("--batch-size", type=int, default=None, help="pairs per step  [default: 32; classifier 64]"),
    click.option(
        "--heldout-fraction", type=float, default=None, help="feedback kept aside for the gate  [default: 0.1]"
    ),
    click.option(
        "--validation-fraction",
        type=float,
        default=None,
        help="feedback kept aside to pick the best epoch, 0: keep the last  [default: 0.05]",
    ),
    click.option(
        "--patience", type=int, default=None, help="epochs without a better one before stopping  [default: 2]"
    ),
    click.option(
        "--objective",
        type=click.Choice(["bt", "cosent", "cosent_cos", "angle"]),
        default=None,
        help="bt: Bradley-Terry; cosent: a ranking loss on the worst-ordered comparisons; sim_exp only: cosent_cos, "
        "angle (sentence-transformers' CoSENT and AnglE on cosine margins)  [default: bt]",
    ),
    click.option(
        "--rating-margin",
        type=float,
        default=None,
        help="bt on ratings: rewards should differ by this times the ratings' difference (TRL's margin)  [default: 0]",
    ),
    click.option(
        "--alpha-lr", type=float, default=None, help="learning rate of alpha and w (sim_exp)  [default: head-lr]"
    ),
    click.option("--seed", type=int, default=None, help="split, shuffling, initialisation  [default: 0]"),
    click.option(
        "--symmetric/--no-symmetric",
        default=None,
        help="also train on (response, prompt), for unordered pairs  [default: off]",
    ),
    click.option("--max-length", type=int, default=None, help="classifier: tokens per pair  [default: 256]"),
    click.option(
        "--lr-schedule",
        type=click.Choice(["constant", "linear", "cosine"]),
        default=None,
        help="learning rates over the run: constant, or linear/cosine decay to 0 after a warmup  [default: linear]",
    ),
    click.option("--warmup", type=float, default=None, help="share of the steps spent warming up  [default: 0.1]"),
    click.option(
        "--dropout",
        type=float,
        default=None,
        help="every dropout layer's rate while training; 0 turns it off  [default: the model's own, 0.1]",
    ),
    click.option(
        "--ema-decay",
        type=float,
        default=None,
        help="keep a moving average of the trained weights, this decay per step; 0 turns it off  [default: 0]",
    ),
    click.option(
        "--layer-decay",
        type=float,
        default=None,
        help="each trained encoder layer's learning rate is this times the one above's  [default: 1]",
    ),
    click.option(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip every step's gradients to this norm; 0 turns it off  [default: 1 for cosent_cos and angle, else 0]",
    ),
    click.option(
        "--window",
        type=int,
        default=None,
        help="train on the newest feedback rows, this many; 0: all  [default: REWARDQ_TRAIN_WINDOW, 100000]",
    ),
    click.option(
        "--window-sample",
        type=int,
        default=None,
        help="and this many older rows beside them, drawn uniformly with the seed  [default: 0]",
    ),
    click.option(
        "--gate-margin",
        type=float,
        default=None,
        help="how much the candidate must beat the active version by; below 0 needs an admin key  "
        "[default: REWARDQ_GATE_MARGIN, 0.005]",
    ),
]


def _train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_TRAIN_OPTIONS):
        f = opt(f)
    return f


def given(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A run without its loss curve (its length instead): what a terminal can show."""
    out = {k: v for k, v in run.items() if k not in ("loss_curve", "params")}
    out["loss_curve_points"] = len(run.get("loss_curve") or [])
    out["params"] = run.get("params")
    return out


def gate_line(run: dict[str, Any]) -> str:
    m = run.get("metrics") or {}
    gate, cand, act = m.get("gate"), m.get("candidate") or {}, m.get("active") or {}
    if run["status"] == "failed" or (run.get("error") and not gate):  # failed, or refused before training
        return f"run {run['run_id']} {run['status']}: {run.get('error')}"
    if not gate:
        return f"run {run['run_id']} {run['status']}"
    metric = gate["metric"]
    return (
        f"run {run['run_id']} {run['status']}: version {run['result_version']} {gate['decision']} "
        f"({metric} {cand.get(metric) or 0:.3f} vs {act.get(metric) or 0:.3f} of {act.get('version')}, "
        f"margin {gate['margin']})"
    )


@click.command()
@click.option("--wait", is_flag=True, help="follow the run with a progress bar until it ends")
@click.option("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
@_train_options
@connection
@click.pass_context
def retrain(ctx: click.Context, /, wait: bool, timeout: float, **params: Any) -> None:
    """Start a fine-tuning run now on the feedback collected so far; print its id (with --wait, its outcome)."""
    with errors(ctx), client(ctx) as c:
        run = c.train(**given(params))
        click.echo(run["run_id"])
        if wait:
            run = c.wait_training(run["run_id"], progress=True, timeout=timeout or None)
            click.echo(gate_line(run), err=True)
            echo_json(run_summary(run))
            if run["status"] == "failed":
                sys.exit(1)


@click.command()
@click.argument("run_id", required=False)
@click.option("--limit", type=int, default=20, help="most runs to list, newest first")
@connection
@click.pass_context
def runs(ctx: click.Context, run_id: str | None, limit: int) -> None:
    """List your training runs, or show RUN: its status, progress, metrics and the gate's decision."""
    with errors(ctx), client(ctx) as c:
        if run_id:
            run = c.training_run(run_id)
            click.echo(gate_line(run), err=True)
            echo_json(run_summary(run))
            return
        listed = c.training_runs(limit=limit)
    if not listed:
        click.echo("no training runs", err=True)
    for r in listed:
        decision = ((r.get("metrics") or {}).get("gate") or {}).get("decision", "")
        click.echo(
            f"{r['run_id']}  {r['status']:<9}  {(r.get('params') or {}).get('kind', 'sim_exp'):<10}  "
            f"{r.get('result_version') or '-':<16}  {decision:<8}  {str(r['created_at'])[:19]}"
        )


@click.group(invoke_without_command=True)
@click.option("--full", is_flag=True, help="each version's score distribution with all its quantiles")
@connection
@click.pass_context
def models(ctx: click.Context, full: bool) -> None:
    """List the model versions you can use (shared and your own), with their kind and held-out metrics; "active"
    is the version your new jobs use. Score distributions show n, mean and std (all 101 quantiles with --full)."""
    if ctx.invoked_subcommand is None:
        with errors(ctx), client(ctx) as c:
            listing = c.models()
        if not full:
            for m in listing.get("models", []):
                if isinstance(m.get("score_stats"), dict):
                    m["score_stats"].pop("quantiles", None)
        echo_json(listing)


@models.command("activate")
@click.argument("version")
@click.option("--default", "as_default", is_flag=True, help="admin keys: make it every tenant's default instead")
@connection
@click.pass_context
def models_activate(ctx: click.Context, version: str, as_default: bool) -> None:
    """Promote VERSION (or roll back to it) for your new jobs; jobs already submitted keep theirs."""
    with errors(ctx), client(ctx) as c:
        out = c.activate(version, default=as_default)
        click.echo(out["default"] if as_default else out["active"])


@models.command("follow-default")
@connection
@click.pass_context
def models_follow_default(ctx: click.Context) -> None:
    """Drop your own choice: your new jobs use the operator's default version again."""
    with errors(ctx), client(ctx) as c:
        click.echo(c.follow_default()["active"])


@models.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["classifier", "likelihood", "sim_exp"]),
    help="classifier: AutoModelForSequenceClassification with num_labels=1 (what TRL and OpenRLHF save); "
    "likelihood: AutoModelForCausalLM; sim_exp: a sentence-transformers folder (its pooling, safetensors), scored "
    "by the sim-exp formula and trainable by runs",
)
@click.option("--name", default=None, help="a display name  [default: the folder's name]")
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="tokens per pair  [default: 512; likelihood 1024; sim_exp: per text, the folder's max_seq_length or 256]",
)
@click.option(
    "--truncation-side",
    type=click.Choice(["left", "right"]),
    default=None,
    help="which end of a too-long pair is cut  [default: left]",
)
@click.option(
    "--reduction",
    type=click.Choice(["mean", "sum"]),
    default=None,
    help="likelihood: mean or sum of the response's token log-probabilities  [default: mean]",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="weights' precision on the workers  [default: float32]",
)
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="an OpenRLHF reward model: (r - mean) / std from its config.json, as serve_rm --reward.normalize_enable  "
    "[default: its config's normalize_reward]",
)
@connection
@click.pass_context
def models_import(ctx: click.Context, /, path: str, kind: str, name: str | None, **options: Any) -> None:
    """Register the Hugging Face folder PATH (safetensors; a path on the API's machine) as a shared version. Needs an
    admin key. The version id is a hash of the folder's content: importing it again gives the same version."""
    with errors(ctx), client(ctx) as c:
        mv = c.import_model(path, kind, name=name, **given(options))
        echo_json({k: mv[k] for k in ("version", "kind", "name", "base_model", "settings")})


@models.command("ensemble")
@click.argument("members", nargs=-1, required=True)
@click.option("--name", default=None, help="a name to use in place of its id (unique among your versions)")
@connection
@click.pass_context
def models_ensemble(ctx: click.Context, /, members: tuple[str, ...], name: str | None) -> None:
    """A weighted sum of versions, as a version of your own: MEMBERS are VERSION=WEIGHT (ids or names), 2 to 8 of
    them, e.g. `rewardq models ensemble helpful-rm=0.7 safety-rm=0.3 --name mix`. Name it with --model-version
    wherever a version is named; each result keeps its member scores (components)."""
    weights: dict[str, float] = {}
    for m in members:
        version, sep, weight = m.rpartition("=")
        try:
            if not sep or not version:
                raise ValueError
            weights[version] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{m!r}: write VERSION=WEIGHT, e.g. my-rm=0.5", param_hint="MEMBERS") from None
    with errors(ctx), client(ctx) as c:
        mv = c.ensemble(weights, name=name)
        echo_json({k: mv[k] for k in ("version", "kind", "name", "settings")})


@click.group()
def schedule() -> None:
    """Retraining schedules (fired by `rewardq beat`)."""


@schedule.command("add")
@click.argument("cron")
@click.option("--min-new-feedback", type=int, default=0, help="skip a slot with fewer new feedback rows")
@_train_options
@connection
@click.pass_context
def schedule_add(ctx: click.Context, /, cron: str, min_new_feedback: int, **params: Any) -> None:
    """Add a schedule: CRON is 5 fields, or 6 with seconds last (quote it)."""
    with errors(ctx), client(ctx) as c:
        echo_json(c.add_schedule(cron, min_new_feedback=min_new_feedback, **given(params)))


@schedule.command("list")
@connection
@click.pass_context
def schedule_list(ctx: click.Context) -> None:
    """Your schedules, with their next slot."""
    with errors(ctx), client(ctx) as c:
        echo_json(c.schedules())


@schedule.command("rm")
@click.argument("schedule_id")
@connection
@click.pass_context
def schedule_rm(ctx: click.Context, schedule_id: str) -> None:
    """Delete a schedule."""
    with errors(ctx), client(ctx) as c:
        c.delete_schedule(schedule_id)
    click.echo(f"deleted {schedule_id}")


COMMANDS = [feedback, retrain, runs, models, schedule]
