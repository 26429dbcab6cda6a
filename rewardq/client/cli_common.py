"""What every client command of the CLI shares: the connection options (accepted before or after the subcommand),
one-line errors that say what to do (a traceback only with --debug), printing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import httpx

from rewardq.client.client import DEFAULT_URL, Client, ClientError, PartialResults
from rewardq.client.formats import FormatError

F = TypeVar("F", bound=Callable[..., Any])


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            ctx.ensure_object(dict)[name] = value

    return callback


def connection(f: F) -> F:
    """--url, --api-key and --debug on a subcommand too (`rewardq submit FILE --url X`), as on the group."""
    f = click.option(
        "--debug", is_flag=True, expose_value=False, callback=_store("debug"), help="show the traceback of an error"
    )(f)
    f = click.option(
        "--api-key",
        default=None,
        expose_value=False,
        callback=_store("api_key"),
        help="bearer key  [env: REWARDQ_API_KEY]",
    )(f)
    f = click.option(
        "--url",
        default=None,
        expose_value=False,
        callback=_store("url"),
        help=f"API base URL  [env: REWARDQ_API_URL; default: {DEFAULT_URL}]",
    )(f)
    return f


class DefaultGroup(click.Group):
    """A group that runs its ``default`` subcommand when no subcommand is named: `rewardq feedback FILE` is
    `rewardq feedback add FILE`, as it was before `feedback delete` came."""

    def __init__(self, *args: Any, default: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not set(args) & {*self.commands, *ctx.help_option_names}:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def client(ctx: click.Context) -> Client:
    obj = ctx.ensure_object(dict)
    return Client(obj.get("url") or DEFAULT_URL, obj.get("api_key"), wait_for_api=False)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _api_error(exc: ClientError) -> str:
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {"detail": str(exc.body)[:500]}
    lines = [f"the API answered {exc.status}: {body.get('detail', '')}"]
    for err in (body.get("errors") or [])[1:6]:
        where = f"items[{err['index']}]." if err.get("index") is not None else ""
        lines.append(f"  {where}{err.get('field')}: {err.get('message')}")
    if exc.status == 401:
        lines.append("  give a key with --api-key or REWARDQ_API_KEY (rewardq keys create TENANT makes one)")
    return "\n".join(lines)


@contextmanager
def errors(ctx: click.Context) -> Iterator[None]:
    """Errors become a line or a few saying what went wrong and what to do; --debug keeps the traceback."""
    obj = ctx.ensure_object(dict)
    url = obj.get("url") or DEFAULT_URL
    try:
        yield
    except Exception as exc:
        if obj.get("debug"):
            raise
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            message = (
                f"cannot reach the rewardq API at {url} ({exc}).\n  Start it with `rewardq api`, or point "
                "--url (or REWARDQ_API_URL) at it."
            )
        elif isinstance(exc, httpx.TimeoutException):
            message = f"the API at {url} did not answer in time ({type(exc).__name__}); try again, or see its log"
        elif isinstance(exc, ClientError):
            message = _api_error(exc)
        elif isinstance(exc, PartialResults):
            message = (
                f"{exc}. Wait for it (rewardq status {exc.job_id}), or pass --partial to export what is scored so far."
            )
        elif isinstance(exc, FormatError | TimeoutError):
            message = str(exc)
        elif isinstance(exc, click.ClickException):
            raise
        else:
            message = f"{type(exc).__name__}: {exc} (--debug shows where)"
        raise click.ClickException(message) from exc
