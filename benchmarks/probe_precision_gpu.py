"""Where a batch's time goes in each precision profile, in process (what a worker runs per batch): exact (fp32)
against fast (bf16 autocast), on full 256-pair batches of STS-B train pairs. Each batch is timed twice: first when its
shapes are new to the process (as a worker's batches nearly always are), then again with every shape seen, so a cost
paid once per shape (an execution plan, a heuristic) shows as the difference. torch.profiler's top operators by host
time and by device time come from one more batch, also new. A diagnostic for a GPU loan (the first one found the
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

    from rewardq.client.samples import load_bundled, load_sts
    from rewardq.storage.settings import Settings
    from rewardq.workers.models.sim_exp import SimExpModel, set_precision
    from rewardq.workers.precision import resolve_autocast
    from rewardq.workers.registry import default_encoder_path

    pool = load_sts("train") or load_sts("dev") or load_bundled()
    need = (args.batches + 3) * size
    pairs = [pool[i % len(pool)] for i in range(need)]  # full batches (the bundled sample is small: it repeats)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "batch_pairs": size, "profiles": {}}

    def run(model, batch) -> float:
        t0 = time.perf_counter()
        model.score([x["prompt"] for x in batch], [x["response"] for x in batch])
        return (time.perf_counter() - t0) * 1e3

    for profile in ("exact", "fast"):
        model = SimExpModel("probe", default_encoder_path())
        model.cache_size = 0  # every batch encodes its texts
        set_precision(model, resolve_autocast(Settings(precision=profile), model.device.type))
        # Each profile gets batches of its own, so neither sees shapes the other ran first.
        offset = 0 if profile == "exact" else len(pairs) // 2
        mine = pairs[offset:] + pairs[:offset]
        batches = [mine[i * size : (i + 1) * size] for i in range(args.batches + 3)]
        assert all(len(b) == size for b in batches)
        run(model, batches[0])  # model load and first-call costs
        timed = batches[1 : args.batches + 1]
        new = [run(model, b) for b in timed]
        seen = [run(model, b) for b in timed]
        with torch_profile(activities=activities) as prof:
            run(model, batches[-1])
        ka = prof.key_averages()
        host = ka.table(sort_by="self_cpu_time_total", row_limit=15)
        device = ka.table(sort_by="self_cuda_time_total", row_limit=15) if cuda else ""
        report["profiles"][profile] = {
            "autocast": model.autocast,
            "passes": model.passes,
            "new_shapes_ms_median": statistics.median(new),
            "seen_shapes_ms_median": statistics.median(seen),
            "new_shapes_ms": new,
            "seen_shapes_ms": seen,
            "profiled_batch_host_table": host,
            "profiled_batch_device_table": device,
        }
        print(
            f"== {profile} (autocast {model.autocast}, passes {model.passes}): median ms per {size}-pair batch, "
            f"new shapes {statistics.median(new):.1f}, seen shapes {statistics.median(seen):.1f}"
        )
        print(host)
        print(device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
