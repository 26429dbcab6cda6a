"""`rewardq selfcheck` (and `make gpu-check`): one command for a new GPU box. It prints the device, driver, torch,
Triton and CUDA versions, proves every compiled kernel against the float64 reference (kernels.selfcheck), then runs
short versions of the kernel benchmarks and the pipeline benchmark on 20,000 pairs with the encoder in fp32 and in
bf16, writes every figure to one JSON file and prints the table docs/gpu.md shows. Each step has its own time limit,
so the whole fits in 8 minutes on one GPU. On a CPU machine it runs the checks under the Triton interpreter and says
plainly that GPU figures need a GPU."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[2]  # the repository (benchmarks/ lies beside rewardq/)
BENCH = ROOT / "benchmarks"
# Seconds each GPU step may take at most; the whole command also keeps to --budget-s (default 450 s, under the
# 8 minutes promised): a step gets what is left when that is less, and one that starts with under MIN_STEP_S left is
# skipped and says so. The JSON is rewritten after every step, so a command killed from outside keeps what ran.
LIMITS = {
    "sim_exp": 90,
    "logprob": 150,
    "pipeline_fp32": 120,
    "pipeline_bf16": 120,
    "probe": 90,
    "pipeline_fp32_batch2048": 120,
}
MIN_STEP_S = 20.0
NO_GPU = "GPU figures need a GPU: only the interpreter checks ran here (run `rewardq selfcheck` on a CUDA machine)"


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "type": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if info["type"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return info


def _run(argv: list[str], limit_s: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run a step; at its limit it gets SIGTERM and 15 s to close what it started (the pipeline benchmark stops its
    Redis, worker and API, which run in sessions of their own and would otherwise go on using the GPU while the next
    step is measured), then SIGKILL."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or dict(os.environ),
        cwd=ROOT,
    )
    try:
        out, _ = proc.communicate(timeout=limit_s)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return 124, (out or "") + f"\n(stopped at its {limit_s:.0f} s limit)", time.monotonic() - t0


def kernel_checks(device: str) -> dict[str, Any]:
    from dataclasses import asdict

    from rewardq.kernels.selfcheck import CHILD, failed_kernels, run_in_child

    t0 = time.monotonic()
    checks = run_in_child(device, ["float32", "bfloat16", "float16"], timeout_s=300)
    took = time.monotonic() - t0
    if any(c.case == CHILD for c in checks):  # the child died: no check ran
        return {
            "passed": False,
            "count": 0,
            "failed": failed_kernels(checks),
            "error": checks[0].error,
            "seconds": took,
        }
    failed = failed_kernels(checks)
    return {
        "passed": not failed,
        "count": len(checks),
        "failed": failed,
        "seconds": round(took, 1),
        "details": [asdict(c) for c in checks],
    }


def _bench(
    name: str, argv: list[str], out_dir: Path, env: dict[str, str] | None = None, deadline: float | None = None
) -> dict[str, Any]:
    limit = float(LIMITS[name])
    if deadline is not None:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            return {"skipped": f"out of time: {left:.0f} s of the command's budget left"}
        limit = min(limit, left)
    code, out, took = _run([sys.executable, *argv], limit, env)
    found = sorted(out_dir.glob(f"{name.split('_')[0]}*.json"))
    result: dict[str, Any] = {"exit": code, "seconds": round(took, 1)}
    if found:
        try:
            result["figures"] = json.loads(found[-1].read_text())
        except ValueError:  # written when the step was stopped
            result["figures_error"] = f"{found[-1].name} is not whole JSON"
        found[-1].unlink()
    if code != 0:
        result["log_tail"] = out[-3000:]
    return result


def gpu_benchmarks(
    tmp: Path,
    dry_run: bool = False,
    deadline: float | None = None,
    out: dict[str, Any] | None = None,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The GPU steps, each result added to ``out`` as it comes (``progress`` is called after each); ``dry_run``: the
    same steps at toy sizes on the CPU (what CI runs to keep them working)."""
    out = {} if out is None else out
    size = "--dry-run" if dry_run else "--quick"
    for name in ("sim_exp", "logprob"):
        script = BENCH / f"benchmark_{name}.py"
        out[name] = _bench(name, [str(script), size, "--out-dir", str(tmp)], tmp, deadline=deadline)
        progress()

    def probe() -> None:  # where a batch's time goes in each profile, in process
        argv = [
            str(BENCH / "probe_precision_gpu.py"),
            *(["--dry-run"] if dry_run else []),
            "--out",
            str(tmp / "probe.json"),
        ]
        out["probe"] = _bench("probe", argv, tmp, deadline=deadline)
        progress()

    if shutil.which("redis-server") is None and not os.environ.get("REWARDQ_REDIS_URL"):
        out["pipeline"] = {"skipped": "no redis-server here and no REWARDQ_REDIS_URL: the pipeline needs Redis"}
        probe()
        return out
    steps: list[tuple[str, str, dict[str, str]]] = [("exact", "pipeline_fp32", {})]
    if not dry_run:  # and REWARDQ_BATCH_SIZE on a GPU, where each message's fixed cost decides the rate
        steps += [("fast", "pipeline_bf16", {}), ("exact", "pipeline_fp32_batch2048", {"REWARDQ_BATCH_SIZE": "2048"})]
    # ROOT first, and whatever PYTHONPATH already holds after it (device_check.sh puts carried packages there)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for precision, label, extra in steps:
        env = {**os.environ, "PYTHONPATH": path, "REWARDQ_PRECISION": precision, **extra}
        argv = [
            str(BENCH / "benchmark_pipeline.py"),
            "--pairs",
            "32" if dry_run else "20000",
            "--repeat",
            "1",
            "--ingest-items",
            "0",
            "--pg-admin-url",
            "",
            "--profiles",
            precision,
            "--peers",
            "b",
            "--out",
            str(tmp / f"{label}.json"),
        ]
        out[label] = _bench(label, argv, tmp, env, deadline=deadline)
        progress()
        if label == "pipeline_bf16" or dry_run:  # after the bf16 pipeline (the dry run has only the fp32 one)
            probe()
    return out


