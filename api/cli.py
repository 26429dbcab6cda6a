"""The ``rewardq`` command line: run the services, submit and follow jobs, migrate, demo."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from api.client import Client, ClientError
from api.formats import FORMATS, Columns, FormatError


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["url"], ctx.obj["api_key"])


def _print(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@contextmanager
def _errors() -> Iterator[None]:
    """API errors become a clean CLI error with the server's JSON, not a traceback."""
    try:
        yield
    except ClientError as exc:
        raise click.ClickException(json.dumps(exc.body)) from exc
    except FormatError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option(
    "--url",
    envvar="REWARDQ_API_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="API base URL (env REWARDQ_API_URL)",
)
@click.option("--api-key", envvar="REWARDQ_API_KEY", default=None, help="bearer key (env REWARDQ_API_KEY)")
@click.pass_context
def main(ctx: click.Context, url: str, api_key: str | None) -> None:
    """rewardq: batch reward scoring on Redis + Celery + SQL."""
    ctx.obj = {"url": url, "api_key": api_key}


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
def api(host: str, port: int, workers: int) -> None:
    """Run the HTTP API."""
    import uvicorn

    uvicorn.run("api.main:app", host=host, port=port, workers=workers, log_level="info")


@main.command()
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="comma-separated queues to consume, served in this order  [default: interactive,scoring,training "
    "(REWARDQ_*_QUEUE)]",
)
@click.option("-c", "--concurrency", default=1, show_default=True, type=int, help="worker processes")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option("--loglevel", default="info", show_default=True)
def worker(queues: str | None, concurrency: int, pool: str, loglevel: str) -> None:
    """Run a Celery worker (one process per GPU: --pool solo). It takes interactive work before bulk work."""
    from storage.settings import get_settings
    from workers.celery_app import app
    from workers.registry import register_base_version

    queues = queues or get_settings().worker_queues()
    try:
        click.echo(f"model version: {register_base_version()}", err=True)
    except Exception as exc:  # the DB may not be migrated yet; tasks will say so when they run
        click.echo(f"warning: could not register the base model version: {exc}", err=True)
    app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "--pool",
            pool,
            "--loglevel",
            loglevel,
            "-n",
            f"rewardq-{os.getpid()}@%h",
        ]
    )


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def beat(loglevel: str) -> None:
    """Run Celery beat: fires the retraining schedules stored in SQL (safe to run more than one)."""
    from workers.celery_app import app

    app.start(["beat", "--loglevel", loglevel, "--scheduler", "workers.schedule:SqlScheduler", "--max-interval", "1"])


@main.command()
@click.argument("file", type=click.Path(exists=True))
@click.option("--wait", is_flag=True, help="follow the job with a progress bar until it finishes")
@click.option("--model-version", default=None, help="defaults to your active version")
@click.option("--idempotency-key", default=None, help="the same key and file again return the same job")
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(list(FORMATS)),
    help="auto: from the name and first bytes (hf-dataset: a save_to_disk folder; openai-batch: custom_id, "
    "method, url /score, body)",
)
@click.option("--prompt-col", default="prompt", show_default=True, help="column of the prompt")
@click.option(
    "--response-col",
    default="response",
    show_default=True,
    help="column of the response; a conversation (list of messages) there: its last assistant turn is the "
    "response and the turns before it the prompt",
)
@click.option("--id-col", default=None, help="column of the item id  [default: id, when present]")
@click.pass_context
def submit(
    ctx: click.Context,
    /,
    file: str,
    wait: bool,
    model_version: str | None,
    idempotency_key: str | None,
    fmt: str,
    prompt_col: str,
    response_col: str,
    id_col: str | None,
) -> None:
    """Submit FILE as a scoring job: JSON Lines of {id?, prompt, response}, a JSON array, CSV, Parquet (a file or
    a folder of them), a Hugging Face save_to_disk folder, or an OpenAI/vLLM batch file of /score requests."""
    cols = Columns(prompt=prompt_col, response=response_col, id=id_col)
    with _client(ctx) as c, _errors():
        job_id = c.submit(
            file, model_version=model_version, idempotency_key=idempotency_key, progress=True, fmt=fmt, columns=cols
        )
        click.echo(job_id)
        if wait:
            job = c.wait(job_id, progress=True)
            _print({k: job[k] for k in ("job_id", "status", "progress", "pairs_per_s", "summary")})
            if job["status"] != "succeeded":
                sys.exit(1)


