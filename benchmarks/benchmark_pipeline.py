"""Pipeline throughput against the in-process limit and against the script a user would write instead.

Two workloads: all-unique pairs (STS-B dev, 1,500) and RLHF-shaped (100 prompts x 20 responses). For each:
  (a) raw in-process encoder + kernel, same model and batching as a worker (the limit);
  (b) what a user would write: sentence-transformers `encode` of both sides, cosine, exp;
  (b2) the same with ONNX Runtime, what a CPU user picks for speed: the encoder exported to ONNX once (not timed),
       run by onnxruntime with every graph optimisation, texts sorted by length as sentence-transformers does
       (its own `backend="onnx"` needs optimum-onnx, which does not install beside transformers 5);
  (b3) sentence-transformers with the model in bf16;
  (c) the full pipeline: submit through the API -> a worker -> every result read back through the API.
(a) and (c) run in each profile asked for (--profiles): exact (fp32) and fast (REWARDQ_PRECISION=fast, a worker of
its own). Each repetition runs every way back to back on texts no cache has seen, in a rotating order;
pairs/s are medians over the repetitions and each ratio is the median of the per-repetition ratios.
Plus ingestion: N items POSTed as ndjson, items/s and the API process's peak RSS.
Writes benchmarks/results/pipeline.json (every repetition's figures too) and prints a table.

    python benchmarks/benchmark_pipeline.py [--ingest-items 100000] [--repeat 5] [--profiles exact,fast]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def workloads() -> dict[str, list[dict[str, str]]]:
    from rewardq.client.samples import load_bundled, load_sts

    dev = load_sts("dev") or load_bundled()
    unique = [{"id": str(i), "prompt": x["prompt"], "response": x["response"]} for i, x in enumerate(dev)]
    sentences = list(dict.fromkeys([x["response"] for x in dev]))
    prompts = [x["prompt"] for x in dev[:100]]
    rlhf = [{"id": f"{p}-{r}", "prompt": prompts[p], "response": sentences[(p * 20 + r) % len(sentences)]}
            for p in range(len(prompts)) for r in range(20)]  # fmt: skip
    return {"unique (STS-B dev)": unique, "RLHF-shaped (100 x 20)": rlhf}


def in_process(items: list[dict[str, str]], batch_size: int, profile: str = "exact") -> float:
    from rewardq.workers.models.sim_exp import SimExpModel
    from rewardq.workers.registry import default_encoder_path

    def make() -> SimExpModel:
        from rewardq.storage.settings import Settings
        from rewardq.workers.models.sim_exp import set_precision
        from rewardq.workers.precision import resolve_autocast

        model = SimExpModel("bench", default_encoder_path())
        set_precision(model, resolve_autocast(Settings(precision=profile), model.device.type))
        return model

    model = _cached(f"model-{profile}", make)
    t0 = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        model.score([x["prompt"] for x in chunk], [x["response"] for x in chunk])
    return len(items) / (time.perf_counter() - t0)


def user_script(items: list[dict[str, str]], bf16: bool = False) -> float:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from rewardq.workers.registry import default_encoder_path

    def make() -> SentenceTransformer:
        import torch

        # What the user would run on this machine: the GPU when there is one, else the CPU.
        st = SentenceTransformer(default_encoder_path(), device="cuda" if torch.cuda.is_available() else "cpu")
        return st.to(torch.bfloat16) if bf16 else st

    st = _cached(f"st-{bf16}", make)
    t0 = time.perf_counter()
    a = st.encode([x["prompt"] for x in items], batch_size=64, convert_to_numpy=True)
    b = st.encode([x["response"] for x in items], batch_size=64, convert_to_numpy=True)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.exp(-cos)
    return len(items) / (time.perf_counter() - t0)


def onnx_missing() -> str | None:
    """Why the ONNX Runtime peer cannot run here, or None."""
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install onnxruntime onnxscript)" if missing else None


def _onnx_session(threads: int) -> tuple[object, object]:
    """The encoder exported to ONNX (torch's exporter, dynamic batch and sequence axes) and an onnxruntime session
    with every graph optimisation: what sentence-transformers' ONNX backend builds. Made once, not timed."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rewardq.workers.registry import default_encoder_path

    path = default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(path)

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state  # fmt: skip

    names = ["input_ids", "attention_mask", "token_type_ids"]
    x = tokenizer(["an example", "a longer example sentence"], padding=True, return_tensors="pt")
    onnx_file = Path(tempfile.mkdtemp(prefix="rewardq-onnx-")) / "encoder.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    torch.onnx.export(Encoder().eval(), tuple(x[k] for k in names), str(onnx_file), input_names=names,
                      output_names=["hidden"], dynamic_shapes={k: {0: batch, 1: seq} for k in names},
                      dynamo=True)  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"]), tokenizer


