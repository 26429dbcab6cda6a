"""Real services for the tests: Redis, PostgreSQL (a throwaway database), SQLite, worker subprocesses.

Locally a missing service skips the tests that need it; under CI=true it fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before anything imports triton or reads settings.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RUN_ID = uuid.uuid4().hex[:8]
POISON = "<<rewardq-test-poison>>"  # workers under test fail any text that contains it
# `make test` runs the suite in two processes (pytest-xdist, one per core): each takes a Redis database of its own
# (gw0 15, gw1 14, ...), so its queues, heartbeats, metrics and lane shares are its own, as its PostgreSQL database
# (RUN_ID) and SQLite files are.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_REDIS_DB = 15 - int(XDIST_WORKER[2:] or 0) if XDIST_WORKER.startswith("gw") else 15
# And one OpenMP thread per process, in this process and every process a test starts (they inherit it): two test
# processes, each with a thread per core, plus the worker processes their tests start, spin against each other on
# two cores. Measured here: two processes encoding at once made 48 texts/s each with 2 threads, 95 with 1.
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_REDIS_URL = os.environ.get("REWARDQ_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_REDIS_DB}")
TEST_PG_ADMIN_URL = os.environ.get("REWARDQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
os.environ["REWARDQ_REDIS_URL"] = TEST_REDIS_URL
os.environ["REWARDQ_DATABASE_URL"] = "sqlite:///:memory:"  # each test picks its own database below
# The suite's servers listen on loopback and most tests call them without a key, as `make demo` does; the request
# and failed-authentication limits would count across tests from one address. Tests that check those defaults
# (tests/test_security.py) set them explicitly.
os.environ["REWARDQ_ALLOW_ANONYMOUS"] = "1"
os.environ["REWARDQ_RATE_LIMIT_PER_MINUTE"] = "0"
os.environ["REWARDQ_AUTH_FAILURES_PER_MINUTE"] = "0"

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rewardq.api.procs import free_port, redis_answers, start_api, start_worker  # noqa: E402
from tests.support import SECRET, Live, Stack, need  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> str:
    need(redis_answers(TEST_REDIS_URL), f"Redis at {TEST_REDIS_URL}")
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import psycopg

    try:
        admin = psycopg.connect(TEST_PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error:
        need(False, f"PostgreSQL at {TEST_PG_ADMIN_URL}")
        raise
    name = f"rewardq_test_{RUN_ID}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = TEST_PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        from rewardq.storage.db import get_engine

        get_engine(f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)).dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def migrated(url: str) -> str:
    from rewardq.storage.migrate import upgrade
    from rewardq.workers.registry import register_base_version

    upgrade(url)
    os.environ["REWARDQ_DATABASE_URL"] = url
    _reset_settings()
    register_base_version()
    return url


def _reset_settings() -> None:
    from rewardq.storage.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated database with the base model version registered, on each backend."""
    if request.param == "sqlite":
        return migrated(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'rewardq.db'}")
    return migrated(request.getfixturevalue("pg_url"))


def make_client(db: str, queue: str, training_queue: str | None = None, **extra: object) -> TestClient:
    from rewardq.api.main import create_app
    from rewardq.storage.settings import Settings, get_settings

    extra.setdefault("interactive_queue", f"{queue}-interactive")
    settings = Settings(
        database_url=db,
        redis_url=TEST_REDIS_URL,
        scoring_queue=queue,  # type: ignore[arg-type]
        training_queue=training_queue or f"{queue}-training",
        **extra,
    )
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


@pytest.fixture()
def api(db_url: str, redis_url: str) -> Iterator[TestClient]:
    """The API in-process over ``db_url``; its queue has no worker (for validation tests)."""
    import redis

    queue = f"test-idle-{RUN_ID}"
    from tests.support import delete_queue

    with make_client(db_url, queue) as client:
        yield client
    delete_queue(redis.Redis.from_url(redis_url), queue)