def table(report: dict[str, Any]) -> str:
    d = report["device"]
    lines = [
        "| | |",
        "|---|---|",
        f"| device | {d.get('name', d['type'])} ({d['type']}) |",
        f"| driver / CUDA | {d.get('driver') or '-'} / {d.get('cuda') or '-'} |",
        f"| torch / Triton / Python | {d['torch']} / {d.get('triton') or '-'} / {d['python']} |",
        f"| kernel checks | {report['checks']['count']} run, "
        + ("all passed" if report["checks"]["passed"] else f"FAILED: {', '.join(report['checks']['failed'])}")
        + f" ({'compiled' if d['type'] == 'cuda' else 'Triton interpreter'}) |",
    ]
    for name, result in report["benchmarks"].items():
        if "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} |")
            continue
        figures = result.get("figures") or {}
        summary = "failed (see log_tail)" if result.get("exit") else "ok"
        rows = figures.get("rows") if isinstance(figures, dict) else None
        if name.startswith("pipeline") and rows:
            c = next((w for w in ("c", "c_fast") if w in rows[0].get("runs", {})), "c")
            summary = "; ".join(
                f"{r['workload']}: {r[f'{c}_pairs_per_s']:.0f} pairs/s (c/b {r[f'{c}_over_b']:.2f})" for r in rows
            )
        elif rows:
            summary = f"{len(rows)} rows"
        elif name == "probe" and isinstance(figures, dict) and figures.get("profiles"):
            summary = "ms per batch in process, new shapes / seen shapes: " + ", ".join(
                f"{k} {v['new_shapes_ms_median']:.1f} / {v['seen_shapes_ms_median']:.1f}"
                for k, v in figures["profiles"].items()
            )
        lines.append(f"| {name} | {summary}, {result['seconds']} s |")
    lines.append(f"| total | {report['seconds']} s |")
    return "\n".join(lines)


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=BENCH / "results" / "selfcheck.json",
    show_default=True,
    help="the JSON file with every figure",
)
@click.option("--skip-benchmarks", is_flag=True, help="device and kernel checks only")
@click.option(
    "--dry-run", is_flag=True, help="on a CPU: run the GPU steps too, at toy sizes (their figures mean nothing)"
)
@click.option(
    "--budget-s",
    type=click.FloatRange(min=60),
    default=450.0,
    show_default=True,
    help="seconds the whole command may take: a step gets what is left when that is less than its own limit",
)
@click.option("--note", default="", help="a line to keep in the JSON (how this machine was set up, say)")
def selfcheck(out: Path, skip_benchmarks: bool, dry_run: bool, budget_s: float, note: str) -> None:
    """Check this machine: versions, every compiled kernel against the float64 reference, and (on a GPU) short
    kernel and pipeline benchmarks, in under 8 minutes. Exits 1 when a kernel check fails."""
    t0 = time.monotonic()
    deadline = t0 + budget_s
    info = device_info()
    click.echo(
        f"device: {info.get('name', info['type'])}; torch {info['torch']}, triton {info.get('triton')}, "
        f"CUDA {info.get('cuda')}, driver {info.get('driver', '-')}"
    )
    report: dict[str, Any] = {"device": info, "checks": {}, "benchmarks": {}, "note": "", "seconds": 0.0}
    notes = [note] if note else []
    if info["type"] != "cuda":
        notes.append(NO_GPU)

    def save() -> None:
        report["note"] = "; ".join(notes)
        report["seconds"] = round(time.monotonic() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")  # a kill mid-write leaves the last whole report
        part.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(part, out)

    report["checks"] = checks = kernel_checks(info["type"])
    save()
    if not skip_benchmarks and (info["type"] == "cuda" or dry_run):
        if info["type"] != "cuda":
            notes.append("dry run: the GPU steps ran at toy sizes on this CPU, and their figures mean nothing")
        with tempfile.TemporaryDirectory(prefix="rewardq-selfcheck-") as tmp:
            dry = info["type"] != "cuda"  # a dry run's toy steps are never cut short (CI asserts on each)
            gpu_benchmarks(
                Path(tmp), dry_run=dry, deadline=None if dry else deadline, out=report["benchmarks"], progress=save
            )
    save()
    click.echo(table(report))
    if report["note"]:
        click.echo(report["note"])
    click.echo(f"wrote {out}")
    if not checks["passed"]:
        raise SystemExit(1)
