"""rewardq proven from its wheel, as a team installs it into its own stack: the wheel holds one top-level module,
`rewardq`, and installed into a fresh venv with the newest transformers (and so Hugging Face's `kernels`) its
console scripts run the API and a worker from outside the repository and score a job; `python -m rewardq` does the
same from the repository root, where `import kernels` is still Hugging Face's. The Dockerfile builds its image from
the same wheel, by the same steps (no Docker engine runs here: the test reads the Dockerfile)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rewardq.api.procs import Proc, free_port, wait_for
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TORCH_SPEC = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)  # type: ignore[union-attr]
# The wheel is built, and installed with its server extra, by these commands here and in the Dockerfile.
BUILD = ["pip", "wheel", "--no-deps", "-w", "dist", "."]
EXTRA = "[server]"


def run(argv: list[str], timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{argv}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    # A copy of the tracked tree, so the build leaves nothing in the checkout.
    files = run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    run([sys.executable, "-m", *BUILD], cwd=src)
    (whl,) = (src / "dist").glob("rewardq-*.whl")
    return whl


def test_the_wheel_installs_one_top_level_module_with_its_data(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rewardq"}
    for needed in (
        "rewardq/storage/migrations/env.py",
        "rewardq/storage/migrations/script.py.mako",
        "rewardq/client/samples/sample.jsonl",
        "rewardq/api/static/page.html",
        "rewardq/kernels/sim_exp.py",
    ):
        assert needed in names
    assert any(re.fullmatch(r"rewardq/storage/migrations/versions/0001_\w+\.py", n) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rewardq = rewardq.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv: torch as the Makefile installs it, then the wheel's server extra with the newest releases."""
    v = tmp_path_factory.mktemp("wheel-venv") / "v"
    run([sys.executable, "-m", "venv", str(v)])
    # --no-compile: no bytecode written at install (it is written on first import); torch's took 17 of its 24 s here.
    pip = [str(v / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    run([*pip, TORCH_SPEC])
    # Fresh: every dependency at its newest release, transformers and kernels asked for by name; torch stays the build
    # installed above (an eager upgrade would fetch another).
    run([*pip, f"{wheel}{EXTRA}", TORCH_SPEC, "--upgrade", "transformers", "kernels"])
    yield v
    shutil.rmtree(v, ignore_errors=True)  # over 2 GB


def _versions(v: Path) -> dict[str, str]:
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('transformers', 'kernels')}))"  # noqa: E501
    return json.loads(run([str(v / "bin" / "python"), "-c", code]).stdout)  # type: ignore[no-any-return]


def _score_a_job(v: Path, cwd: Path, rewardq: list[str], tmp: Path, worker: tuple[list[str], Path]) -> None:
    """db upgrade, a key and the API started by ``rewardq`` in ``cwd``, the worker by ``worker`` (its command and
    directory); a 12-pair job submitted and waited for."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "PATH": f"{v / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp),
        "REWARDQ_DATABASE_URL": f"sqlite:///{tmp / 'rq.db'}",
        "REWARDQ_REDIS_URL": TEST_REDIS_URL,
        "REWARDQ_SCORING_QUEUE": f"wheel-{tag}",
        "REWARDQ_TRAINING_QUEUE": f"wheel-{tag}-training",
        "REWARDQ_INTERACTIVE_QUEUE": f"wheel-{tag}-interactive",
        "REWARDQ_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "HF_HUB_OFFLINE": "1",
    }
    run([*rewardq, "db", "upgrade"], env=env, cwd=cwd)
    key = run([*rewardq, "keys", "create", "wheel"], env=env, cwd=cwd).stdout.strip().splitlines()[-1]
    port = free_port()
    env |= {"REWARDQ_API_KEY": key, "REWARDQ_API_URL": f"http://127.0.0.1:{port}"}
    procs: list[Proc] = []
    try:
        procs.append(Proc("worker", [*worker[0], "worker", "--pool", "solo"], env, tmp / "w.log", worker[1]))
        procs.append(Proc("api", [*rewardq, "api", "--port", str(port)], env, tmp / "api.log", cwd))
        probe = f"import urllib.request as u; u.urlopen('{env['REWARDQ_API_URL']}/healthz')"
        health = [str(v / "bin" / "python"), "-c", probe]
        wait_for(lambda: subprocess.run(health, capture_output=True).returncode == 0, 120, "api", procs[1].popen)
        pairs = tmp / "pairs.jsonl"
        lines = (json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) for i in range(12))
        pairs.write_text("".join(line + "\n" for line in lines))
        out = run([*rewardq, "submit", str(pairs), "--wait", "--timeout", "300"], env=env, cwd=cwd)
        job_id = out.stdout.splitlines()[0].strip()
        status = json.loads(run([*rewardq, "status", job_id], env=env, cwd=cwd).stdout)
        assert status["status"] == "succeeded" and status["progress"]["done"] == 12, status
        rows = run([*rewardq, "results", job_id], env=env, cwd=cwd).stdout.splitlines()
        assert len(rows) == 12 and all(json.loads(r)["score"] > 0 for r in rows)
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            print(f"--- {p.name} ---\n{p.tail(15)}")


def test_console_scripts_outside_the_repository_and_python_m_rewardq_in_it_score_a_job(venv: Path, tmp_path: Path):
    """The API and the CLI as console scripts from outside the repository; the worker, which imports transformers
    and so Hugging Face's `kernels`, as `python -m rewardq` from the repository root, where our source tree is on
    sys.path. One stack for both entry points: each starts the encoder, the suite's costliest step."""
    newest = _versions(venv)
    assert int(newest["transformers"].split(".")[0]) >= 5, newest  # the release that brought in `kernels`
    python = str(venv / "bin" / "python")
    where = run(
        [python, "-c", "import kernels; print(kernels.__file__); print(kernels.get_kernel.__module__)"], cwd=ROOT
    )
    path, module = where.stdout.split()
    assert Path(path).is_relative_to(venv) and module.startswith("kernels"), where.stdout  # Hugging Face's
    _score_a_job(venv, tmp_path, [str(venv / "bin" / "rewardq")], tmp_path, worker=([python, "-m", "rewardq"], ROOT))


def test_the_dockerfile_builds_its_image_from_the_same_wheel():
    docker = (ROOT / "Dockerfile").read_text()
    runs = " ".join(re.findall(r"^RUN (.+(?:\\\n.+)*)", docker, re.M)).replace("\\\n", " ")
    assert f"ARG TORCH_SPEC={TORCH_SPEC}" in docker
    assert " ".join(BUILD) in runs
    install = re.search(r"pip install (.*?)(&&|$)", runs[runs.index(" ".join(BUILD)) :]).group(1)  # type: ignore[union-attr]
    assert f"dist/rewardq-*.whl{EXTRA}" in install or f'"$(ls dist/rewardq-*.whl){EXTRA}"' in install, install
    assert "-c constraints.txt" in install  # the image takes the known-good versions
    copied = re.findall(r"^COPY (.+) \S+$", docker, re.M)
    assert any("rewardq" in c for c in copied) and any("constraints.txt" in c for c in copied)
    assert not re.search(r"^COPY (api|workers|storage|kernels)\b", docker, re.M)
    assert os.path.basename(str(ROOT / "constraints.txt")) in docker
