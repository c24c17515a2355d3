"""The chunked scan and the fused C++ CPU scan against the sequential float64 reference, forward and backward, 2 threads.

Shapes of one Mamba unit of the paper's models: batch 1, d = 384 channels, n = 16 states, L tokens
(33,635 = evim3-p4's padded volume). Inputs are drawn as the Mamba block produces them (softplus(dt +
dt_bias) with mamba-ssm's dt init, A = -(1..16)). Targets at L = 33,635: chunked <= 1/4 of the
reference's time and <= 0.4 GB extra peak memory.

Each (implementation, L) runs in a fresh child process so that its peak memory is its own: the child
builds the inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs the scan once,
and reports VmHWM minus the RSS it started from; then it times further runs. Both implementations get
the same treatment in the same run. The parent also checks the outputs agree (relative L2 error).

Backward rows: the time of the backward pass alone (the forward before it untimed) and the extra peak memory
of the first forward + backward, with every input requiring grad; the reference's backward is autograd through
its (b, d, L, n) tensors, the chunked scan's its hand-written backward, the fused CPU scan's its C++ backward.
Their error column compares du. The reference's backward needs ~1.5 GB at L = 8,192, so its lengths are shorter.

    python -m benchmarks.bench_scan                                   # print the table
    python -m benchmarks.bench_scan --lengths 64 --backward-lengths 64 --runs 1   # a seconds-long smoke run
    python -m benchmarks scan                                         # print and append to BENCHMARKS.md
    EVIM3_BENCH_SCAN_LENGTHS=2048 EVIM3_BENCH_SCAN_BACKWARD_LENGTHS=2048 python -m benchmarks scan
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2
D_INNER, D_STATE = 384, 16
LENGTHS = (2048, 8192, 33635)
BACKWARD_LENGTHS = (2048,)  # the reference backward (autograd through a Python loop) at L = 8,192 ran > 11 min
RUNS = 3  # timed runs per (implementation, L); the best is reported
IMPLEMENTATIONS = ("chunked", "fused_cpu", "ref")
ROOT = Path(__file__).resolve().parent.parent


def proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def scan_inputs(seqlen: int, seed: int = 0) -> dict:
    """Arguments of one Mamba unit's scan call (selective_scan's keywords), batch 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(D_INNER, generator=g) * (np.log(0.1) - np.log(0.001)) + np.log(0.001))
    return {
        "u": torch.randn(1, D_INNER, seqlen, generator=g),
        "delta": 0.5 * torch.randn(1, D_INNER, seqlen, generator=g),
        "A": -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(D_INNER, 1),
        "B": torch.randn(1, D_STATE, seqlen, generator=g),
        "C": torch.randn(1, D_STATE, seqlen, generator=g),
        "D": torch.ones(D_INNER),
        "z": torch.randn(1, D_INNER, seqlen, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as mamba-ssm's dt_proj init
        "delta_softplus": True,
    }


def lengths_from_env(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """EVIM3_BENCH_SCAN_LENGTHS / _BACKWARD_LENGTHS (comma-separated), for runs through python -m benchmarks."""
    value = os.environ.get(name, "").strip()
    return tuple(int(x) for x in value.split(",")) if value else default


def measure(implementation: str, seqlen: int, runs: int, out_npy: str | None = None,
            backward: bool = False) -> dict[str, Any]:
    """In this process: extra peak memory of the first call, best time over `runs` calls (of the backward
    alone when `backward`)."""
    import time

    import torch

    from evim3.ops import selective_scan_chunked, selective_scan_ref
    from evim3.ops.selective_scan_cpu import selective_scan_cpu

    torch.set_num_threads(THREADS)
    scan = {"chunked": selective_scan_chunked, "fused_cpu": selective_scan_cpu, "ref": selective_scan_ref}[
        implementation
    ]
    def call(inputs: dict) -> tuple[float, np.ndarray]:
        """(seconds, the compared array): the forward's time and y, or the backward's time and du."""
        if not backward:
            with torch.no_grad():
                t0 = time.perf_counter()
                y = scan(**inputs)
                return time.perf_counter() - t0, y.numpy()
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        y = scan(**{**inputs, **leaves})
        t0 = time.perf_counter()
        y.backward(torch.ones_like(y))
        return time.perf_counter() - t0, leaves["u"].grad.numpy()

    call(scan_inputs(64))  # one-time costs (thread pool, lazy kernels) stay out of the numbers
    inputs = scan_inputs(seqlen)
    start_rss = proc_status_kib("VmRSS")
    if not reset_peak_rss():
        start_rss = proc_status_kib("VmHWM")  # fallback: growth of the process-lifetime peak
    times = []
    for _ in range(runs):
        seconds, result = call(inputs)
        times.append(seconds)
        if len(times) == 1:
            extra_peak = (proc_status_kib("VmHWM") - start_rss) * 1024
    if out_npy:
        np.save(out_npy, result)
    return {"seconds": min(times), "seconds_all": times, "extra_peak_bytes": extra_peak}


def measure_in_child(implementation: str, seqlen: int, runs: int, out_npy: str, backward: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_scan", "--child", implementation, str(seqlen),
           "--runs", str(runs), "--out", out_npy, *(["--backward"] if backward else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{implementation} L={seqlen} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(lengths: tuple[int, ...] | None = None, runs: int = RUNS,
        backward_lengths: tuple[int, ...] | None = None) -> dict[str, Any]:
    lengths = lengths or lengths_from_env("EVIM3_BENCH_SCAN_LENGTHS", LENGTHS)
    backward_lengths = backward_lengths or lengths_from_env("EVIM3_BENCH_SCAN_BACKWARD_LENGTHS", BACKWARD_LENGTHS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for direction, seqlen in [("forward", L) for L in lengths] + [("backward", L) for L in backward_lengths]:
            backward = direction == "backward"
            result, outputs = {}, {}
            for implementation in IMPLEMENTATIONS:
                outputs[implementation] = os.path.join(tmp, f"{implementation}-{direction}-{seqlen}.npy")
                result[implementation] = measure_in_child(implementation, seqlen, runs, outputs[implementation],
                                                          backward)
            y_ref = np.load(outputs["ref"]).astype(np.float64)
            row: dict[str, Any] = {"pass": direction, "L": seqlen}
            for name in IMPLEMENTATIONS:
                row[f"{name}_s"] = result[name]["seconds"]
            for name in ("chunked", "fused_cpu"):
                y = np.load(outputs[name]).astype(np.float64)
                row[f"{name}_time_ratio"] = result[name]["seconds"] / result["ref"]["seconds"]
                row[f"{name}_extra_peak_GB"] = result[name]["extra_peak_bytes"] / 1e9
                row[f"{name}_rel_l2_err"] = float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))
            row["ref_extra_peak_GB"] = result["ref"]["extra_peak_bytes"] / 1e9
            rows.append(row)
    target = next((r for r in rows if r["L"] == 33635 and r["pass"] == "forward"), None)
    summary: dict[str, Any] = {
        "rows": rows,
        "setup": f"batch 1, d={D_INNER}, n={D_STATE}, {THREADS} threads; forward without grad, backward timed "
                 f"alone (error column: du); best of {runs} runs; extra peak = VmHWM growth over the first call "
                 "(forward + backward in the backward rows) in a fresh process",
    }
    if target:
        summary["target_time_ratio_le_0.25"] = target["chunked_time_ratio"] <= 0.25
        summary["target_chunked_extra_peak_le_0.4GB"] = target["chunked_extra_peak_GB"] <= 0.4
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="*", help=f"forward rows (default {LENGTHS})")
    parser.add_argument("--backward-lengths", type=int, nargs="*", help=f"backward rows (default {BACKWARD_LENGTHS})")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.runs, args.out, args.backward)))
        return
    lengths = tuple(args.lengths) if args.lengths else None
    backward_lengths = tuple(args.backward_lengths) if args.backward_lengths else None
    print(json.dumps(run(lengths, args.runs, backward_lengths), indent=2))


if __name__ == "__main__":
    main()
