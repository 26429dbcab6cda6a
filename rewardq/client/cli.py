"""The producer's commands of ``rewardq``: jobs here; feedback, training and models in ``cli_training``. They need
only the base install (httpx, click, tqdm); ``rewardq.cli`` adds the server's commands to the same group."""

from __future__ import annotations

import sys
from typing import Any

import click

from rewardq.client import cli_training
from rewardq.client.cli_common import client, connection, echo_json, errors
from rewardq.client.client import DEFAULT_URL
from rewardq.client.formats import FORMATS, Columns

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
@click.option("--url", envvar="REWARDQ_API_URL", default=DEFAULT_URL, help="API base URL  [env: REWARDQ_API_URL]")
@click.option("--api-key", envvar="REWARDQ_API_KEY", default=None, help="bearer key  [env: REWARDQ_API_KEY]")
@click.option("--debug", is_flag=True, help="show the traceback of an error")
@click.pass_context
def main(ctx: click.Context, url: str, api_key: str | None, debug: bool) -> None:
    """rewardq: batch reward scoring on Redis + Celery + SQL.

    Job ids may be shortened to their first 8 or more characters."""
    ctx.obj = {"url": url, "api_key": api_key, "debug": debug}


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    return {
        k: job.get(k)
        for k in ("job_id", "status", "model_version", "progress", "pairs_per_s", "summary", "error_counts", "error")
    }


def _follow(ctx: click.Context, c: Any, job_id: str, timeout: float | None) -> None:
    job = c.wait(job_id, progress=True, timeout=timeout or None)
    echo_json(_summary(job))
    if job["status"] != "succeeded":
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(exists=True))
@click.option("--wait", is_flag=True, help="follow the job with a progress bar until it ends")
@click.option("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
@click.option("--model-version", default=None, help="the version to score with  [default: your active version]")
@click.option("--idempotency-key", default=None, help="the same key and file again return the same job")
@click.option(
    "--format",
    "fmt",
    default="auto",
    type=click.Choice(list(FORMATS)),
    help="auto: from the name and first bytes (hf-dataset: a save_to_disk folder; openai-batch: lines of "
    "custom_id, method, url /score, body)",
)
@click.option("--prompt-col", default="prompt", help="column of the prompt")
@click.option(
    "--response-col",
    default="response",
    help="column of the response; a conversation (list of messages) there: its last assistant turn is "
    "the response and the turns before it the prompt",
)
@click.option("--id-col", default=None, help="column of the item id  [default: id, when there is one]")
@connection
@click.pass_context
def submit(
    ctx: click.Context,
    /,
    file: str,
    wait: bool,
    timeout: float,
    model_version: str | None,
    idempotency_key: str | None,
    fmt: str,
    prompt_col: str,
    response_col: str,
    id_col: str | None,
) -> None:
    """Submit FILE as a scoring job and print its id: JSON Lines of {id?, prompt, response}, a JSON array, CSV,
    Parquet (a file or a folder of them), a Hugging Face save_to_disk folder, or an OpenAI batch file."""
    cols = Columns(prompt=prompt_col, response=response_col, id=id_col)
    with errors(ctx), client(ctx) as c:
        job_id = c.submit(
            file, model_version=model_version, idempotency_key=idempotency_key, progress=True, fmt=fmt, columns=cols
        )
        click.echo(job_id)
        if wait:
            _follow(ctx, c, job_id, timeout)


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="follow the job with a progress bar until it ends")
@click.option("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
@connection
@click.pass_context
def status(ctx: click.Context, job_id: str, wait: bool, timeout: float) -> None:
    """Show a job's status, progress, score summary and failed items."""
    with errors(ctx), client(ctx) as c:
        if wait:
            _follow(ctx, c, job_id, timeout)
        else:
            echo_json(c.job(job_id))


@main.group(invoke_without_command=True)
@click.option(
    "--status",
    "status_",
    default=None,
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    help="only these",
)
@click.option("--limit", type=int, default=20, help="most jobs to show, newest first")
@connection
@click.pass_context
def jobs(ctx: click.Context, status_: str | None, limit: int) -> None:
    """List your jobs, newest first: id, status, progress, model version, created. `rewardq jobs delete JOB`
    deletes one."""
    if ctx.invoked_subcommand is not None:
        return
    with errors(ctx), client(ctx) as c:
        rows = c.jobs(status=status_, limit=limit)
    if not rows:
        click.echo("no jobs", err=True)
        return
    click.echo(f"{'JOB':<32}  {'STATUS':<9}  {'DONE':>9}/{'TOTAL':<9}  MODEL  CREATED (UTC)")
    for j in rows:
        p = j["progress"]
        failed = f" ({p['failed']} failed)" if p["failed"] else ""
        click.echo(
            f"{j['job_id']}  {j['status']:<9}  {p['done']:>9,}/{p['total']:<9,}{failed}  {j['model_version']}  "
            f"{str(j['created_at'])[:19]}"
        )


@jobs.command("delete")
@click.argument("job_id")
@connection
@click.pass_context
def jobs_delete(ctx: click.Context, job_id: str) -> None:
    """Delete a job and everything it holds: items, results, failed items. A job that has not ended is cancelled
    first. It cannot be undone."""
    with errors(ctx), client(ctx) as c:
        out = c.delete_job(job_id)
    n = out["deleted"]
    first = " (cancelled first)" if out["cancelled"] else ""
    click.echo(
        f"deleted job {out['job_id']}{first}: {n['items']:,} items, {n['results']:,} results, "
        f"{n['item_errors']:,} failed items, {n['batches']:,} batches"
    )


@main.command()
@click.argument("job_id")
@connection
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Stop a job: its queued batches are skipped, items already scored stay."""
    with errors(ctx), client(ctx) as c:
        job = c.cancel(job_id)
    p = job["progress"]
    click.echo(f"job {job['job_id']} {job['status']}: {p['done']:,} of {p['total']:,} items scored")


@main.command()
@click.argument("job_id")
@click.option(
    "--format",
    "fmt",
    default="jsonl",
    type=click.Choice(["jsonl", "csv", "parquet", "openai-batch"]),
    help="openai-batch: the batch output lines of a job submitted from a batch file",
)
@click.option("-o", "--output", default=None, help="file to write  [default: stdout; parquet needs a file]")
@click.option("--partial", is_flag=True, help="export a job that has not finished (the export says it is partial)")
@connection
@click.pass_context
def results(ctx: click.Context, job_id: str, fmt: str, output: str | None, partial: bool) -> None:
    """Export a job's results as jsonl, csv, parquet or OpenAI batch output (failed items last, with their reason).

    A job that has not finished is refused, saying how far it got, unless --partial is given."""
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet writes a file: give -o FILE")
    with errors(ctx), client(ctx) as c:
        n = c.download(job_id, output or "/dev/stdout", fmt=fmt, progress=bool(output), partial=partial)
    if output:
        click.echo(f"wrote {n:,} rows to {output}", err=True)


for _command in cli_training.COMMANDS:
    main.add_command(_command)
