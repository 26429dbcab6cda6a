"""CLI commands that run or administer rewardq itself: the API, workers, beat, keys, migrations and the demo.
They need the server install (``.[server]``); their imports wait until they run."""

from __future__ import annotations

import os
import sys

import click

from rewardq.client.cli_common import echo_json


@click.command()
@click.option("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
@click.option("--port", default=8000, type=int, help="port to listen on")
@click.option("--workers", default=1, type=int, help="uvicorn worker processes")
@click.option(
    "--forwarded-allow-ips",
    envvar="FORWARDED_ALLOW_IPS",
    default="127.0.0.1",
    help="comma-separated addresses of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are trusted "
    "(the client's address for the limits; https for the dashboard's Secure cookie)  [env: FORWARDED_ALLOW_IPS]",
)
def api(host: str, port: int, workers: int, forwarded_allow_ips: str) -> None:
    """Run the HTTP API (and the dashboard at /ui). It needs an API key (`rewardq keys create TENANT`, or
    REWARDQ_API_KEYS), or REWARDQ_ALLOW_ANONYMOUS=1 to serve without keys on a trusted loopback."""
    import uvicorn

    from rewardq.api.deps import check_auth_setup
    from rewardq.storage.settings import get_settings

    try:
        warning = check_auth_setup(get_settings())
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if warning:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    uvicorn.run("rewardq.api.main:app", host=host, port=port, workers=workers, log_level="info", proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips)  # fmt: skip


@click.command()
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="comma-separated queues to consume, served in this order  [default: interactive,scoring,training, "
    "from REWARDQ_*_QUEUE]",
)
@click.option("-c", "--concurrency", default=1, type=int, help="worker processes")
@click.option(
    "--pool",
    default="prefork",
    type=click.Choice(["prefork", "solo"]),
    help="solo: one process per GPU, the model and CUDA context in it. There is no threads pool: a model's "
    "per-batch state (its cache scope, its stats) is its process's, and threads would mix tenants' in it",
)
@click.option("--loglevel", default="info", help="Celery's log level")
def worker(queues: str | None, concurrency: int, pool: str, loglevel: str) -> None:
    """Run a Celery worker: it scores interactive requests first, then bulk batches, then training runs."""
    from transformers.utils import logging as hf_logging

    from rewardq.storage.settings import get_settings
    from rewardq.workers.celery_app import app
    from rewardq.workers.kernel_check import KernelsUntrusted, check_kernels
    from rewardq.workers.liveness import advertise, withdraw
    from rewardq.workers.registry import register_base_version

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a weights-loading bar in a log is noise
    settings = get_settings()
    queues = queues or settings.worker_queues()
    try:
        click.echo(f"model version: {register_base_version()}", err=True)
    except Exception as exc:  # the DB may not be migrated yet; tasks will say so when they run
        click.echo(f"warning: could not register the base model version: {exc}", err=True)
    if settings.worker_preflight:
        _preflight()
    try:  # compiled kernels are proven on this device before any work is taken (workers.kernel_check)
        checked = check_kernels(settings)
    except KernelsUntrusted as exc:
        raise click.ClickException(str(exc)) from exc
    if checked is not None:
        verdict = f"FAILED, torch path for {', '.join(checked.fallback)}" if checked.fallback else "passed"
        click.echo(f"kernel self-check on {checked.device}: {len(checked.checks)} checks, {verdict}", err=True)
    click.echo(f"consuming {queues} (in this order)", err=True)
    # Said from the main process while it lives: a status of work on a queue nobody consumes says so (API notice).
    stop = None
    try:
        stop = advertise(settings.redis_url, queues.split(","), settings.heartbeat_ttl_s)
    except Exception as exc:  # Redis down at start: Celery itself waits for it and says so
        click.echo(f"warning: could not advertise the queues consumed: {exc}", err=True)
    try:
        argv = ["worker", "-Q", queues, "-c", str(concurrency), "--pool", pool, "--loglevel", loglevel]
        # Celery's worker-to-worker chatter is off: rewardq never uses remote control or Celery's events (its own
        # heartbeats are in rewardq.workers.liveness). Mingle cost each start a second, and after a Redis restart the
        # gossip and pidbox channels' reconnection exited workers with kombu's "'NoneType' object has no attribute
        # 'hostname'" (celery/kombu#582).
        quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        app.worker_main([*argv, *quiet, "-n", f"rewardq-{os.getpid()}@%h"])
    finally:
        if stop is not None:
            stop.set()
            withdraw(settings.redis_url, queues.split(","))  # at once: a status need not wait for the entry to age


