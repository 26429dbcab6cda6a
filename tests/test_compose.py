"""docker-compose.yml cannot run here (no Docker engine), so check that it matches the code it starts."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from rewardq.cli import main
from rewardq.storage.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _parse(cmd: click.Command, args: list[str], parent: click.Context | None = None) -> None:
    """Parse ``args`` against the click command tree the way the console script would, without running it."""
    ctx = cmd.make_context(cmd.name or "rewardq", list(args), parent=parent)
    if isinstance(cmd, click.Group):
        name, *rest = ctx.protected_args + ctx.args
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"unknown rewardq subcommand {name!r}"
        _parse(sub, rest, ctx)


def test_services_exist_and_worker_reserves_a_gpu():
    services = COMPOSE["services"]
    assert {"redis", "postgres", "api", "worker", "beat"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_commands_and_settings_match_the_code(name: str):
    svc = COMPOSE["services"][name]
    cmd = svc.get("command")
    if isinstance(cmd, list) and cmd and cmd[0] == "rewardq":
        _parse(main, cmd[1:])
    fields = {f"REWARDQ_{f.upper()}" for f in Settings.model_fields}
    for key, value in (svc.get("environment") or {}).items():
        if key.startswith("REWARDQ_"):
            assert key in fields, f"{name}: {key} is not a setting"
            if "${" not in str(value):
                Settings(**{key.removeprefix("REWARDQ_").lower(): value})  # the value validates


def test_dockerfile_copies_the_one_package():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY rewardq ./rewardq" in text  # api, workers, storage, kernels and the client are inside it


def test_settings_normalise_and_validate():
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    k1, k2 = "1" * 32, "2" * 40
    assert Settings(api_keys=f"a:{k1}, b:{k2}:admin").api_key_map() == {k1: ("a", False), k2: ("b", True)}
    for bad in ("nokey", f"a:{k1}:root", f"a:{k1}:admin:x", f"a b:{k1}", f":{k1}", "a:" + "k" * 31):
        with pytest.raises(ValueError):
            Settings(api_keys=bad).api_key_map()
    with pytest.raises(ValueError):
        Settings(redis_url="http://localhost")