def worker_env(db: str, queue: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"REWARDQ_DATABASE_URL": db, "REWARDQ_REDIS_URL": TEST_REDIS_URL, "REWARDQ_SCORING_QUEUE": queue, **extra}
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def stack(db_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API in-process plus a real Celery worker subprocess, per backend.

    The SQLite worker runs the Triton kernel under the interpreter, the PostgreSQL one the
    torch reference, so both kernel paths serve real jobs.
    """
    backend = db_url.split(":", 1)[0].split("+")[0]
    queue = f"test-{backend}-{RUN_ID}"
    training_queue = f"{queue}-training"
    kernel = "triton" if backend == "sqlite" else "torch"
    artifacts = str(tmp_path_factory.mktemp(f"artifacts-{backend}"))
    interactive = f"{queue}-interactive"
    env = worker_env(
        db_url,
        queue,
        REWARDQ_KERNEL=kernel,
        TRITON_INTERPRET="1",
        REWARDQ_TRAINING_QUEUE=training_queue,
        REWARDQ_INTERACTIVE_QUEUE=interactive,
        REWARDQ_ARTIFACTS_DIR=artifacts,
        REWARDQ_FAULT_POISON_MARKER=POISON,
    )
    log = tmp_path_factory.mktemp("logs") / f"worker-{backend}.log"
    worker = start_worker(env, log, queues=f"{interactive},{queue},{training_queue}")
    try:
        with make_client(db_url, queue, training_queue, artifacts_dir=artifacts) as client:
            yield Stack(db_url, queue, client, worker, env)
    finally:
        worker.stop()
        print(f"--- worker log ({backend}) ---\n{worker.tail(20)}")


@pytest.fixture(scope="module")
def live(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A uvicorn API process over the stack (its database, queues and worker), keyed for tenant 'live'."""
    port = free_port()
    proc = start_api(
        {**stack.env, "REWARDQ_API_KEYS": f"live:{SECRET}"}, tmp_path_factory.mktemp("api") / "api.log", port
    )
    try:
        yield Live(f"http://127.0.0.1:{port}", proc, stack)
    finally:
        proc.stop()


class Ledger:
    """Faults injected and bad inputs tried, with their outcomes: written to docs/reliability.md at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, kind: str, what: str, backend: str, outcome: str) -> None:
        self.rows.append((kind, what, backend, outcome))


LEDGER_HEADER = [
    "# Reliability: faults injected and bad inputs tried",
    "",
    "Written by the test suite (`tests/test_reliability.py`, `tests/test_faults.py`, `tests/test_fuzz.py`);",
    "every row is an assertion that passed.",
    "",
    "| kind | injected or sent | databases | outcome |",
    "|---|---|---|---|",
]


def write_reliability(rows: list[tuple[str, str, str, str]]) -> None:
    """docs/reliability.md from the ledger's rows (of every process of the run)."""
    if not rows:
        return
    backends: dict[tuple[str, str, str], set[str]] = {}
    for k, w, b, o in rows:
        backends.setdefault((k, w, o), set()).add(b)
    lines = LEDGER_HEADER + [
        f"| {k} | {w} | {', '.join(sorted(backends[(k, w, o)]))} | {o} |" for k, w, o in sorted(backends)
    ]
    campaign = ROOT / "benchmarks" / "results" / "fault_campaign.md"  # the full campaign's last run (tests/campaign.py)
    if campaign.exists():
        lines += ["", "## The fault campaign", "", campaign.read_text().rstrip()]
    path = ROOT / "docs" / "reliability.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


_LEDGER_DIR: list[str] = []  # in pytest-xdist's controller: where its workers leave their ledger rows


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist's controller, per worker: the folder it leaves its rows in (merged in pytest_sessionfinish)."""
    if not _LEDGER_DIR:
        _LEDGER_DIR.append(tempfile.mkdtemp(prefix="rewardq-ledger-"))
    node.workerinput["ledger_dir"] = _LEDGER_DIR[0]


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _LEDGER_DIR:  # a plain run (its fixture wrote the page), or a worker
        return
    folder = _LEDGER_DIR[0]
    rows: list[tuple[str, str, str, str]] = []
    for part in sorted(Path(folder).glob("*.json")):
        rows += [tuple(r) for r in json.loads(part.read_text())]  # type: ignore[misc]
    shutil.rmtree(folder, ignore_errors=True)
    write_reliability(rows)


@pytest.fixture(scope="session")
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    book = Ledger()
    yield book
    folder = getattr(request.config, "workerinput", {}).get("ledger_dir")
    if folder is None:
        write_reliability(book.rows)
    else:
        (Path(folder) / f"{XDIST_WORKER or 'main'}.json").write_text(json.dumps(book.rows))


# The suite's files, heaviest first (seconds, summed over their tests, in a two-process run on this 2-core machine):
# pytest-xdist's --dist loadfile hands files out in collection order, each to the first process free, so the long
# ones start first and the short ones fill in at the end, instead of one long file starting last and running alone.
HEAVY_FIRST = ("test_faults", "test_benchmarks", "test_interactive", "test_wheel", "test_pipeline", "test_trainer",
               "test_retraining", "test_dashboard", "test_campaign", "test_cli", "test_pipeline_kinds",
               "test_selfcheck", "test_multihost", "test_worker_scope", "test_reliability", "test_rlhf_loop",
               "test_ensembles", "test_lane_share")  # fmt: skip
BOTH_BACKENDS = os.environ.get("REWARDQ_TEST_BOTH_BACKENDS", "") == "1"


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture, which this keeps within each file
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heaviest files first (HEAVY_FIRST), and a test marked ``one_backend(name)`` on that database only unless
    REWARDQ_TEST_BOTH_BACKENDS=1: long end-to-end flows whose subject is the workers, not the database, which the
    rest of the suite runs on both."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept
    if BOTH_BACKENDS:
        return
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("one_backend")
        params = getattr(item, "callspec", None)
        backend = params.params.get("db_url") if params is not None else None
        (drop if mark is not None and backend is not None and backend != mark.args[0] else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
