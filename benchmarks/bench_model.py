"""Eager PyTorch forward latency of the presets on 2 CPU threads, batch 1 (EF head, random weights: the
weights do not change the compute). evim3-tiny and evim3-small: median of several runs after warm-up;
the paper's evim3 and evim3-p4: one run each (tens of seconds on a CPU). Also the extra peak memory of the
first forward (VmHWM growth) and the achieved GFLOP/s against model_flops.

    python -m benchmarks.bench_model          # print
    python -m benchmarks model                # print and append to BENCHMARKS.md
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from benchmarks.bench_scan import proc_status_kib, reset_peak_rss

THREADS = 2
# (preset, warm-up runs, timed runs)
PLAN = (("evim3-tiny", 2, 10), ("evim3-small", 1, 5), ("evim3", 0, 1), ("evim3-p4", 0, 1))


def measure_preset(preset: str, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from evim3.config import get_preset
    from evim3.models.evim3 import EViM3, model_flops

    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = EViM3(cfg).eval()
    clip = torch.randn(1, cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size)
    times = []
    with torch.no_grad():
        start_rss = proc_status_kib("VmRSS")
        reset_peak_rss()
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(clip)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        extra_peak = (proc_status_kib("VmHWM") - start_rss) * 1024
    median = statistics.median(times)
    return {
        "preset": preset, "tokens": cfg.num_tokens, "gflops": model_flops(cfg) / 1e9,
        "runs": runs, "median_s": median, "min_s": min(times),
        "gflop_per_s": model_flops(cfg) / 1e9 / median, "extra_peak_GB": extra_peak / 1e9,
    }


def run(plan: tuple[tuple[str, int, int], ...] = PLAN) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    rows = [measure_preset(*step) for step in plan]
    return {"rows": rows, "setup": f"eager forward, batch 1, {THREADS} threads, torch {torch.__version__}, "
                                   "chunked selective scan, no grad; extra peak = VmHWM growth over the runs"}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
