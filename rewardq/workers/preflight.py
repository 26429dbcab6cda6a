"""A worker's start-up check that it can load the model it serves (the default version), before it takes any work.

It runs in a child process (``python -m rewardq.workers.preflight VERSION``), as the kernel check does: a worker about
to fork its pool never initialises CUDA itself, and what the load takes (host and GPU memory) goes when the child
exits. A failure at load is the worker's, not the work's: the worker says why and exits, and the queue keeps the work
for a worker that can score it."""

from __future__ import annotations

import os
import subprocess
import sys

from rewardq.workers.errors import ModelLoadFailed

CANNOT_LOAD = 3  # the child's exit status when the model does not load (any other failure is not the model's)


def check(version: str, timeout_s: float = 900) -> tuple[bool, str]:
    """(loads, what the child said): loads is False only when ``version`` fails to load here. A child that fails
    otherwise (the database, a timeout) says why with loads True: the worker warns and starts, its tasks retry."""
    # The same rewardq as this process, whatever the directory (-P: the working directory is not put first on the
    # path; .env is still read from it).
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-P", "-m", "rewardq.workers.preflight", version]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return True, f"the load check took over {timeout_s:.0f} s"
    said = [line for line in done.stdout.splitlines() if line.startswith("cannot load: ")]
    if done.returncode == CANNOT_LOAD and said:
        return False, said[-1].removeprefix("cannot load: ")
    if done.returncode == 0:
        return True, ""
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return True, f"the load check failed ({tail[-300:]})"


def main(version: str) -> int:
    from rewardq.workers import engine

    try:
        engine.get_model(version)
    except ModelLoadFailed as exc:
        cause = exc.__cause__
        print(f"cannot load: {type(cause).__name__}: {cause}" if cause else f"cannot load: {exc}", flush=True)
        return CANNOT_LOAD
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
