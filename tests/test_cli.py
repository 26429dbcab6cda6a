"""The first hour with the CLI, run for real against a live API (or none): errors that say what to do, options after
the subcommand, short ids, honest partial exports, format detection, the verbs and their help, comparable scores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rewardq.api.procs import free_port
from tests.support import SECRET, Live

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def rewardq(
    *args: str, url: str | None = None, key: str | None = SECRET, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd or ROOT)}
    if url:
        env["REWARDQ_API_URL"] = url
    if key:
        env["REWARDQ_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "rewardq", *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )


def _pairs(path: Path, n: int, tag: str = "") -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"i{i}", "prompt": f"question {i} {tag}", "response": f"answer {i}"}) + "\n"
            for i in range(n)
        )
    )
    return path


def test_no_api_is_one_line_naming_the_url_and_the_setting(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    out = rewardq("submit", str(_pairs(tmp_path / "p.jsonl", 3)), "--wait", "--url", url, key=None)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"cannot reach the rewardq API at {url}" in out.stderr and "REWARDQ_API_URL" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3
    debug = rewardq("--debug", "status", "abcdef12", "--url", url, key=None)
    assert "Traceback" in debug.stderr  # --debug keeps it


def test_the_cli_says_no_api_at_once_and_rides_out_a_restart_once_it_has_reached_one(monkeypatch: pytest.MonkeyPatch):
    """A refused connection before the API ever answered is said at once: a newcomer whose API is not started waited
    15 s of backoff (5 retries) for the one line above. Once the API has answered, a refused connection is a restart
    and is retried with backoff, as before. No timing: the backoff sleeps are counted."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from rewardq.client.client import FirstContactTransport

    slept: list[float] = []
    monkeypatch.setattr("httpx_retries.retry.time.sleep", slept.append)

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=FirstContactTransport(5)) as c:
        with pytest.raises(httpx.ConnectError):
            c.get("/healthz")
        assert slept == []  # said at once
        server = ThreadingHTTPServer(("127.0.0.1", port), Ok)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        assert c.get("/healthz").status_code == 200  # it answered once ...
        server.shutdown()
        server.server_close()
        with pytest.raises(httpx.ConnectError):
            c.get("/healthz")  # ... so a refusal now is retried with backoff before it is said
        assert len(slept) == 5, slept


@pytest.mark.one_backend("sqlite")  # the CLI's parsing and output; the API's storage runs on both elsewhere
def test_options_after_the_subcommand_short_ids_and_status(live: Live, tmp_path: Path):
    out = rewardq("submit", str(_pairs(tmp_path / "p.jsonl", 5, "short")), "--wait", "--url", live.url)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    summary = json.loads("\n".join(out.stdout.splitlines()[1:]))
    assert summary["status"] == "succeeded" and summary["progress"]["done"] == 5
    status = rewardq("status", job_id[:8], url=live.url)  # the bar shows the start of the id: it resolves
    assert status.returncode == 0 and json.loads(status.stdout)["job_id"] == job_id
    listed = rewardq("jobs", "--limit", "50", url=live.url).stdout
    assert job_id in listed and "succeeded" in listed
    assert "job" in rewardq("status", "ffffffff", url=live.url).stderr  # not found: one line from the API
    bad_key = rewardq("jobs", url=live.url, key="nope")
    assert bad_key.returncode == 1 and "401" in bad_key.stderr and "--api-key" in bad_key.stderr
    # A job that ended before the bar appeared: no rate of millions of pairs a second.
    again = rewardq("status", job_id, "--wait", url=live.url)
    rates = [float(x) for x in re.findall(r"([\d.]+)pair/s", again.stderr)]
    assert again.returncode == 0 and all(r < 10_000 for r in rates), again.stderr
    assert "Loading weights" not in live.stack.worker.log_path.read_text()  # no progress bar in the worker's log


