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
    # Errors other than an unreachable database are never hidden.
    with pytest.raises(ZeroDivisionError):
        last_good.read(down, "k", lambda: 1 / 0, 30)


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
    assert len(last_good._store) == 1
