"""Start and stop rewardq's own processes (Redis when missing, a worker, the API): used by the demo and tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class Proc:
    """A child process in its own process group, so stop() takes its whole tree down."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log, "ab")
        self.popen = subprocess.Popen(argv, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # whatever is left of the group (prefork children included)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_redis(port: int, log: Path) -> Proc | None:
    """A throwaway redis-server without persistence, or None when redis-server is not installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = Proc("redis", argv, os.environ, log)
    wait_for(lambda: redis_answers(f"redis://127.0.0.1:{port}/0"), 15, "redis-server", proc.popen)
    return proc


def start_worker(env: Mapping[str, str], log: Path, queues: str | None = None, concurrency: int = 1,
                 pool: str = "prefork") -> Proc:  # fmt: skip
    """`rewardq worker`: ``queues`` None consumes what its settings name (interactive, scoring, training)."""
    argv = [sys.executable, "-m", "rewardq", "worker", *(["-Q", queues] if queues else []), "-c", str(concurrency),
            "--pool", pool, "--loglevel", "info"]  # fmt: skip
    return Proc("worker", argv, env, log)


def start_beat(env: Mapping[str, str], log: Path) -> Proc:
    """`rewardq beat`: the retraining schedules and the sweeper."""
    return Proc("beat", [sys.executable, "-m", "rewardq", "beat", "--loglevel", "info"], env, log)


def start_api(env: Mapping[str, str], log: Path, port: int) -> Proc:
    import httpx

    argv = [sys.executable, "-m", "rewardq", "api", "--host", "127.0.0.1", "--port", str(port)]
    proc = Proc("api", argv, env, log)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "api", proc.popen)
    return proc
