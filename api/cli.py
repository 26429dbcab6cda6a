"""The ``rewardq`` command line: run the services, submit and follow jobs, migrate, demo."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from api.client import Client, ClientError


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["url"], ctx.obj["api_key"])


def _print(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


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
@click.option("-Q", "--queues", default="scoring", show_default=True, help="comma-separated queues to consume")
@click.option("-c", "--concurrency", default=1, show_default=True, type=int, help="worker processes")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option("--loglevel", default="info", show_default=True)
def worker(queues: str, concurrency: int, pool: str, loglevel: str) -> None:
    """Run a Celery worker (one process per GPU: --pool solo)."""
    from workers.celery_app import app
    from workers.registry import register_base_version

    try:
        click.echo(f"model version: {register_base_version()}", err=True)
    except Exception as exc:  # the DB may not be migrated yet; tasks will say so when they run
        click.echo(f"warning: could not register the base model version: {exc}", err=True)
    app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "--pool", pool, "--loglevel", loglevel,
                     "-n", f"rewardq-{os.getpid()}@%h"])  # fmt: skip


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def beat(loglevel: str) -> None:
    """Run Celery beat, the clock behind periodic work (run exactly one per deployment)."""
    from workers.celery_app import app

    app.start(["beat", "--loglevel", loglevel])


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True, help="follow the job with a progress bar until it finishes")
@click.option("--model-version", default=None, help="defaults to the active version")
@click.option("--idempotency-key", default=None)
@click.pass_context
def submit(ctx: click.Context, file: str, wait: bool, model_version: str | None, idempotency_key: str | None) -> None:
    """Submit a JSON Lines FILE of {id?, prompt, response} as a scoring job."""
    with _client(ctx) as c:
        try:
            job_id = c.submit(file, model_version=model_version, idempotency_key=idempotency_key)
            click.echo(job_id)
            if wait:
                job = c.wait(job_id, progress=True)
                _print({k: job[k] for k in ("job_id", "status", "progress", "pairs_per_s", "summary")})
                if job["status"] != "succeeded":
                    sys.exit(1)
        except ClientError as exc:
            raise click.ClickException(json.dumps(exc.body)) from exc


@main.command()
@click.argument("job_id")
@click.pass_context
def status(ctx: click.Context, job_id: str) -> None:
    """Show a job's status, progress and score summary."""
    with _client(ctx) as c:
        try:
            _print(c.job(job_id))
        except ClientError as exc:
            raise click.ClickException(json.dumps(exc.body)) from exc


@main.command()
@click.argument("job_id")
@click.option("--format", "fmt", default="jsonl", type=click.Choice(["jsonl", "csv"]), show_default=True)
@click.option("-o", "--output", default=None, help="file to write; stdout when omitted")
@click.pass_context
def results(ctx: click.Context, job_id: str, fmt: str, output: str | None) -> None:
    """Export a job's results as jsonl or csv."""
    with _client(ctx) as c:
        try:
            if output:
                n = c.download(job_id, output, fmt=fmt, progress=True)
                click.echo(f"wrote {n} bytes to {output}", err=True)
            else:
                c.download(job_id, "/dev/stdout", fmt=fmt)
        except ClientError as exc:
            raise click.ClickException(json.dumps(exc.body)) from exc


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