def _preflight() -> None:
    """Load the default version in a child before taking work; a worker that cannot exits with the reason."""
    from rewardq.storage import registry
    from rewardq.storage.db import session_scope
    from rewardq.workers import preflight

    try:
        with session_scope() as s:
            version = registry.default_version(s)
    except Exception:  # no database yet: nothing to check, the tasks will say so
        return
    if version is None:
        return
    loads, why = preflight.check(version)
    if loads and why:
        click.echo(f"warning: {why}; starting all the same", err=True)
        return
    if not loads:
        raise click.ClickException(
            f"this worker cannot load model {version}: {why}. It takes no work: fix the model (REWARDQ_MODEL, the "
            "version's files, the install, free memory) and start it again; queued work waits for a worker that "
            "can score it"
        )
    click.echo(f"model {version} loads here", err=True)


@click.command()
@click.option("--loglevel", default="info", help="Celery's log level")
def beat(loglevel: str) -> None:
    """Run Celery beat: fires the retraining schedules stored in SQL and runs the sweeper (safe to run twice)."""
    from rewardq.workers.celery_app import app

    app.start(
        ["beat", "--loglevel", loglevel, "--scheduler", "rewardq.workers.schedule:SqlScheduler", "--max-interval", "1"]
    )


@click.group()
def keys() -> None:
    """API keys stored hashed in SQL (they switch authentication on)."""


@keys.command("create")
@click.argument("tenant")
@click.option("--admin", is_flag=True, help="an admin key: imports shared models and sets the default version")
def keys_create(tenant: str, admin: bool) -> None:
    """Make a key for TENANT and print it once: only its SHA-256 is stored."""
    from rewardq.storage.db import session_scope
    from rewardq.storage.keys import create_key
    from rewardq.storage.settings import TENANT_RULE, valid_tenant

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
    from rewardq.storage.db import session_scope
    from rewardq.storage.keys import list_keys

    with session_scope() as s:
        echo_json(
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


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key whose prefix `rewardq keys list` shows. Revoking the last key locks the API (unless
    REWARDQ_ALLOW_ANONYMOUS=1); it never opens it."""
    from rewardq.storage.db import session_scope
    from rewardq.storage.keys import revoke_key

    with session_scope() as s:
        revoked = revoke_key(s, prefix=prefix)
    if revoked is None:
        raise click.ClickException(f"no unrevoked key has the prefix {prefix!r} (see `rewardq keys list`)")
    click.echo(f"revoked the key {prefix} of tenant {revoked!r}", err=True)


@click.group()
def db() -> None:
    """Database commands."""


@db.command()
def upgrade() -> None:
    """Apply migrations (and register the base model version)."""
    from rewardq.storage.migrate import upgrade as run_upgrade
    from rewardq.storage.settings import get_settings
    from rewardq.workers.registry import register_base_version

    run_upgrade()
    version = register_base_version()
    click.echo(f"database {get_settings().database_url} is at head; base model version {version}")


@click.command()
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="delete what ended or was added more than this many days ago  [default: REWARDQ_RETENTION_DAYS]",
)
def purge(days: float | None) -> None:
    """Run the retention purge once, to the end, on the database directly (beat runs it hourly when
    REWARDQ_RETENTION_DAYS is set): every tenant's jobs that ended (succeeded, failed, cancelled) and feedback older
    than that. Prints the rows deleted. Refused when REWARDQ_RETENTION_DAYS is 0 (keep everything) and no --days."""
    from dataclasses import asdict

    from rewardq.storage.settings import get_settings
    from rewardq.workers.retention import purge as run_purge

    days = days if days is not None else get_settings().retention_days
    if days <= 0:
        raise click.UsageError("REWARDQ_RETENTION_DAYS is 0 (keep everything): give --days N to purge anyway")
    out = asdict(run_purge(days, max_rows=None))
    out.pop("more")
    echo_json({"days": days, **out})


@click.command()
@click.option("--keep", is_flag=True, help="leave the demo's database and logs in ./demo-run")
@click.option("--limit", default=None, type=int, help="score only the first N sample pairs  [default: all]")
@click.option("--port", default=0, type=int, help="the demo API's port  [default: a free one]")
def demo(keep: bool, limit: int | None, port: int) -> None:
    """Start Redis (if needed), a worker and the API; score a sample; print a summary; stop everything."""
    from rewardq.api.demo import run_demo

    sys.exit(run_demo(keep=keep, limit=limit, api_port=port or None))


COMMANDS = [api, worker, beat, keys, db, purge, demo]
