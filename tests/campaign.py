"""A seeded fault campaign: the whole stack (PostgreSQL through a cuttable proxy, its own Redis, the API, beat, two
workers) under a workload of concurrent jobs (some with a poison item, so batches split), cancels, feedback,
training runs one after another, activations, an interactive flood from one tenant and a training run that kills
its worker, while random faults are injected: SIGKILL of a worker, of beat or of the API; a Redis restart (in the
middle of splits, hand-backs and runs); PostgreSQL connections cut; a worker frozen with SIGSTOP past its heartbeat,
then resumed after another took its batches or its run over; a model that fails to load on one worker. Afterwards a
checker verifies the guarantees from SQL.

    python -m tests.campaign --faults 200 --seed 1     # the full campaign (writes benchmarks/results/)
    python -m tests.campaign --faults 24 --quick       # what CI runs (tests/test_campaign.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from rewardq.api.procs import Proc, free_port, start_api, start_beat, start_redis, start_worker, wait_for
from tests.support import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PG_ADMIN = os.environ.get("REWARDQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WORKERS = ("worker1", "worker2")
FINISHED = ("succeeded", "failed", "cancelled")
RUN_FINISHED = ("succeeded", "rejected", "failed")
# How often each fault is drawn: the cheap ones most, so a campaign of a few hundred fits in minutes.
FAULTS = {"pg_cut": 30, "api_kill": 15, "beat_kill": 15, "worker_kill": 15, "worker_freeze": 10, "redis_restart": 15,
          "load_fail": 8}  # fmt: skip
POISON = "@@campaign-poison@@"  # an item holding it fails to score (the poison-batch path: split until it is alone)
KILLER = "@@campaign-kill@@"  # a training run whose feedback holds it kills its worker (bounded by run deaths)
KEYS = {tenant: f"campaign-{tenant}-" + uuid.uuid4().hex for tenant in ("default", "flood", "killer")}


@dataclass
class Kill:
    """A worker SIGKILLed while it held batches: when (monotonic, and the database's clock), and which."""

    t0: float
    at: Any
    held: list[tuple[str, int]]
    requeued: float | None = None


@dataclass
class Report:
    seed: int
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    # Per worker kill that stranded batches: seconds until they were all back in the queue, and all done.
    recoveries: list[tuple[float, float]] = field(default_factory=list)
    # The faults in order (seconds since the first, kind), and for each recovery over 15 s the faults during it.
    timeline: list[tuple[float, str]] = field(default_factory=list)
    slow_recoveries: list[dict[str, Any]] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    failed_items: int = 0
    stale_promotions: int = 0  # a version promoted or registered by a worker that no longer held its run
    runs_taken_over: int = 0  # runs another worker took over (their first worker froze or died): lease > 1
    lane: Counter[str] = field(default_factory=Counter)  # the interactive flood's answers, by status
    lane_errors: Counter[str] = field(default_factory=Counter)  # what its 5xx answers and dropped calls said
    violations: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # processes that exited on their own (and were started again)
    jobs: int = 0
    items: int = 0
    seconds: float = 0.0
    settle_seconds: float = 0.0

    @property
    def worst_recovery(self) -> float | None:
        """The longest a killed worker's batches waited to be back in the queue (the guarantee: under 30 s)."""
        return max(r for r, _ in self.recoveries) if self.recoveries else None

    @property
    def worst_done(self) -> float | None:
        return max(d for _, d in self.recoveries) if self.recoveries else None

    def ok(self, recovery_limit: float = 30.0) -> bool:
        worst = self.worst_recovery
        bad = self.lost or self.duplicated or self.violations or self.stale_promotions
        return not bad and (worst is None or worst < recovery_limit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "operations": dict(self.operations),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "jobs": self.jobs,
            "items": self.items,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "failed_items": self.failed_items,
            "stale_promotions": self.stale_promotions,
            "runs_taken_over": self.runs_taken_over,
            "interactive_flood": dict(self.lane),
            "interactive_flood_errors": dict(self.lane_errors.most_common(5)),
            "violations": self.violations,
            "crashes": self.crashes,
            "worker_kill_recoveries": len(self.recoveries),
            "recoveries_s": [[round(r, 1), round(d, 1)] for r, d in self.recoveries],
            "worst_recovery_s": self.worst_recovery,
            "worst_recovery_done_s": self.worst_done,
            "slow_recoveries": self.slow_recoveries,
            "seconds": round(self.seconds, 1),
            "settle_seconds": round(self.settle_seconds, 1),
        }

    def table(self) -> str:
        worst = self.worst_recovery
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.operations.items()))
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        recovery = "no sample"
        if worst is not None:
            recovery = (
                f"back in the queue within {worst:.1f} s, done within {self.worst_done:.1f} s "
                f"(over {len(self.recoveries)} kills that stranded a batch)"
            )
        wall = f"{self.seconds:.0f} s, of which {self.settle_seconds:.0f} s settling after the last fault"
        rows = [
            ("seed", str(self.seed)),
            ("operations", ops),
            ("faults injected", f"{sum(self.faults.values())}: {faults}"),
            ("jobs, items", f"{self.jobs}, {self.items}"),
            ("items lost", str(self.lost)),
            ("items duplicated", str(self.duplicated)),
            ("invariant violations", str(len(self.violations))),
            ("stale promotions", f"{self.stale_promotions} ({self.runs_taken_over} runs taken over by another worker)"),
            ("items failed (in the error ledger): the poison items, and only they", str(self.failed_items)),
            ("interactive flood answers", ", ".join(f"{k} {v}" for k, v in sorted(self.lane.items())) or "none"),
            (
                "what its 5xx answers and dropped calls said",
                "; ".join(f"{w} ({n})" for w, n in self.lane_errors.most_common(4)) or "none",
            ),
            ("processes that exited on their own (started again)", str(len(self.crashes))),
            ("worst recovery after a worker kill", recovery),
            (
                "recoveries over 15 s, and the faults during each",
                "; ".join(
                    f"kill at {x['kill_at_s']} s, back {x['requeued_s']} s later: "
                    + (", ".join(f"{k} +{t}" for t, k in x["faults_during"]) or "none")
                    for x in self.slow_recoveries
                )
                or "none",
            ),
            ("wall time", wall),
        ]
        return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


