"""A million-row Parquet file in (rewardq submit) and a million-row job out as Parquet (rewardq results), through a
live API on SQLite, with the client's peak RSS and rows/s; each client run is a fresh process (its own RSS).

The job going in is only ingested (no worker scores it; the feeder keeps a few batches in Redis and the job is
cancelled afterwards); the job coming out is a finished job of synthetic scores written straight to SQL.
Writes benchmarks/results/formats.json.

    python benchmarks/benchmark_formats.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark_pipeline import Stack  # noqa: E402


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())])
    with pq.ParquetWriter(str(path), schema) as writer:
        for lo in range(0, rows, 100_000):
            n = min(100_000, rows - lo)
            writer.write_table(
                pa.table(
                    {
                        "id": [f"r{i}" for i in range(lo, lo + n)],
                        "prompt": [
                            f"Question number {i % 5000}: what do you think about topic {i % 97}?"
                            for i in range(lo, lo + n)
                        ],
                        "response": [
                            f"An answer of some length, number {i}, about topic {i % 97}." for i in range(lo, lo + n)
                        ],
                    },
                    schema=schema,
                )
            )


_WRAP = (
    "import atexit, resource, runpy, sys; "
    "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
    "atexit.register(lambda: print('PEAK_RSS_KB', peak(), file=sys.stderr)); "
    "sys.argv = ['rewardq', *sys.argv[1:]]; runpy.run_module('rewardq', run_name='__main__')"
)


def timed_cli(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run the CLI in a child: (wall seconds, the child's own peak RSS in MB, its first line of output)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAP, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    rss_kb = next(float(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return wall, rss_kb / 1024, (out.stdout.strip().splitlines() or [""])[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=RESULTS / "formats.json")
    args = p.parse_args()
    from tests.support import seed_scored_job

    with tempfile.TemporaryDirectory(prefix="rewardq-formats-") as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "pairs.parquet"
        write_parquet(src, args.rows)
        stack = Stack(tmp, worker=False)
        try:
            env = {**stack.env, "REWARDQ_API_URL": f"http://127.0.0.1:{stack.port}"}
            # In: the Parquet file streamed as ndjson; the first child is the only one waited for so far.
            sub_s, sub_rss, job_in = timed_cli(["submit", str(src)], env)
            from rewardq.client.client import Client

            with Client(env["REWARDQ_API_URL"]) as c:
                assert c.job(job_in, summary=False)["progress"]["total"] == args.rows
                c.cancel(job_in)
            from rewardq.storage.db import get_sessionmaker
            from rewardq.storage.registry import default_version

            with get_sessionmaker(stack.db_url)() as s:
                version = default_version(s)
            job_out = seed_scored_job(stack.db_url, tenant="default", n=args.rows, model_version=str(version))
            # Out: the jsonl stream written as Parquet a row group at a time.
            exp_s, exp_rss, _ = timed_cli(
                ["results", job_out, "--format", "parquet", "-o", str(tmp / "out.parquet")], env
            )
            import pyarrow.parquet as pq

            assert pq.ParquetFile(tmp / "out.parquet").metadata.num_rows == args.rows
        finally:
            stack.close()
    result = {
        "rows": args.rows,
        "submit_parquet": {"seconds": sub_s, "rows_per_s": args.rows / sub_s, "client_peak_rss_mb": sub_rss},
        "export_parquet": {"seconds": exp_s, "rows_per_s": args.rows / exp_s, "client_peak_rss_mb": exp_rss},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(
        f"submit {args.rows:,} Parquet rows: {args.rows / sub_s:,.0f} rows/s, client peak RSS {sub_rss:.0f} MB | "
        f"export {args.rows:,} rows as Parquet: {args.rows / exp_s:,.0f} rows/s, client peak RSS {exp_rss:.0f} MB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
