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


def check(version: str, timeout_s: float = 900) -> str | None:
    """None when ``version`` loads on this machine, else why it does not (the child's last words)."""
    argv = [sys.executable, "-m", "rewardq.workers.preflight", version]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return f"loading it took over {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    said = [line for line in done.stdout.splitlines() if line.startswith("cannot load: ")]
    if said:
        return said[-1].removeprefix("cannot load: ")
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return f"the check died ({tail[-300:]})"


def main(version: str) -> int:
    from rewardq.workers import engine

    try:
        engine.get_model(version)
    except ModelLoadFailed as exc:
        cause = exc.__cause__
        print(f"cannot load: {type(cause).__name__}: {cause}" if cause else f"cannot load: {exc}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