class Campaign:
    def __init__(self, n_faults: int, seed: int, tmp: Path, interval: float, job_items: int, live_jobs: int):
        self.rng = random.Random(seed)
        self.n_faults, self.interval, self.job_items, self.live_jobs = n_faults, interval, job_items, live_jobs
        self.tmp = tmp
        self.report = Report(seed)
        self.procs: dict[str, Proc] = {}
        self.frozen: set[str] = set()
        self.lock = threading.Lock()
        self.proc_lock = threading.Lock()  # a fault's kill and restart, or the supervisor's restart: one at a time
        self.stop_watch = threading.Event()
        self.stop_load = threading.Event()
        self.submitted: dict[str, str] = {}  # idempotency key -> job id
        self.watch: list[Kill] = []  # worker kills whose batches are not all done yet
        self.t_faults = time.monotonic()  # set again when the first fault is due
        self.db_name = f"rewardq_campaign_{uuid.uuid4().hex[:8]}"
        base = PG_ADMIN.rsplit("/", 1)[0]
        self.direct = f"{base}/{self.db_name}"
        self.proxy = TcpProxy(5432)
        self.via_proxy = self.direct.replace("127.0.0.1:5432", f"127.0.0.1:{self.proxy.port}")
        self.redis_port, self.api_port = free_port(), free_port()
        self.load_fail_file = tmp / "load-fail"
        self.poison: set[tuple[str, str]] = set()  # (job id, item id) of the poison items
        self.runs: list[str] = []
        self.killer_run: str | None = None

    # -- the stack ------------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in [k for k in env if k.startswith("REWARDQ_")]:
            del env[k]  # the reliability settings at their defaults, as a new deployment has them
        env.update(
            REWARDQ_DATABASE_URL=self.via_proxy.replace("postgresql://", "postgresql+psycopg://", 1),
            REWARDQ_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            REWARDQ_SCORING_QUEUE="campaign-scoring",
            REWARDQ_TRAINING_QUEUE="campaign-training",
            REWARDQ_INTERACTIVE_QUEUE="campaign-interactive",
            REWARDQ_INTERACTIVE_TENANT_MAX_PAIRS="1000",  # the flood's three clients of 400 pairs meet it
            REWARDQ_BATCH_SIZE="16",
            REWARDQ_API_KEYS=f"default:{KEYS['default']}:admin,flood:{KEYS['flood']},killer:{KEYS['killer']}",
            REWARDQ_FAULT_POISON_MARKER=POISON,
            REWARDQ_FAULT_KILL_MARKER=KILLER,
            REWARDQ_ARTIFACTS_DIR=str(self.tmp / "artifacts"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        return env

    def start(self, name: str) -> Proc:
        log = self.tmp / f"{name}.log"
        if name == "redis":
            proc = start_redis(self.redis_port, log)
            assert proc is not None, "redis-server is not installed"
        elif name in WORKERS:
            # worker1 fails to load any model while the load_fail fault holds its file
            env = (
                {**self.env, "REWARDQ_FAULT_LOAD_FAIL_FILE": str(self.load_fail_file)}
                if name == WORKERS[0]
                else self.env
            )
            proc = start_worker(env, log, queues="campaign-interactive,campaign-scoring,campaign-training")
        elif name == "beat":
            proc = start_beat(self.env, log)
        else:
            proc = start_api(self.env, log, self.api_port)
        self.procs[name] = proc
        return proc

    def setup(self) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
        url = self.direct.replace("postgresql://", "postgresql+psycopg://", 1)
        upgrade = [sys.executable, "-m", "rewardq", "db", "upgrade"]
        subprocess.run(upgrade, check=True, capture_output=True, env={**self.env, "REWARDQ_DATABASE_URL": url})
        for name in ("redis", "api", "beat", *WORKERS):
            self.start(name)
        for name in WORKERS:  # each worker's pool process has loaded the model
            proc = self.procs[name]
            wait_for(lambda p=proc: " ready." in p.tail(300), 300, f"{name} ready", proc.popen)  # type: ignore[misc]

    def teardown(self) -> None:
        for name in list(self.frozen):
            self.procs[name].kill(signal.SIGCONT)
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.proxy.close()
        try:
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        except psycopg.Error:
            pass

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read straight from PostgreSQL, never through the proxy the faults cut."""
        with psycopg.connect(self.direct, connect_timeout=5) as conn:
            return list(conn.execute(query, args).fetchall())

    # -- the workload -----------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, tenant: str = "default", **kw: Any) -> httpx.Response:
        """An API call retried through API kills and database cuts (a 5xx or no answer), as a careful client does."""
        kw["headers"] = {"Authorization": f"Bearer {KEYS[tenant]}", **kw.get("headers", {})}
        deadline = time.monotonic() + 180
        while True:
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30) as c:
                    resp = c.request(method, path, **kw)
                if resp.status_code < 500:
                    return resp
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: no answer for 180 s")
            time.sleep(0.5)

    def submit(self) -> None:
        n = self.rng.randint(self.job_items // 2, self.job_items)
        tag = uuid.uuid4().hex[:6]
        items = [
            {"id": f"{tag}-{i}", "prompt": f"Campaign question {tag} {i}?", "response": f"An answer to {tag}, {i}."}
            for i in range(n)
        ]
        poisoned = None
        if self.load_rng.random() < 0.3:  # a poison item: its batch splits until it fails alone
            poisoned = items[self.load_rng.randrange(n)]
            poisoned["response"] += f" {POISON}"
        key = f"campaign-{tag}"
        resp = self.call("POST", "/v1/jobs", json={"items": items}, headers={"Idempotency-Key": key})
        assert resp.status_code in (200, 202), resp.text
        self.submitted[key] = resp.json()["job_id"]
        if poisoned is not None:
            self.poison.add((self.submitted[key], poisoned["id"]))
        self.report.operations["jobs submitted"] += 1

    def live(self) -> list[str]:
        ids = list(self.submitted.values())
        rows = self.sql("SELECT id FROM jobs WHERE id = ANY(%s) AND status IN ('queued', 'running')", ids)
        return [r[0] for r in rows]

    def load(self) -> None:
        """Jobs kept coming (a few live at all times), a cancel now and then, feedback, one training run and
        activations of the tenant's version, until the faults end."""
        rng = self.load_rng
        ratings = [
            {"prompt": f"Feedback prompt {i}", "response": f"Feedback answer {i % 7}", "rating": float(i % 5)}
            for i in range(64)
        ]
        run_id: str | None = None
        steps = 0
        while not self.stop_load.is_set():
            steps += 1
            live = self.live()
            if len(live) < self.live_jobs:
                self.submit()
            elif rng.random() < 0.08:
                victim = rng.choice(live)
                assert self.call("POST", f"/v1/jobs/{victim}/cancel").status_code == 200
                self.report.operations["cancels"] += 1
            if steps % 10 == 3:
                assert self.call("POST", "/v1/feedback", json=ratings).status_code == 201
                self.report.operations["feedback posts"] += 1
            if steps >= 20 and steps % 5 == 0:  # runs one after another: a freeze often meets one under way
                params = {"epochs": 1, "train_layers": 0, "batch_size": 16}
                resp = self.call("POST", "/v1/training-runs", json=params)
                assert resp.status_code in (202, 409), resp.text  # 409: the tenant's last run is still open
                if resp.status_code == 202:
                    run_id = resp.json()["run_id"]
                    self.runs.append(run_id)
                    self.report.operations["training runs"] += 1
            if steps == 30:  # a run that kills every worker that takes it: it must fail after N deaths, not loop
                killer = [{"prompt": f"{KILLER} prompt {i}", "response": f"answer {i}", "rating": float(i % 5)}
                          for i in range(40)]  # fmt: skip
                assert self.call("POST", "/v1/feedback", tenant="killer", json=killer).status_code == 201
                resp = self.call("POST", "/v1/training-runs", tenant="killer", json={"epochs": 1, "train_layers": 0})
                assert resp.status_code == 202, resp.text
                self.killer_run = resp.json()["run_id"]
                self.report.operations["training runs that kill their worker"] += 1
            if steps % 25 == 12:
                models = self.call("GET", "/v1/models").json()
                versions = [m["version"] for m in models["models"]]
                assert self.call("POST", f"/v1/models/{rng.choice(versions)}/activate").status_code == 200
                self.report.operations["activations"] += 1
            self.stop_load.wait(1.0)
        self.run_id = run_id

    def flood(self, k: int) -> None:
        """Tenant 'flood' sends large interactive requests back to back, as an eager RLHF loop would: its share of
        the lane holds (429 past it), and every other tenant's work still ends. The same pairs each time (the
        embedding cache serves them after the first), so the flood costs the workers little CPU."""
        items = [{"prompt": f"Flood prompt {i % 37}?", "response": f"Flood answer {i}."} for i in range(400)]
        headers = {"Authorization": f"Bearer {KEYS['flood']}"}
        while not self.stop_load.is_set():
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=90) as c:
                    resp = c.post("/v1/score", json={"items": items}, headers=headers)
                status = resp.status_code
                why = re.sub(r"[0-9a-f]{12,}", "…", resp.text)[:200] if status >= 500 else ""
            except httpx.HTTPError as exc:
                status, why = 0, type(exc).__name__  # the API was killed under it
            with self.lock:
                self.report.lane[str(status)] += 1
                if why:
                    self.report.lane_errors[why] += 1
            self.stop_load.wait(0.5 if status == 429 else 0.1)

    # -- the faults ---------------------------------------------------------------------------------------------------

    def worker_ids(self, name: str) -> list[str]:
        """The ids (host:pid) that a worker's processes record on the batches they take."""
        proc = self.procs[name]
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        host = os.uname().nodename
        return [f"{host}:{pid.strip()}:%" for pid in out.split() if pid.strip()]  # and the process's own token

    def supervise(self) -> None:
        """Start again a process that exited on its own, as a supervisor (systemd, a restart policy) would: the
        campaign counts these, since a crash is news even when nothing is lost."""
        while not self.stop_watch.is_set():
            with self.proc_lock:
                for name, proc in list(self.procs.items()):
                    if name not in self.frozen and not proc.alive():
                        tail = proc.tail(400)
                        lines = [ln for ln in tail.splitlines() if "Error" in ln or "CRITICAL" in ln]
                        self.report.crashes.append(f"{name}: {lines[-1][:300] if lines else 'exited'}")
                        proc.stop()
                        self.start(name)
            time.sleep(1.0)

    def inject(self, kind: str) -> None:
        with self.lock:
            self.report.timeline.append((round(time.monotonic() - self.t_faults, 1), kind))
        with self.proc_lock:
            self._inject(kind)

    def _inject(self, kind: str) -> None:
        rng = self.rng
        if kind == "pg_cut":
            self.proxy.outage()
            time.sleep(rng.uniform(0.5, 3.0))
            self.proxy.restore()
        elif kind in ("api_kill", "beat_kill"):
            name = kind.split("_")[0]
            self.procs[name].kill()
            self.procs[name].popen.wait(10)
            self.procs[name].stop()
            time.sleep(rng.uniform(0.0, 1.0))
            self.start(name)
        elif kind == "redis_restart":
            self.procs["redis"].kill()
            self.procs["redis"].popen.wait(10)
            self.procs["redis"].stop()
            self.start("redis")
        elif kind == "worker_kill":
            name = rng.choice([w for w in WORKERS if w not in self.frozen])
            ids = self.worker_ids(name)
            self.procs[name].kill(signal.SIGSTOP)  # what it holds now is what the kill strands
            # Taken since last enqueued: a batch it handed back (preempted, a model it could not load, an outage)
            # still names it but waits in the queue, stranded by nothing.
            held = self.sql(
                "SELECT b.job_id, b.batch_no, statement_timestamp() FROM batches b JOIN jobs j ON j.id = b.job_id"
                " WHERE NOT b.done AND b.worker LIKE ANY(%s) AND j.status IN ('queued', 'running')"
                " AND b.started_at >= b.enqueued_at",
                ids,
            )
            self.procs[name].kill()
            self.procs[name].popen.wait(10)
            self.procs[name].stop()
            if held:
                with self.lock:
                    self.watch.append(Kill(time.monotonic(), held[0][2], [(j, n) for j, n, _ in held]))
            self.start(name)
        elif kind == "load_fail":
            # worker1 cannot load a model for a while; its pool process is replaced, so it must load one now: the
            # work it takes goes back to the queue for the other worker, and nothing is split or failed for it
            self.load_fail_file.touch()
            main = self.procs[WORKERS[0]].pid
            children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(main)], capture_output=True, text=True)
            for pid in children.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            hold = rng.uniform(5.0, 15.0)

            def heal() -> None:
                time.sleep(hold)
                self.load_fail_file.unlink(missing_ok=True)

            threading.Thread(target=heal, daemon=True).start()
        elif kind == "worker_freeze":
            name = rng.choice([w for w in WORKERS if w not in self.frozen])
            self.procs[name].kill(signal.SIGSTOP)
            self.frozen.add(name)
            thaw = 10.0 + rng.uniform(3.0, 8.0)  # past the heartbeat's TTL (10 s): its batches go to the other

            def resume() -> None:
                time.sleep(thaw)
                self.procs[name].kill(signal.SIGCONT)
                self.frozen.discard(name)

            threading.Thread(target=resume, daemon=True).start()
        self.report.faults[kind] += 1

    def note_slow(self, kill: Kill, done: float) -> None:
        """What else happened while a killed worker's batches waited: the faults from the kill until they were back."""
        start = kill.t0 - self.t_faults
        during = [(round(t - start, 1), k) for t, k in self.report.timeline if start - 0.5 <= t <= start + done]
        self.report.slow_recoveries.append(
            {
                "kill_at_s": round(start, 1),
                "requeued_s": round(kill.requeued or done, 1),
                "done_s": round(done, 1),
                "batches": len(kill.held),
                "faults_during": during,
            }  # fmt: skip
        )

    def watch_recoveries(self) -> None:
        """A worker kill's recovery: from the kill until every batch it stranded is back in the queue (enqueued again
        by the sweeper), and until each is done (or its job ended)."""
        while not self.stop_watch.is_set():
            with self.lock:
                pending = list(self.watch)
            for kill in pending:
                rows = self.sql(
                    "SELECT b.job_id, b.batch_no, b.done OR j.status IN ('succeeded', 'failed', 'cancelled'),"
                    " b.enqueued_at > %s FROM batches b JOIN jobs j ON j.id = b.job_id WHERE b.job_id = ANY(%s)",
                    kill.at,
                    [j for j, _ in kill.held],
                )
                state = {(j, n): (done, again) for j, n, done, again in rows if (j, n) in kill.held}
                now = time.monotonic() - kill.t0
                if kill.requeued is None and all(done or again for done, again in state.values()):
                    kill.requeued = now
                if all(done for done, _ in state.values()):
                    kill.requeued = now if kill.requeued is None else kill.requeued
                    self.report.recoveries.append((kill.requeued, now))
                    if kill.requeued > 15.0:
                        self.note_slow(kill, now)
                    with self.lock:
                        self.watch.remove(kill)
            time.sleep(0.5)

    # -- the run and the checker --------------------------------------------------------------------------------------

    def run(self, settle_timeout: float = 420.0) -> Report:
        t0 = time.monotonic()
        self.run_id: str | None = None
        self.setup()
        self.load_rng = random.Random(self.rng.random())  # its own stream: the faults' draws stay the seed's
        loader = threading.Thread(target=self.load, daemon=True)
        flooders = [threading.Thread(target=self.flood, args=(k,), daemon=True) for k in range(3)]
        watcher = threading.Thread(target=self.watch_recoveries, daemon=True)
        supervisor = threading.Thread(target=self.supervise, daemon=True)
        loader.start()
        for t in flooders:
            t.start()
        watcher.start()
        supervisor.start()
        time.sleep(self.interval)
        self.t_faults = time.monotonic()
        kinds, weights = list(FAULTS), list(FAULTS.values())
        while sum(self.report.faults.values()) < self.n_faults:
            kind = self.rng.choices(kinds, weights)[0]
            if kind.startswith("worker") and self.frozen:
                kind = "pg_cut"  # one worker out of service at a time, so a kill's recovery is the system's own
            self.inject(kind)
            time.sleep(self.rng.uniform(0.5, 1.5) * self.interval)
            print(f"\r{sum(self.report.faults.values())} faults", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        self.stop_load.set()
        loader.join(240)
        for t in flooders:
            t.join(120)
        t_settle = time.monotonic()
        wait_for(lambda: not self.frozen, 30, "frozen workers resumed")
        ids = list(self.submitted.values())

        def settled() -> bool:
            jobs = self.sql("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status <> ALL(%s)", ids, list(FINISHED))
            runs = self.sql("SELECT count(*) FROM training_runs WHERE status <> ALL(%s)", list(RUN_FINISHED))
            return jobs[0][0] == 0 and runs[0][0] == 0

        try:
            wait_for(settled, settle_timeout, "every job and run ended")
        except TimeoutError as exc:
            self.report.violations.append(str(exc))
        self.report.settle_seconds = time.monotonic() - t_settle
        try:
            wait_for(lambda: not self.watch, 15, "the last recoveries noted")
        except TimeoutError:
            pass
        self.stop_watch.set()
        watcher.join(30)
        supervisor.join(30)
        for kill in self.watch:  # never recovered
            self.report.violations.append(f"batches {kill.held} stranded by a worker kill never finished")
        self.check()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def check(self) -> None:
        r = self.report
        ids = list(self.submitted.values())
        jobs = self.sql(
            "SELECT j.id, j.status, j.n_items,"
            " j.n_done + (SELECT coalesce(sum(p.n_done), 0) FROM job_progress p WHERE p.job_id = j.id),"
            " j.n_failed + (SELECT coalesce(sum(p.n_failed), 0) FROM job_progress p WHERE p.job_id = j.id),"
            " (SELECT count(*) FROM items i WHERE i.job_id = j.id),"
            " (SELECT count(*) FROM results x WHERE x.job_id = j.id),"
            " (SELECT count(*) FROM item_errors e WHERE e.job_id = j.id),"
            " (SELECT count(*) FROM results x JOIN item_errors e ON e.job_id = x.job_id AND e.idx = x.idx"
            "  WHERE x.job_id = j.id),"
            " (SELECT count(*) FROM batches b WHERE b.job_id = j.id AND NOT b.done)"
            " FROM jobs j"
        )
        r.jobs = len(jobs)
        extra = {j[0] for j in jobs} - set(ids)
        if extra:
            r.duplicated += len(extra)
            r.violations.append(f"{len(extra)} job(s) nobody submitted (a retried submission created a second job)")
        for job_id, status, n_items, n_done, n_failed, n_rows, n_res, n_err, both, undone in jobs:
            r.items += n_items
            r.failed_items += n_err
            r.duplicated += both
            if both:
                r.violations.append(f"job {job_id}: {both} item(s) both scored and failed")
            if (n_done, n_failed) != (n_res, n_err):
                r.violations.append(f"job {job_id}: counters {n_done}/{n_failed} but {n_res} results, {n_err} errors")
                r.duplicated += max(0, n_done - n_res) + max(0, n_failed - n_err)
            if n_rows != n_items:
                r.violations.append(f"job {job_id}: {n_rows} item rows for {n_items} items")
            if status == "cancelled":
                continue
            if status != "succeeded":
                r.violations.append(f"job {job_id} ended {status}")
            missing = n_items - (n_res + n_err - both)
            if missing:
                r.lost += missing
                r.violations.append(f"job {job_id}: {missing} item(s) with no outcome")
            if status == "succeeded" and undone:
                r.violations.append(f"job {job_id} succeeded with {undone} batch(es) not done")
        for run_id, status, result in self.sql("SELECT id, status, result_version FROM training_runs"):
            if status not in RUN_FINISHED:
                r.violations.append(f"run {run_id} never ended ({status})")
            elif status in ("succeeded", "rejected") and not result:
                r.violations.append(f"run {run_id} {status} without a version")
        # Only the poison items failed, each alone with its reason (a split, a Redis restart in the middle of one,
        # a hand-back or a model that failed to load on one worker never fails an item).
        failed = {
            (j, i): code
            for j, i, code in self.sql(
                "SELECT e.job_id, i.item_id, e.code FROM item_errors e JOIN items i ON i.job_id = e.job_id"
                " AND i.idx = e.idx"
            )
        }
        cancelled = {row[0] for row in jobs if row[1] == "cancelled"}
        for key, code in failed.items():
            if key not in self.poison:
                r.violations.append(f"item {key} failed ({code}) though it holds no poison")
            elif code != "injected_fault":
                r.violations.append(f"poison item {key} failed as {code}, not injected_fault")
        for key in self.poison - set(failed):
            if key[0] not in cancelled:
                r.violations.append(f"poison item {key} did not fail")
        # One promotion per run: a version a run registered is that run's result, and a run ended gated has one.
        for version, run_id, status, result in self.sql(
            "SELECT m.version, m.run_id, r.status, r.result_version FROM model_versions m"
            " LEFT JOIN training_runs r ON r.id = m.run_id WHERE m.run_id IS NOT NULL"
        ):
            if status not in ("succeeded", "rejected") or result != version:
                r.stale_promotions += 1
                r.violations.append(f"version {version} of run {run_id} ({status}, result {result}): a stale write")
        r.runs_taken_over = self.sql("SELECT count(*) FROM training_runs WHERE lease > 1")[0][0]
        if self.killer_run:
            status, error = self.sql("SELECT status, error FROM training_runs WHERE id = %s", self.killer_run)[0]
            if status != "failed" or "its worker died" not in (error or ""):
                r.violations.append(f"the run that kills its worker ended {status}: {error}")
        default = self.sql("SELECT count(*) FROM active_versions WHERE scope = '*'")[0][0]
        if default != 1:
            r.violations.append(f"{default} default active versions")
        dangling = self.sql(
            "SELECT a.scope FROM active_versions a LEFT JOIN model_versions m ON m.version = a.version"
            " WHERE m.version IS NULL"
        )
        if dangling:
            r.violations.append(f"active versions that do not exist: {dangling}")


def campaign(
    n_faults: int,
    seed: int,
    *,
    interval: float = 2.0,
    job_items: int = 320,
    live_jobs: int = 3,
    tmp: Path | None = None,
) -> Report:
    """Run one campaign and return its report (the stack is torn down either way)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="rewardq-campaign-"))
    c = Campaign(n_faults, seed, tmp, interval, job_items, live_jobs)
    try:
        return c.run()
    finally:
        c.teardown()


def markdown(command: str, table: str) -> str:
    return (
        f"`{command}`, on {os.cpu_count()} CPUs"
        " at default reliability settings. The stack: PostgreSQL through a proxy that cuts its connections, a Redis "
        "of its own, the API, beat and two workers. The workload: a few jobs live at all times (new ones as others "
        "end; about one in three holds a poison item, so its batches split), cancels, feedback, training runs one "
        "after another, activations, three clients of one tenant flooding the interactive lane with 400-pair requests"
        " (past its share of 1,000 pairs), and one training run whose feedback kills every worker that takes it. "
        "Faults are drawn at random from the seed about every 2 s: a worker, beat or the API SIGKILLed (and started "
        "again), Redis restarted without persistence (in the middle of splits, hand-backs and runs), PostgreSQL's "
        "connections cut for 0.5 to 3 s, a worker frozen with SIGSTOP past its heartbeat, then resumed after the "
        "other took its batches or its run over, and a model that fails to load on one worker for 5 to 15 s while its"
        " pool process is replaced. A process that exits on its own is started again, as a restart policy would, and "
        "counted. Afterwards the checker reads SQL: every item of every job not cancelled has exactly one outcome "
        "(scored or failed), only the poison items failed, the counters match the rows, no job was created twice, no "
        "job, batch or run is left in an impossible state, every run ended, a version a run registered is that run's "
        "result (one promotion per run: no stale worker wrote), the run that kills its worker failed saying so, and "
        "there is one default active version.\n\n"
        f"{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between faults")
    parser.add_argument("--quick", action="store_true", help="smaller jobs; results are not written")
    args = parser.parse_args()
    report = campaign(args.faults, args.seed, interval=args.interval, job_items=160 if args.quick else 320)
    print(report.table())
    for v in report.violations:
        print("VIOLATION:", v)
    for c in report.crashes:
        print("EXITED:", c)
    for why, n in report.lane_errors.most_common(5):
        print(f"FLOOD ERROR x{n}: {why}")
    for slow in report.slow_recoveries:
        print("SLOW RECOVERY:", slow)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "fault_campaign.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        command = f"python -m tests.campaign --faults {args.faults} --seed {args.seed}"
        (RESULTS / "fault_campaign.md").write_text(markdown(command, report.table()))
    sys.exit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