def test_results_of_an_unfinished_job_are_refused_unless_partial(live: Live, tmp_path: Path):
    import signal

    live.stack.worker.kill(signal.SIGSTOP)  # the job cannot finish while the test looks at it
    try:
        out = rewardq("submit", str(_pairs(tmp_path / "p.jsonl", 30, "partial")), url=live.url)
        job_id = out.stdout.strip()
        refused = rewardq("results", job_id, "-o", str(tmp_path / "r.csv"), "--format", "csv", url=live.url)
        assert refused.returncode == 1 and "0 of 30 items scored" in refused.stderr and "--partial" in refused.stderr
        assert not (tmp_path / "r.csv").exists()
        ok = rewardq("results", job_id, "-o", str(tmp_path / "r.jsonl"), "--partial", url=live.url)
        assert ok.returncode == 0 and "wrote 0 rows" in ok.stderr
        last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
        assert last == {"partial": True, "status": "queued", "done": 0, "failed": 0, "total": 30}
        assert rewardq("cancel", job_id[:10], url=live.url).stdout.startswith(f"job {job_id} cancelled")
    finally:
        live.stack.worker.kill(signal.SIGCONT)
    out = rewardq("submit", str(_pairs(tmp_path / "q.jsonl", 50, "rows")), "--wait", url=live.url)
    job_id = out.stdout.splitlines()[0].strip()
    done = rewardq("results", job_id, "--format", "csv", "-o", str(tmp_path / "q.csv"), url=live.url)
    assert "wrote 50 rows" in done.stderr  # the row count, not the line count
    import csv

    rows = list(csv.DictReader((tmp_path / "q.csv").open()))
    assert len(rows) == 50 and all(0 <= float(r["percentile"]) <= 100 and r["score_z"] for r in rows)


def test_formats_are_detected_and_others_refused_naming_what_is_accepted(live: Live, tmp_path: Path):
    items = [{"id": f"a{i}", "prompt": f"p {i}", "response": f"r {i}"} for i in range(4)]
    (tmp_path / "pretty.json").write_text(json.dumps(items, indent=2))
    (tmp_path / "one-line-array.jsonl").write_text(json.dumps(items) + "\n")
    (tmp_path / "pairs.csv").write_text("id,prompt,response\n" + "".join(f"c{i},p {i},r {i}\n" for i in range(4)))
    for name in ("pretty.json", "one-line-array.jsonl", "pairs.csv"):
        out = rewardq("submit", str(tmp_path / name), "--wait", url=live.url)
        assert out.returncode == 0, (name, out.stderr)
    (tmp_path / "notes.md").write_text("# not data\n")
    out = rewardq("submit", str(tmp_path / "notes.md"), url=live.url)
    assert out.returncode == 1 and "JSON Lines, a JSON array, CSV, Parquet" in out.stderr
    assert "Traceback" not in out.stderr
    feedback = tmp_path / "feedback.json"  # a JSON list, as POST /v1/feedback takes
    feedback.write_text(json.dumps([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 3, indent=1))
    out = rewardq("feedback", str(feedback), url=live.url)
    assert out.returncode == 0 and json.loads(out.stdout)["added"] == 3


def test_every_option_of_every_verb_has_help_and_shows_its_default():
    import click

    from rewardq.cli import main

    def walk(cmd: click.Command, path: str) -> None:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{path} {param.opts[0]} has no help"
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "rewardq")
    assert {"jobs", "cancel", "runs", "status", "results", "retrain", "models", "submit"} <= set(main.commands)
    from rewardq.api.schemas import TrainingParams
    from rewardq.client.cli_training import retrain

    assert set(TrainingParams.model_fields) <= {o.name for o in retrain.params}  # every run parameter has an option
    text = rewardq("retrain", "--help").stdout
    assert (
        "--batch-size" in text
        and "[default: 32; classifier 64]" in text
        and "--timeout" in text
        and "[default: 0]" in text
    )


