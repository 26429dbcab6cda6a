"""Where a batch's time goes in each precision profile, in process (what a worker runs per batch): the median time
of a 256-pair batch of unique STS-B dev pairs, exact (fp32) against fast (bf16 autocast), and torch.profiler's top
operators by host time and by device time for one batch of each. A diagnostic for a GPU loan (the first one found the
fast profile slower than the exact one in the pipeline on an H200); on a CPU it runs the same steps.

    python benchmarks/probe_precision_gpu.py [--out FILE] [--batches 8] [--dry-run]

`rewardq selfcheck` runs it on a GPU after the pipeline steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON with the timings and the profiler tables")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--dry-run", action="store_true", help="one 16-pair batch (CI runs it on the CPU)")
    args = p.parse_args()
    size = 16 if args.dry_run else 256
    args.batches = 1 if args.dry_run else args.batches

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from api.samples import load_bundled, load_sts
    from storage.settings import Settings
    from workers.models.sim_exp import SimExpModel, set_precision
    from workers.precision import resolve_autocast
    from workers.registry import default_encoder_path

    pairs = load_sts("dev") or load_bundled()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "profiles": {}}
    for profile in ("exact", "fast"):
        model = SimExpModel("probe", default_encoder_path())
        model.cache_size = 0  # every batch encodes its texts
        set_precision(model, resolve_autocast(Settings(precision=profile), model.device.type))
        batches = [pairs[i * size : (i + 1) * size] for i in range(args.batches + 2)]
        for b in batches[:2]:  # first-call costs
            model.score([x["prompt"] for x in b], [x["response"] for x in b])
        took = []
        for b in batches[2:]:
            t0 = time.perf_counter()
            model.score([x["prompt"] for x in b], [x["response"] for x in b])
            took.append((time.perf_counter() - t0) * 1e3)
        b = batches[2]
        with torch_profile(activities=activities) as prof:
            model.score([x["prompt"] for x in b], [x["response"] for x in b])
        ka = prof.key_averages()
        host = ka.table(sort_by="self_cpu_time_total", row_limit=15)
        device = ka.table(sort_by="self_cuda_time_total", row_limit=15) if cuda else ""
        report["profiles"][profile] = {
            "autocast": model.autocast,
            "passes": model.passes,
            "batch_ms_median": statistics.median(took),
            "batch_ms": took,
            "host_table": host,
            "device_table": device,
        }
        print(
            f"== {profile} (autocast {model.autocast}, passes {model.passes}): median {statistics.median(took):.1f} ms"
        )
        print(host)
        print(device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