@main.command()
@click.argument("job_id")
@click.pass_context
def status(ctx: click.Context, job_id: str) -> None:
    """Show a job's status, progress and score summary."""
    with _client(ctx) as c, _errors():
        _print(c.job(job_id))


@main.command()
@click.argument("job_id")
@click.option(
    "--format",
    "fmt",
    default="jsonl",
    show_default=True,
    type=click.Choice(["jsonl", "csv", "parquet", "openai-batch"]),
    help="openai-batch: the batch output lines of a job submitted from a batch file",
)
@click.option("-o", "--output", default=None, help="file to write; stdout when omitted (parquet needs one)")
@click.pass_context
def results(ctx: click.Context, job_id: str, fmt: str, output: str | None) -> None:
    """Export a job's results as jsonl, csv, parquet or OpenAI batch output."""
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet writes a file: give -o FILE")
    with _client(ctx) as c, _errors():
        if output:
            n = c.download(job_id, output, fmt=fmt, progress=True)
            click.echo(f"wrote {n} bytes to {output}", err=True)
        else:
            c.download(job_id, "/dev/stdout", fmt=fmt)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def feedback(ctx: click.Context, file: str) -> None:
    """Add feedback from a JSON Lines FILE: {prompt, chosen, rejected} or {prompt, response, rating}."""
    with _client(ctx) as c, _errors():
        _print(c.add_feedback(file))


_TRAIN_OPTIONS = [
    click.option("--epochs", type=int, default=None),
    click.option("--lr", type=float, default=None, help="learning rate of the trained encoder layers"),
    click.option("--head-lr", type=float, default=None),
    click.option("--n-heads", type=int, default=None, help="K"),
    click.option("--train-layers", type=int, default=None, help="top encoder layers to train (0: heads only)"),
    click.option("--heldout-fraction", type=float, default=None),
    click.option("--seed", type=int, default=None),
    click.option("--gate-margin", type=float, default=None),
]


def _train_options(f: Any) -> Any:
    for opt in reversed(_TRAIN_OPTIONS):
        f = opt(f)
    return f


def _given(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


@main.command()
@click.option("--wait", is_flag=True, help="follow the run with a progress bar until it ends")
@_train_options
@click.pass_context
def retrain(ctx: click.Context, /, wait: bool, **params: Any) -> None:
    """Start a fine-tuning run now on the feedback collected so far."""
    with _client(ctx) as c, _errors():
        run = c.train(**_given(params))
        click.echo(run["run_id"])
        if wait:
            run = c.wait_training(run["run_id"], progress=True)
            _print({k: run[k] for k in ("run_id", "status", "result_version", "metrics", "loss_curve", "error")})
            if run["status"] == "failed":
                sys.exit(1)


@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List model versions with their metrics (or: models activate VERSION)."""
    if ctx.invoked_subcommand is None:
        with _client(ctx) as c, _errors():
            _print(c.models())


@models.command("activate")
@click.argument("version")
@click.option("--default", "as_default", is_flag=True, help="admin keys: make it every tenant's default instead")
@click.pass_context
def models_activate(ctx: click.Context, version: str, as_default: bool) -> None:
    """Promote VERSION (or roll back to it); new jobs use it, running jobs keep theirs."""
    with _client(ctx) as c, _errors():
        out = c.activate(version, default=as_default)
        _print(out["default"] if as_default else out["active"])


@models.command("follow-default")
@click.pass_context
def models_follow_default(ctx: click.Context) -> None:
    """Drop your own choice: new jobs use the operator's default version again."""
    with _client(ctx) as c, _errors():
        _print(c.follow_default()["active"])


@models.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["classifier", "likelihood"]),
    help="classifier: AutoModelForSequenceClassification, num_labels=1 (TRL, OpenRLHF); "
    "likelihood: AutoModelForCausalLM",
)
@click.option("--name", default=None, help="a display name (default: the folder's name)")
@click.option(
    "--max-length", type=int, default=None, help="tokens per pair  [default: 512 classifier, 1024 likelihood]"
)
@click.option("--truncation-side", type=click.Choice(["left", "right"]), default=None, help="[default: left]")
@click.option(
    "--reduction",
    type=click.Choice(["mean", "sum"]),
    default=None,
    help="likelihood: mean or sum of the response's token log-probabilities  [default: mean]",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="[default: float32]")