def onnx_script(items: list[dict[str, str]]) -> float:
    """(b2): the user script on ONNX Runtime: batches of 64 (as in (b)), in length order as sentence-transformers."""
    import numpy as np
    import torch

    session, tokenizer = _cached("onnx", lambda: _onnx_session(torch.get_num_threads()))

    def encode(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), 384), dtype=np.float32)
        for lo in range(0, len(order), 64):
            idx = order[lo : lo + 64]
            tok = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                            return_tensors="np")  # fmt: skip
            feed = {k: tok[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = session.run(None, feed)[0]  # type: ignore[attr-defined]
            mask = feed["attention_mask"][..., None].astype(np.float32)
            out[idx] = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return out

    t0 = time.perf_counter()
    a = encode([x["prompt"] for x in items])
    b = encode([x["response"] for x in items])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.exp(-cos)
    return len(items) / (time.perf_counter() - t0)


def _variant(items: list[dict[str, str]], k: str) -> list[dict[str, str]]:
    return [{"id": x["id"], "prompt": f"{x['prompt']} ({k})", "response": f"{x['response']} ({k})"} for x in items]


def _sized(items: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The first ``n`` pairs (0: all); past the workload's size, more copies of it, each with its own texts and ids."""
    if not n:
        return items
    out = list(items[:n])
    copy = 0
    while len(out) < n:
        copy += 1
        more = [{**x, "id": f"{x['id']}.{copy}"} for x in _variant(items, f"copy {copy}")]
        out += more[: n - len(out)]
    return out


_CACHE: dict[str, object] = {}


def _cached(name, make):
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


class Stack:
    """Redis (the running one or a private one), a SQLite database, one worker and the API, as processes."""

    def __init__(self, tmp: Path, db_url: str | None = None, worker: bool = True, reserved: bool = False,
                 name: str = "", env: dict[str, str] | None = None):  # fmt: skip
        """``reserved``: a second worker process that serves only the interactive queue (the first one takes
        bulk and training work); otherwise one worker serves every queue, interactive first. ``name``: a stack
        of its own beside another one (its queues and logs); ``env``: more settings for its processes."""
        from rewardq.api.procs import free_port, redis_answers, start_api, start_redis, start_worker
        from rewardq.storage.migrate import upgrade
        from rewardq.workers.registry import register_base_version

        self.procs = []
        self.last_cache_hits = 0  # embedding cache hits of the last job pipeline() ran (texts not encoded again)
        redis_url = os.environ.get("REWARDQ_REDIS_URL", "redis://127.0.0.1:6379/0")
        if not redis_answers(redis_url):
            port = free_port()
            self.procs.append(start_redis(port, tmp / "redis.log"))
            redis_url = f"redis://127.0.0.1:{port}/0"
        self.db_url = db_url or f"sqlite:///{tmp / f'bench{name}.db'}"
        q = f"bench-{os.getpid()}{name}"
        self.env = {**os.environ, **(env or {}), "REWARDQ_DATABASE_URL": self.db_url,
                    "REWARDQ_REDIS_URL": redis_url, "REWARDQ_SCORING_QUEUE": q,
                    "REWARDQ_INTERACTIVE_QUEUE": f"{q}-interactive",
                    "REWARDQ_TRAINING_QUEUE": f"{q}-training",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # A loopback API for the benchmark's own clients: no keys, and no limit on what they measure.
                    "REWARDQ_ALLOW_ANONYMOUS": "1", "REWARDQ_RATE_LIMIT_PER_MINUTE": "0"}  # fmt: skip
        os.environ.update({k: self.env[k] for k in ("REWARDQ_DATABASE_URL", "REWARDQ_REDIS_URL")})
        from rewardq.storage.settings import get_settings

        get_settings.cache_clear()
        upgrade()
        register_base_version()
        if worker and reserved:
            bulk = ",".join(self.env[f"REWARDQ_{q}_QUEUE"] for q in ("SCORING", "TRAINING"))
            self.procs.append(start_worker(self.env, tmp / f"worker{name}.log", queues=bulk))
            self.procs.append(start_worker(self.env, tmp / f"worker{name}-interactive.log",
                                           queues=self.env["REWARDQ_INTERACTIVE_QUEUE"]))  # fmt: skip
        elif worker:
            self.procs.append(start_worker(self.env, tmp / f"worker{name}.log"))
        self.port = free_port()
        self.procs.append(start_api(self.env, tmp / f"api{name}.log", self.port))
        self.api_pid = self.procs[-1].pid

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def pipeline(stack: Stack, items: list[dict[str, str]]) -> float:
    from rewardq.client.client import Client

    with Client(f"http://127.0.0.1:{stack.port}") as c:
        t0 = time.perf_counter()
        job_id = c.submit(items)
        c.wait(job_id, progress=False, timeout=1800)  # long polls: the end is seen at once
        n = sum(1 for _ in c.results(job_id, page=10_000))
        took = time.perf_counter() - t0
        # The job's own count, committed with its results (the worker's metrics counters are recorded after the
        # results, so a read at this point can miss the last batch's).
        stack.last_cache_hits = int(c.job(job_id)["embed_cache_hits"])
    assert n == len(items), (n, len(items))
    return len(items) / took


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(num, den, strict=True))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ingestion(stack: Stack, n: int) -> dict[str, float]:
    import httpx

    line = b'{"prompt": "How do I bake bread at home?", "response": "Mix flour, water, salt and yeast, then bake."}\n'
    body = line * n
    t0 = time.perf_counter()
    resp = httpx.post(f"http://127.0.0.1:{stack.port}/v1/jobs", content=body, timeout=1800,
                      headers={"Content-Type": "application/x-ndjson"})  # fmt: skip
    took = time.perf_counter() - t0
    assert resp.status_code == 202, resp.text[:500]
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}") as c:
        c.post(f"/v1/jobs/{resp.json()['job_id']}/cancel")  # measured the intake; no need to score it
    return {"items": n, "items_per_s": n / took, "seconds": took, "api_peak_rss_mb": peak_rss_mb(stack.api_pid)}


@contextmanager
def throwaway_database(admin_url: str, name: str) -> Iterator[str]:
    """A PostgreSQL database made for one measurement and dropped after it; yields its SQLAlchemy URL."""
    import psycopg

    from rewardq.storage.db import get_engine

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_ingestion(admin_url: str, tmp: Path, n: int) -> dict[str, float]:
    with throwaway_database(admin_url, f"rewardq_bench_{os.getpid()}") as url:
        stack = Stack(tmp, db_url=url, worker=False)
        try:
            return ingestion(stack, n)
        finally:
            stack.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    p.add_argument("--ingest-items", type=int, default=1_000_000)
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="N pairs of each workload: the first N, or more copies of it with their own texts past its size",
    )
    p.add_argument(
        "--pg-admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="where to create a throwaway database for the PostgreSQL ingestion run ('' to skip)",
    )
    p.add_argument("--profiles", default="exact,fast", help="the profiles (a) and (c) run in: exact, fast or both")
    p.add_argument("--peers", default="b,b2,b3", help="the user scripts to measure beside them")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline.json")
    args = p.parse_args()
    from rewardq.storage.settings import get_settings
    from rewardq.workers.precision import cpu_model, matrix_flags

    batch_size = get_settings().batch_size
    profiles = [x for x in args.profiles.split(",") if x]
    peers = [x for x in args.peers.split(",") if x]
    skipped = {}
    if "b2" in peers and (why := onnx_missing()):
        peers.remove("b2")
        skipped["b2"] = why
        print(f"(b2) ONNX Runtime skipped: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="rewardq-bench-"))
    nonce = uuid.uuid4().hex[:8]
    # One stack per profile, each with a worker, queues and a database of its own (the first serves ingestion).
    stacks = {}
    rows = []
    try:
        for profile in profiles:
            stacks[profile] = Stack(tmp, name=f"-{profile}", env={"REWARDQ_PRECISION": profile})
        stack = stacks[profiles[0]]
        ways = {}
        for profile in profiles:
            suffix = "" if profile == "exact" else f"_{profile}"
            ways[f"a{suffix}"] = lambda v, p=profile: in_process(v, batch_size, p)
            ways[f"c{suffix}"] = lambda v, p=profile: pipeline(stacks[p], v)
        peer_ways = {"b": user_script, "b2": onnx_script, "b3": lambda v: user_script(v, bf16=True)}
        ways.update({k: peer_ways[k] for k in peers})
        names = sorted(ways)
        first_c = "c" if profiles[0] == "exact" else f"c_{profiles[0]}"  # its cache hits are counted
        for w, (name, items) in enumerate(workloads().items()):
            items = _sized(items, args.pairs)
            warm = _variant(items[:64], f"{nonce}.{w}.warm")  # model loads and first-call costs, not measured
            for way in names:
                ways[way](warm)
            # Each repetition gets texts no cache has seen (the worker's LRU and the shared Redis cache
            # outlive a run, and the nonce keeps an earlier invocation's entries out). Every way runs back to
            # back on the same texts, in a rotating order, so a drift in the speed of a shared machine lands
            # on all alike; each ratio is the median of the per-repetition ratios.
            took: dict[str, list[float]] = {way: [] for way in names}
            hits = []  # per repetition: texts the worker did not have to encode (a prompt repeated in the job)
            for k in range(args.repeat):
                v = _variant(items, f"{nonce}.{w}.{k}")
                shift = k % len(names)
                for way in names[shift:] + names[:shift]:
                    took[way].append(ways[way](v))
                    if way == first_c:
                        hits.append(float(stack.last_cache_hits))
            row = {"workload": name, "pairs": len(items), "runs": took, "pipeline_cache_hits": hits}
            row.update({f"{way}_pairs_per_s": statistics.median(took[way]) for way in names})
            row.update({f"{x}_over_{y}": _median_ratio(took[x], took[y])
                        for x in names if x.startswith("c") for y in names if y != x})  # fmt: skip
            for old_key, way in (("a_in_process", "a"), ("b_user_script", "b"), ("c_pipeline", "c")):
                if way in took:  # the names the README and earlier results use
                    row[old_key] = row[f"{way}_pairs_per_s"]
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{way} {row[f'{way}_pairs_per_s']:.0f}" for way in names), flush=True)
        ingest = {"SQLite": ingestion(stack, args.ingest_items)} if args.ingest_items else {}
    finally:
        for st in stacks.values():
            st.close()
    if args.pg_admin_url and args.ingest_items:
        ingest["PostgreSQL"] = pg_ingestion(args.pg_admin_url, tmp, args.ingest_items)
    labels = {"a": "(a) in-process", "b": "(b) ST fp32", "b2": "(b2) ONNX Runtime", "b3": "(b3) ST bf16",
              "c": "(c) pipeline"}  # fmt: skip
    names = sorted(rows[0]["runs"]) if rows else []

    def label(way: str) -> str:
        base, _, profile = way.partition("_")
        return labels[base] + (f" {profile}" if profile else "")

    ratios = [(x, y) for x in names if x.startswith("c") for y in names if y.startswith("b") or y == "c"]
    ratios = [(x, y) for x, y in ratios if x != y]
    print("| workload | pairs | " + " | ".join(f"{label(w)} pairs/s" for w in names) + " | "
          + " | ".join(f"{x}/{y}" for x, y in ratios) + " |")  # fmt: skip
    print("|---|---|" + "---|" * (len(names) + len(ratios)))
    for r in rows:
        print(f"| {r['workload']} | {r['pairs']} | " + " | ".join(f"{r[f'{w}_pairs_per_s']:.0f}" for w in names)
              + " | " + " | ".join(f"{r[f'{x}_over_{y}']:.2f}" for x, y in ratios) + " |")  # fmt: skip
    print("| ingestion (ndjson POST) | items | items/s | API peak RSS |")
    print("|---|---|---|---|")
    for db, r in ingest.items():
        print(f"| {db} | {r['items']:,} | {r['items_per_s']:,.0f} | {r['api_peak_rss_mb']:.0f} MB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "repeat": args.repeat, "batch_size": batch_size, "nonce": nonce,
            "profiles": profiles, "peers": peers, "skipped": skipped, "cpu_flags": matrix_flags()}  # fmt: skip
    meta["cpu_model"] = cpu_model()
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "ingestion": ingest}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    # A step's time limit (rewardq selfcheck) sends SIGTERM: exit through the finally blocks, which stop the stacks'
    # Redis, worker and API (they run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
