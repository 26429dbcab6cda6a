"""Run Alembic migrations programmatically (``rewardq db upgrade``), no alembic.ini needed."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from rewardq.storage.settings import get_settings

_MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    # ConfigParser interpolation would eat a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


UPGRADE_HINT = "run `rewardq db upgrade`"
_migrated: set[str] = set()  # URLs found at the head revision (a database does not go back by itself)


def unmigrated(url: str | None = None) -> str | None:
    """Why the database at ``url`` is not ready for this version of rewardq (not migrated, or behind), saying to run
    `rewardq db upgrade`; None when it is at the head revision, or cannot be reached (that error speaks for itself)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.exc import SQLAlchemyError

    from rewardq.storage.db import get_engine

    url = url or get_settings().database_url
    if url in _migrated:
        return None
    scripts = _scripts()
    head = scripts.get_current_head()
    try:
        with get_engine(url).connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError:
        return None
    if current == head:
        _migrated.add(url)
        return None
    if current is None:
        return f"the database has no rewardq tables: {UPGRADE_HINT}"
    try:
        scripts.get_revision(current)
    except Exception:  # a revision this release does not know: a newer rewardq migrated it
        return f"the database is at migration {current}, which this rewardq does not know: run the newer rewardq"
    return f"the database is at migration {current}, this rewardq needs {head}: {UPGRADE_HINT}"


@lru_cache(maxsize=1)
def _scripts() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))
