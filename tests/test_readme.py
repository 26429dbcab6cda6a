"""The README's "Using it" block, pasted into one bash session line by line, as a user would: only the port, the
sample's and the venv's paths and the job id the submit printed are substituted. Each line's output is checked."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewardq.api.procs import free_port
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = "rewardq/client/samples/sample.jsonl"

# What each step must print (a regular expression over its output), keyed by the start of the README line. NOTHING:
# the line prints nothing at all (a warning, an error or a usage text fails it).
NOTHING = r"\A\Z"
EXPECT = {
    "source": NOTHING,
    "export REWARDQ_API_KEY": r"\Akey for tenant 'me': store it now, it is not shown again\n\Z",  # stderr only
    "export": NOTHING,
    "rewardq db upgrade": r"is at head; base model version base-",
    "rewardq worker": NOTHING,
    "rewardq api": NOTHING,
    "until curl": NOTHING,
    "rewardq submit": r"(?s)\b[0-9a-f]{32}\b.*\"status\": \"succeeded\".*\"done\": 40",
    "rewardq jobs": r"succeeded\s+40/40",
    "rewardq results": r"wrote 40 rows to scores.csv",
    "rewardq feedback": r"\"added\": 40",
    "rewardq retrain": r"version ft-[0-9a-f]{12} (promoted|rejected)",
    "rewardq models": r"\"active\": \"(base|ft)-",
    "kill": NOTHING,
}


def using_it_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- using-it -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


class Shell:
    """One bash process fed a line at a time; each line's output is read up to a marker with its exit code."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            ["bash"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=env,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def run(self, command: str, n: int, timeout: float = 600) -> tuple[int, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\necho @@RC{n} $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{command!r} printed no end after {timeout}s: {''.join(out)[-2000:]}") from None
            if line.startswith(f"@@RC{n} "):
                return int(line.split()[1]), "".join(out)
            out.append(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_the_readme_using_it_lines_run_as_written(tmp_path: Path):
    lines = using_it_block()
    assert [next(k for k in EXPECT if line.startswith(k)) for line in lines]  # every line has an expectation
    port = free_port()
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "REWARDQ_REDIS_URL": TEST_REDIS_URL,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # queues of their own on the tests' Redis: nothing else's workers take this test's work
        **{f"REWARDQ_{q}_QUEUE": f"readme-{tag}-{q.lower()}" for q in ("SCORING", "INTERACTIVE", "TRAINING")},
    }
    # A newcomer's shell: none of the suite's settings (anonymous use included) leak into it.
    for name in (
        "REWARDQ_DATABASE_URL",
        "REWARDQ_API_URL",
        "REWARDQ_API_KEY",
        "REWARDQ_API_KEYS",
        "REWARDQ_ALLOW_ANONYMOUS",
        "REWARDQ_RATE_LIMIT_PER_MINUTE",
        "REWARDQ_AUTH_FAILURES_PER_MINUTE",
    ):
        env.pop(name, None)
    shell = Shell(tmp_path, env)
    job_id = ""
    try:
        for n, line in enumerate(lines):
            command = (
                line.replace("8000", str(port))
                .replace("source .venv/bin/activate", f"source {Path(sys.prefix) / 'bin' / 'activate'}")
                .replace(SAMPLE, str(ROOT / SAMPLE))
                .replace(" JOB ", f" {job_id[:8]} ")
            )
            rc, out = shell.run(command, n)
            key = next(k for k in EXPECT if line.startswith(k))
            assert rc == 0, f"{line!r} exited {rc}:\n{out[-3000:]}"
            assert re.search(EXPECT[key], out), f"{line!r} printed:\n{out[-3000:]}"
            if key == "rewardq submit":
                job_id = re.findall(r"\b[0-9a-f]{32}\b", out)[0]
        assert len((tmp_path / "scores.csv").read_text().splitlines()) == 41  # a header and 40 rows
    finally:
        for log in ("worker.log", "api.log"):
            if (tmp_path / log).exists():
                print(f"--- {log} ---\n" + "\n".join((tmp_path / log).read_text().splitlines()[-15:]))
        shell.run("kill %1 %2 2>/dev/null; wait", 99, timeout=60) if shell.proc.poll() is None else None
        shell.close()