@click.pass_context
def models_import(ctx: click.Context, /, path: str, kind: str, name: str | None, **options: Any) -> None:
    """Register the Hugging Face folder PATH (safetensors; on the API's machine) as a shared version (admin key).

    The version id is a hash of the folder's content; importing it again gives the same version."""
    with _client(ctx) as c, _errors():
        mv = c.import_model(path, kind, name=name, **_given(options))
        _print({k: mv[k] for k in ("version", "kind", "name", "base_model", "settings")})


@main.group()
def schedule() -> None:
    """Retraining schedules (fired by `rewardq beat`)."""


@schedule.command("add")
@click.argument("cron")
@click.option("--min-new-feedback", type=int, default=0, show_default=True)
@_train_options
@click.pass_context
def schedule_add(ctx: click.Context, /, cron: str, min_new_feedback: int, **params: Any) -> None:
    """Add a schedule: CRON is 5 fields, or 6 with seconds last (quote it)."""
    with _client(ctx) as c, _errors():
        _print(c.add_schedule(cron, min_new_feedback=min_new_feedback, **_given(params)))


@schedule.command("list")
@click.pass_context
def schedule_list(ctx: click.Context) -> None:
    with _client(ctx) as c, _errors():
        _print(c.schedules())


@schedule.command("rm")
@click.argument("schedule_id")
@click.pass_context
def schedule_rm(ctx: click.Context, schedule_id: str) -> None:
    with _client(ctx) as c, _errors():
        c.delete_schedule(schedule_id)
        click.echo(f"deleted {schedule_id}")


@main.group()
def keys() -> None:
    """API keys stored hashed in SQL (they switch authentication on)."""


@keys.command("create")
@click.argument("tenant")
@click.option("--admin", is_flag=True, help="an admin key: imports shared models and sets the default version")
def keys_create(tenant: str, admin: bool) -> None:
    """Make a key for TENANT and print it once: only its SHA-256 is stored."""
    from storage.db import session_scope
    from storage.keys import create_key
    from storage.settings import TENANT_RULE, valid_tenant

    if not valid_tenant(tenant):
        raise click.BadParameter(TENANT_RULE, param_hint="TENANT")
    with session_scope() as s:
        key = create_key(s, tenant=tenant, admin=admin)
    click.echo(key)
    role = "admin key" if admin else "key"
    click.echo(f"{role} for tenant {tenant!r}: store it now, it is not shown again", err=True)


@keys.command("list")
def keys_list() -> None:
    """Tenants and key prefixes (never the keys)."""
    from storage.db import session_scope
    from storage.keys import list_keys

    with session_scope() as s:
        _print(
            [
                {
                    "tenant": k.tenant,
                    "prefix": k.prefix,
                    "admin": k.admin,
                    "created_at": k.created_at,
                    "revoked_at": k.revoked_at,
                }
                for k in list_keys(s)
            ]
        )


@main.group()
def db() -> None:
    """Database commands."""


@db.command()
def upgrade() -> None:
    """Apply migrations (and register the base model version)."""
    from storage.migrate import upgrade as run_upgrade
    from storage.settings import get_settings
    from workers.registry import register_base_version

    run_upgrade()
    version = register_base_version()
    click.echo(f"database {get_settings().database_url} is at head; base model version {version}")


@main.command()
@click.option("--keep", is_flag=True, help="leave the demo's database and logs in ./demo-run")
@click.option("--limit", default=None, type=int, help="score only the first N sample pairs")
def demo(keep: bool, limit: int | None) -> None:
    """Start Redis (if needed), a worker and the API; score a sample; print a summary; stop everything."""
    from api.demo import run_demo

    sys.exit(run_demo(keep=keep, limit=limit))


if __name__ == "__main__":
    main()
