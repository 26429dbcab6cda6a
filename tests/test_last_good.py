"""rewardq.api.last_good: a scoring request's lookups answered from the last good read while the database is out
of reach, within REWARDQ_SCORE_STALE_S, and never otherwise. The database here is a real PostgreSQL URL whose port
refuses connections (the driver's own OperationalError); the end-to-end case, a real cut under a real API and worker,
is tests/test_faults.py::test_postgresql_unreachable_for_a_while_mid_job."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from rewardq.api import last_good
from rewardq.api.procs import free_port


@pytest.fixture()
def down() -> Iterator[Session]:
    """A session on a PostgreSQL address where nothing listens."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none?connect_timeout=2")
    with Session(engine) as session:
        yield session
    engine.dispose()


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    last_good.forget()
    yield
    last_good.forget()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_last_answer_is_served_while_the_database_is_down_and_only_within_its_age(down, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(last_good.time, "monotonic", clock)
    assert last_good.read(down, ("version", "t1", None), lambda: "v1", 30) == "v1"
    unreachable = lambda: down.execute(text("SELECT 1")).scalar()  # noqa: E731

    clock.now += 29
    assert last_good.read(down, ("version", "t1", None), unreachable, 30) == "v1"
    # Another key (another tenant, another version) was never read here: the error, as before.
    with pytest.raises(OperationalError):
        last_good.read(down, ("version", "t2", None), unreachable, 30)
    clock.now += 2  # 31 s since the last good read
    with pytest.raises(OperationalError):
        last_good.read(down, ("version", "t1", None), unreachable, 30)


def test_a_healthy_database_is_always_read_and_zero_turns_it_off(down, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(last_good.time, "monotonic", clock)
    assert last_good.read(down, "k", lambda: "old", 30) == "old"
    assert last_good.read(down, "k", lambda: "new", 30) == "new"  # never the remembered answer while it answers
    unreachable = lambda: down.execute(text("SELECT 1")).scalar()  # noqa: E731
    assert last_good.read(down, "k", unreachable, 30) == "new"
    with pytest.raises(OperationalError):
        last_good.read(down, "k", unreachable, 0)
    # Errors other than an unreachable database are never hidden, and the database's own answer (a version gone)
    # forgets what was kept.
    clock.now += last_good.OUTAGE_HOLD_S + 0.1
    with pytest.raises(ZeroDivisionError):
        last_good.read(down, "k", lambda: 1 / 0, 30)
    with pytest.raises(OperationalError):
        last_good.read(down, "k", unreachable, 30)


def test_an_error_of_a_database_that_answers_is_not_an_outage(monkeypatch):
    """A statement timeout, a deadlock or a locked SQLite file: the database answered. The error is raised as it
    is, and what was kept for the key goes; a refused connection, a cut one or an admin shutdown is an outage."""
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    with Session(engine) as session:
        assert last_good.read(session, "v", lambda: "v1", 30) == "v1"
        locked = OperationalError("UPDATE", {}, __import__("sqlite3").OperationalError("database is locked"))
        assert not last_good.unreachable(locked)

        def raise_locked() -> str:
            raise locked

        with pytest.raises(OperationalError):
            last_good.read(session, "v", raise_locked, 30)

        class PgError(Exception):
            def __init__(self, sqlstate: str | None) -> None:
                self.sqlstate = sqlstate

        for state, out in ((None, True), ("08006", True), ("57P01", True), ("57014", False), ("40P01", False)):
            assert last_good.unreachable(OperationalError("SELECT", {}, PgError(state))) is out, state
    engine.dispose()


def test_after_an_outage_kept_answers_are_served_without_asking_again(down, monkeypatch):
    """On a silent network cut each ask waits for its connect timeout; a request makes several. For OUTAGE_HOLD_S
    after an unreachable error, a lookup with a kept answer takes it without asking; one without asks."""
    clock = Clock()
    monkeypatch.setattr(last_good.time, "monotonic", clock)
    asked: list[str] = []

    def unreachable() -> str:
        asked.append("db")
        return down.execute(text("SELECT 1")).scalar()  # type: ignore[no-any-return]

    last_good.read(down, "a", lambda: "A", 30)
    last_good.read(down, "b", lambda: "B", 30)
    assert last_good.read(down, "a", unreachable, 30) == "A" and asked == ["db"]
    clock.now += 1
    assert last_good.read(down, "b", unreachable, 30) == "B" and asked == ["db"]  # held: not asked
    with pytest.raises(OperationalError):
        last_good.read(down, "c", unreachable, 30)  # nothing kept: asked
    assert asked == ["db", "db"]
    clock.now += last_good.OUTAGE_HOLD_S
    assert last_good.read(down, "b", lambda: "B2", 30) == "B2"  # the hold is over: the database is asked again


def test_a_key_that_stops_resolving_is_forgotten_at_once(down, monkeypatch):
    """A revoked key's lookup answers None: its earlier good answer is dropped then, not served in the next outage;
    and None answers take no room (made-up keys cannot push the real ones out)."""
    unreachable = lambda: down.execute(text("SELECT 1")).scalar()  # noqa: E731
    assert last_good.read(down, ("key", "h1"), lambda: ("alice", False), 30) == ("alice", False)
    assert last_good.read(down, ("key", "h1"), lambda: None, 30) is None  # revoked
    with pytest.raises(OperationalError):
        last_good.read(down, ("key", "h1"), unreachable, 30)
    for i in range(5000):
        last_good.read(down, ("key", f"made-up-{i}"), lambda: None, 30)
    assert last_good.read(down, ("key", "h2"), lambda: ("bob", True), 30) == ("bob", True)
    assert last_good.read(down, ("key", "h2"), unreachable, 30) == ("bob", True)
    assert len(last_good._store) == 2  # h2, and h1's marker: the made-up keys took no room


def test_a_slow_read_from_before_a_revocation_cannot_bring_the_key_back(down, monkeypatch):
    """Two requests of one key: the first reads before the revocation and stores after the second (which read
    "revoked"). Forced: the first's fetch runs the second's whole read inside it."""
    clock = Clock()
    monkeypatch.setattr(last_good.time, "monotonic", clock)
    last_good.read(down, "k", lambda: ("alice", False), 30)

    def slow_then_late() -> tuple[str, bool]:
        clock.now += 1
        assert last_good.read(down, "k", lambda: None, 30) is None  # the revocation, read meanwhile
        clock.now += 1
        return ("alice", False)  # what the slow read saw before it

    assert last_good.read(down, "k", slow_then_late, 30) == ("alice", False)
    with pytest.raises(OperationalError):
        last_good.read(down, "k", lambda: down.execute(text("SELECT 1")).scalar(), 30)


def test_readers_get_copies(down):
    stats = {"mean": 1.0}
    last_good.read(down, "s", lambda: stats, 30)
    stats["mean"] = 99.0  # the first reader changes its answer
    kept = last_good._remembered("s", 30)[1]
    assert kept == {"mean": 1.0}
    kept["mean"] = 5.0
    assert last_good._remembered("s", 30)[1] == {"mean": 1.0}