@pytest.mark.one_backend("postgresql")  # the CLI's waits; the run's storage runs on both in test_retraining
def test_retrain_runs_and_waits_show_briefly_and_time_out(live: Live):
    from rewardq.client.samples import load_sts

    rows = load_sts("train", limit=40) or []
    with live.client() as c:
        c.add_feedback([{"prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in rows])
    out = rewardq(
        "retrain",
        "--epochs",
        "1",
        "--train-layers",
        "0",
        "--batch-size",
        "8",
        "--wait",
        "--timeout",
        "600",
        url=live.url,
    )
    assert out.returncode == 0, out.stderr
    assert "loss_curve" not in out.stdout.replace("loss_curve_points", "")  # not the whole curve, a float a line
    run_id = out.stdout.splitlines()[0].strip()
    shown = rewardq("runs", run_id[:8], url=live.url)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == run_id
    assert f"run {run_id}" in shown.stderr and "pairwise_accuracy" in shown.stderr
    assert run_id in rewardq("runs", url=live.url).stdout
    import signal

    live.stack.worker.kill(signal.SIGSTOP)  # the run cannot start: --timeout must end the wait
    try:
        late = rewardq("retrain", "--epochs", "1", "--train-layers", "0", "--wait", "--timeout", "2", url=live.url)
    finally:
        live.stack.worker.kill(signal.SIGCONT)
    assert late.returncode == 1 and "still queued after 2" in late.stderr and "Traceback" not in late.stderr
    with live.client() as c:
        models = c.models()
    base = next(m for m in models["models"] if m["version"].startswith("base-"))
    assert base["score_stats"]["n"] == 40 and len(base["score_stats"]["quantiles"]) == 101


@pytest.mark.one_backend("postgresql")  # file sniffing in the CLI; uploads' storage runs on both in test_uploads
def test_first_hour_files_long_lines_gzip_and_empty(live: Live, tmp_path: Path):
    """A JSON Lines file whose first line is longer than any sniff, the same file gzipped (by name or not), and an
    empty file's message without Python's bytes notation."""
    import gzip

    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"prompt": "why " * 3000 + str(i), "response": f"because {i}"}) + "\n" for i in range(3))
    )
    assert len(long.read_text().splitlines()[0]) > 10_000
    (tmp_path / "long.jsonl.gz").write_bytes(gzip.compress(long.read_bytes()))
    (tmp_path / "gzipped-no-suffix").write_bytes(gzip.compress(long.read_bytes()))
    for name in ("long.jsonl", "long.jsonl.gz", "gzipped-no-suffix"):
        out = rewardq("submit", str(tmp_path / name), "--wait", url=live.url)
        assert out.returncode == 0, (name, out.stderr)
        assert json.loads("\n".join(out.stdout.splitlines()[1:]))["progress"]["done"] == 3
    feedback = tmp_path / "feedback.jsonl.gz"
    feedback.write_bytes(gzip.compress(b'{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n' * 2))
    out = rewardq("feedback", str(feedback), url=live.url)
    assert out.returncode == 0 and json.loads(out.stdout)["added"] == 2, out.stderr
    (tmp_path / "empty.jsonl").write_text("")
    out = rewardq("submit", str(tmp_path / "empty.jsonl"), url=live.url)
    assert out.returncode == 1 and "is empty" in out.stderr and "b''" not in out.stderr, out.stderr


def test_first_hour_listings_header_short_schedule_ids_and_brief_models(live: Live):
    listing = rewardq("jobs", url=live.url).stdout.splitlines()
    assert listing[0].split()[:3] == ["JOB", "STATUS", "DONE/TOTAL"] and len(listing) > 1
    added = json.loads(rewardq("schedule", "add", "0 3 * * *", url=live.url).stdout)
    short = added["schedule_id"][:8]
    out = rewardq("schedule", "rm", short, url=live.url)
    assert out.returncode == 0, out.stderr
    assert added["schedule_id"] not in rewardq("schedule", "list", url=live.url).stdout
    assert rewardq("schedule", "rm", short, url=live.url).returncode == 1  # gone: 404
    brief = json.loads(rewardq("models", url=live.url).stdout)
    full = json.loads(rewardq("models", "--full", url=live.url).stdout)
    stats = [m["score_stats"] for m in brief["models"] if m.get("score_stats")]
    assert stats and all("quantiles" not in s and "mean" in s for s in stats)
    assert all(len(m["score_stats"]["quantiles"]) == 101 for m in full["models"] if m.get("score_stats"))


def test_the_worker_refuses_a_threads_pool_before_it_starts():
    """Issue #37, item 10: with --pool threads every thread shared one model's per-batch state (its cache scope and
    stats), so cache counters moved between tenants' jobs. The option is gone: refused, naming the pools there are."""
    from click.testing import CliRunner

    from rewardq.cli import main

    out = CliRunner().invoke(main, ["worker", "--pool", "threads"])
    assert out.exit_code == 2, out.output
    assert "'threads' is not one of 'prefork', 'solo'" in out.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the CLI's side; storage: tests/test_ensembles.py
def test_models_ensemble_makes_a_version_to_submit_with(live: Live, tmp_path: Path):
    """Issue #38, item 6, from the CLI: VERSION=WEIGHT members (names or ids), a name to submit with."""
    with live.client() as c:
        base = c.models()["default"]
    bad = rewardq("models", "ensemble", base, "x=1", url=live.url)
    assert bad.returncode == 2 and "VERSION=WEIGHT" in bad.stderr
    unknown = rewardq("models", "ensemble", f"{base}=1", "nope=2", url=live.url)
    assert unknown.returncode != 0 and "unknown model version 'nope'" in unknown.stderr
    from tests.test_ensembles import _second_version

    other = _second_version(live.stack.db_url)  # the untrained formula again, under another id
    made = rewardq("models", "ensemble", f"{base}=0.5", f"{other}=2", "--name", "cli-mix", url=live.url)
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    assert out["kind"] == "ensemble" and out["name"] == "cli-mix"
    assert out["settings"]["members"] == [{"version": base, "weight": 0.5}, {"version": other, "weight": 2.0}]
    pairs = str(_pairs(tmp_path / "p.jsonl", 3, "ens"))
    done = rewardq("submit", pairs, "--model-version", "cli-mix", "--wait", url=live.url)
    assert done.returncode == 0, done.stderr
