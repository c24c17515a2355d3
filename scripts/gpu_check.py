"""The GPU check: every CUDA path of evim3 in one run, a table on stdout and JSON in $OUT.

Run through scripts/gpu_check.sh on a machine with one NVIDIA GPU (no internet needed; ~5-6 minutes on an H100
without the optional mamba-ssm build). Each check is independent: a missing optional piece (mamba-ssm,
onnxruntime-gpu, TensorRT) is reported as "skipped" with the reason, a failure as "FAIL" with the error, and the
script goes on. Every row has a threshold. Correctness thresholds (parity with float64, finite and falling
losses, determinism) give "FAIL" and exit status 1; performance targets (issue 14: Triton within 1.5x of
mamba-ssm's kernel, `evim3` >= 20 train clips/s, half the peak memory of the chunked scan's 2026-11-27 run; issue 27:
`evim3-p4` >= 8, p4 pre-training >= 16, up from issue 14's 4 and 8) give "MISS" when not met: reported, not an error. The JSON is rewritten after
every check, so a run cut short keeps what it measured.

Side by side, for each scan (chunked, Triton, mamba-ssm when installed): the scan's forward+backward time and
peak memory at `evim3` and `evim3-p4` sizes (batch 4 and 2, d_inner = 2 D, L = tokens with the global tokens,
d_state 16; bf16 u, delta, B, C, z and float32 A, D, delta_bias, as under autocast), and bf16 training and
inference clips/s and peak memory of both presets. MAE pre-training of `evim3-p4` runs with the Triton and
mamba-ssm scans only (the chunked scan's 0.64 clips/s is in BENCHMARKS.md; its 26 s would not fit).

Issue 27 (training at a real fraction of the GPU), in the same run: the Triton scan's candidate variants
("triton-pre", "triton-pre-s2": a per-token prepass, time-contiguous B/C, pipelined loops; "triton-op": the current
kernels behind a torch.library custom op) each checked against float64 like the current kernels and timed beside
them, and a row saying which is kept (the fastest exact one); the training step with each variant, with fused
AdamW, and with the Mamba-3D blocks compiled (torch.compile around the custom op), beside the current step; the
kernels' registers and spills for this GPU (ptxas -v); and the step profile per preset (benchmarks/
bench_gpu_profile.py: time by kernel family beside its floor, MFU), printed as a second table. Targets: `evim3`
>= 20 train clips/s, `evim3-p4` >= 8, p4 MAE pre-training >= 16. A time budget (BUDGET_S) skips the optional rows,
with the reason, rather than let scripts/gpu_check.sh's timeout cut the table.

    python scripts/gpu_check.py            # on the GPU machine (scripts/gpu_check.sh runs it)
    python scripts/gpu_check.py --dry-run  # the checks' code on CPU at toy sizes (Triton through its interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from evim3.config import PRESETS
from evim3.models import EViM3
from evim3.ops import fused_available, scan_unavailable, selective_scan_chunked, selective_scan_ref, use_scan

RESULTS: list[dict] = []
SCANS = ("chunked", "triton", "mamba")
# Targets of issue 14 (one H100, bf16) and the peak memory of the chunked scan's run they halve (BENCHMARKS.md,
# GPU check 2026-11-27): train clips/s and peak GiB at the batch below.
# Issue 27 raised the clips/s targets: evim3-p4 8 (was 4), p4 pre-training 16 (was 8).
TRAIN_TARGETS = {"evim3": (20.0, 28.99 / 2), "evim3-p4": (8.0, 35.44 / 2)}
PRETRAIN_TARGET_CLIPS_S = 16.0
# Issue 27's candidates beside the current Triton kernels ("triton"); the GPU run keeps the fastest exact one.
VARIANTS = ("triton-pre", "triton-pre-s2", "triton-op")
START = time.monotonic()
TRITON_VS_MAMBA = 1.5
FWD_TOL, GRAD_TOL, BF16_TOL = 1e-5, 1e-4, 1e-2  # relative L2 vs float64: float32 output, float32 gradients, bf16


@dataclass(frozen=True)
class Plan:
    device: str
    parity_shape: tuple[int, int, int, int]  # (batch, d, n, L) of the parity checks
    scan_sizes: tuple[tuple[str, int, int, int, int], ...]  # (name, batch, d, n, L) of the timed scans
    train: tuple[tuple[str, int], ...]  # (preset, batch) of the training rows
    shrink: dict  # ModelConfig changes (the dry run's toy models)
    block_sweep: tuple[int, ...]  # Triton chunk lengths timed at the first scan size
    repeats: int
    model_scans: tuple[str, ...]  # scans the model-level rows try
    budget_s: float = 1e9  # optional rows are skipped once this many seconds have passed
    # (label, scan ("": the baseline's), fused AdamW, compile backend) of issue 27's train rows
    options: tuple[tuple[str, str, bool, str], ...] = ()
    profiles: tuple[str, ...] = ()  # bench_gpu_profile presets
    # (programs, warps) of the prepass variant's gradient kernel; not 4 warps: 255 registers, spills (triton_static)
    launch_sweep: tuple[tuple[int, int], ...] = ((512, 8), (2048, 8), (8192, 8))


def _paper_scan_size(preset: str, batch: int) -> tuple[str, int, int, int, int]:
    cfg = PRESETS[preset]
    return preset, batch, cfg.d_inner, cfg.d_state, cfg.num_tokens


# The chunked scan's model rows are left out (24 s and 41 s; BENCHMARKS.md has them): issue 27's rows need the time.
FULL = Plan("cuda", (2, 64, 16, 4099), (_paper_scan_size("evim3", 4), _paper_scan_size("evim3-p4", 2)),
            (("evim3", 4), ("evim3-p4", 2)), {}, (64, 128, 256), 5, ("triton", "mamba"), budget_s=290,
            options=(("triton-pre", "triton-pre", False, ""), ("triton-pre-s2", "triton-pre-s2", False, ""),
                     ("fused AdamW", "", True, ""), ("triton-op, blocks compiled", "triton-op", False, "inductor"),
                     ("triton-op, blocks compiled, CUDA graphs", "triton-op", False, "inductor/reduce-overhead")),
            profiles=("evim3", "evim3-p4", "p4-mae"))
# CPU toy sizes: the interpreter runs each scan combine as a Python call, so model rows leave Triton out.
DRY = Plan("cpu", (1, 2, 4, 37), (("toy", 1, 3, 4, 40), ("toy-long", 1, 2, 4, 70)),
           (("evim3", 1),), {"frames": 4, "img_size": 32, "dim": 16, "depth": 1}, (16, 32), 1, ("chunked", "cpu"),
           # the interpreter is too slow for the prepass variants at model size: the op (its CPU backend) is used
           options=(("fused AdamW", "", True, ""), ("triton-op, blocks compiled", "triton-op", False, "aot_eager")),
           profiles=("evim3", "p4-mae"), launch_sweep=((4, 8), (64, 8)))
PLAN = FULL


def check(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        def run(*args) -> None:
            t0 = time.perf_counter()
            try:
                row = fn(*args) or {}
                row.setdefault("status", "ok")
            except SkipCheck as e:
                row = {"status": "skipped", "why": str(e)}
            except Exception as e:  # noqa: BLE001 -- one failing check must not hide the others
                row = {"status": "FAIL", "why": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            title = name.format(*args)
            row["check"], row["seconds"] = title, round(time.perf_counter() - t0, 2)
            RESULTS.append(row)
            print(f"[{row['status']:>7}] {title}: {json.dumps({k: v for k, v in row.items() if k not in ('check', 'status')})}",
                  flush=True)
            _write_json()
            _free_memory()
        return run
    return wrap


class SkipCheck(Exception):
    pass


def _sync() -> None:
    if PLAN.device == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if PLAN.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if PLAN.device == "cuda" else None


def _free_memory() -> None:
    gc.collect()
    if PLAN.device == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Callable, repeats: int = 5) -> float:
    """Median seconds of `repeats` calls after one untimed call (compilation, autotuning, caches)."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _mark(row: dict, failed: bool, missed: bool = False) -> dict:
    """Correctness failures win over missed targets."""
    if failed:
        row["status"] = "FAIL"
    elif missed:
        row["status"] = "MISS"
    return row


@contextlib.contextmanager
def forced_scan(name: str) -> Iterator[None]:
    """EVIM3_SCAN=name for the model inside (the Mamba block and the dispatcher read it per call)."""
    previous = os.environ.get("EVIM3_SCAN")
    os.environ["EVIM3_SCAN"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["EVIM3_SCAN"]
        else:
            os.environ["EVIM3_SCAN"] = previous


def _mamba_missing() -> str:
    why = scan_unavailable("mamba", "cuda") or "not usable"
    log = os.environ.get("EVIM3_MAMBA_BUILD_LOG")
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = [line.strip() for line in f if line.strip()][-1:]
        return f"{why}; the build attempted by gpu_check.sh failed: {tail[0][:300] if tail else 'no output'}"
    return f"{why}; set EVIM3_GPU_CHECK_BUILD_MAMBA=1 to try building it here from source"


def _budget(check_name: str) -> None:
    """SkipCheck when the plan's time budget is spent (an optional row, skipped with the reason)."""
    spent = time.monotonic() - START
    if spent > PLAN.budget_s:
        raise SkipCheck(f"time budget: {spent:.0f} s of {PLAN.budget_s:.0f} s spent before {check_name}")


def _scan_function(name: str) -> Callable:
    """The scan `name` called directly, or SkipCheck with the reason it cannot run here."""
    if name in VARIANTS:
        why = scan_unavailable("triton", PLAN.device)
        if why:
            raise SkipCheck(why)
        if name == "triton-op":
            from evim3.ops.selective_scan_op import selective_scan_op

            return lambda *a, **kw: selective_scan_op(*a, backend="triton", **kw)
        from evim3.ops.selective_scan_triton_pre import (
            selective_scan_triton_pre,
            selective_scan_triton_pre_s2,
        )

        return selective_scan_triton_pre_s2 if name == "triton-pre-s2" else selective_scan_triton_pre
    if name == "chunked":
        return selective_scan_chunked
    if name == "mamba":
        if PLAN.device != "cuda" or scan_unavailable("mamba", "cuda"):
            raise SkipCheck(f"mamba-ssm: {_mamba_missing()}")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn
    if name == "cpu":
        from evim3.ops.selective_scan_cpu import selective_scan_cpu

        return selective_scan_cpu
    why = scan_unavailable("triton", PLAN.device)
    if why:
        raise SkipCheck(why)
    from evim3.ops.selective_scan_triton import selective_scan_triton

    return selective_scan_triton


def _parity_inputs(b: int, d: int, n: int, L: int, dtype: torch.dtype = torch.float32) -> dict:
    """Heavy-tailed dt through softplus(delta + bias), every option on; B, C as strided views of (b, L, n)."""
    g = torch.Generator(device=PLAN.device).manual_seed(0)
    kw = {"device": PLAN.device, "generator": g}
    return {
        "u": torch.randn(b, d, L, **kw).to(dtype), "delta": (torch.randn(b, d, L, **kw).exp() * 0.3).to(dtype),
        "A": -torch.rand(d, n, **kw) * 8 - 0.1,
        "B": torch.randn(b, L, n, **kw).to(dtype).transpose(1, 2), "C": torch.randn(b, L, n, **kw).to(dtype).transpose(1, 2),
        "D": torch.randn(d, **kw), "z": torch.randn(b, d, L, **kw).to(dtype), "delta_bias": torch.randn(d, **kw),
        "delta_softplus": True,
    }


def _model_scan_inputs(b: int, d: int, n: int, L: int) -> dict:
    """A Mamba unit's scan call under bf16 autocast: bf16 activations, float32 A, D, delta_bias (mamba-ssm's init)."""
    g = torch.Generator(device=PLAN.device).manual_seed(1)
    kw = {"device": PLAN.device, "generator": g}
    dt = torch.exp(torch.rand(d, **kw) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    bf16 = torch.bfloat16
    return {
        "u": torch.randn(b, d, L, **kw).to(bf16), "delta": (0.5 * torch.randn(b, d, L, **kw)).to(bf16),
        "A": -torch.arange(1, n + 1, dtype=torch.float32, device=PLAN.device).repeat(d, 1),
        "B": torch.randn(b, L, n, **kw).to(bf16).transpose(1, 2), "C": torch.randn(b, L, n, **kw).to(bf16).transpose(1, 2),
        "D": torch.ones(d, device=PLAN.device), "z": torch.randn(b, d, L, **kw).to(bf16),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)), "delta_softplus": True,
    }


def _forward_backward(scan: Callable, inputs: dict, weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                      **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """y, last state and every tensor input's gradient of sum(w_y y) + sum(w_h h) (sums when no weights)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    y, h = scan(**{**inputs, **leaves}, return_last_state=True, **kw)
    w_y, w_h = weights if weights else (torch.ones_like(y), torch.ones_like(h))
    ((y * w_y.to(y.dtype)).double().sum() + (h * w_h.to(h.dtype)).double().sum()).backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}


@check("chunked scan on CUDA vs float64 reference")
def scan_parity() -> dict:
    inputs = _parity_inputs(*PLAN.parity_shape)
    ref = selective_scan_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    out = selective_scan_chunked(**inputs)
    row = {"rel_l2_fp32_vs_fp64": _rel(out, ref), "finite": bool(torch.isfinite(out).all()),
           "threshold": f"rel L2 <= {FWD_TOL}"}
    if fused_available():
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        row["fused_rel_l2_vs_fp64"] = _rel(selective_scan_fn(**inputs), ref)
    return _mark(row, row["rel_l2_fp32_vs_fp64"] > FWD_TOL or not row["finite"])


_REFERENCE: dict = {}  # the float64 reference's results, computed once for every scan's parity row
_EXACT: dict[str, bool] = {}  # scan -> its parity row passed (a variant is kept only if exact)


@check("{0} scan vs float64 reference: forward, last state, every gradient; bf16 inputs; determinism")
def triton_parity(name: str = "triton") -> dict:
    scan = _scan_function(name)
    b, d, n, L = PLAN.parity_shape
    inputs = _parity_inputs(b, d, n, L)
    g = torch.Generator(device=PLAN.device).manual_seed(2)
    weights = (torch.randn(b, d, L, device=PLAN.device, generator=g), torch.randn(b, d, n, device=PLAN.device, generator=g))
    exact = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "fp32" not in _REFERENCE:
        _REFERENCE["fp32"] = _forward_backward(selective_scan_ref, exact, weights)
    y_ref, h_ref, grads_ref = _REFERENCE["fp32"]
    y, h, grads = _forward_backward(scan, inputs, weights)
    errors = {"y": _rel(y, y_ref), "last_state": _rel(h, h_ref), **{f"d{k}": _rel(v, grads_ref[k]) for k, v in grads.items()}}
    again = _forward_backward(scan, inputs, weights)[2]
    deterministic = all(torch.equal(grads[k], again[k]) for k in grads)
    # bf16 activations (float32 A, D, delta_bias), against float64 on the same rounded values
    low = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    y16, h16, grads16 = _forward_backward(scan, low)
    if "bf16" not in _REFERENCE:
        _REFERENCE["bf16"] = _forward_backward(
            selective_scan_ref, {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in low.items()})
    y16_ref, h16_ref, grads16_ref = _REFERENCE["bf16"]
    errors16 = {"y": _rel(y16, y16_ref), "last_state": _rel(h16, h16_ref), **{f"d{k}": _rel(v, grads16_ref[k]) for k, v in grads16.items()}}
    worst_grad = max(v for k, v in errors.items() if k.startswith("d"))
    row = {"shape_b_d_n_L": [b, d, n, L], "fp32_rel_l2": {k: f"{v:.1e}" for k, v in errors.items()},
           "bf16_rel_l2": {k: f"{v:.1e}" for k, v in errors16.items()}, "deterministic_gradients": deterministic,
           "threshold": f"fp32: output, state <= {FWD_TOL}, gradients <= {GRAD_TOL}; bf16 <= {BF16_TOL}; "
                        "bit-identical gradients run to run"}
    failed = (max(errors["y"], errors["last_state"]) > FWD_TOL or worst_grad > GRAD_TOL
              or max(errors16.values()) > BF16_TOL or not deterministic)
    failed = failed or not all(math.isfinite(v) for v in [*errors.values(), *errors16.values()])
    _EXACT[name] = not failed
    return _mark(row, failed)


_SCAN_MS: dict[tuple[str, str], float] = {}  # (size name, scan) -> forward+backward ms, for the Triton target


@check("scan fwd+bwd at {0} size, {1}")
def scan_timing(size: str, name: str) -> dict:
    scan = _scan_function(name)
    _, b, d, n, L = next(s for s in PLAN.scan_sizes if s[0] == size)
    inputs = _model_scan_inputs(b, d, n, L)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    grad_out = torch.randn(b, d, L, device=PLAN.device).to(torch.bfloat16)
    out = {}

    def step() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        out["y"] = scan(**inputs)
        out["y"].backward(grad_out)

    with torch.no_grad():
        forward_s = _timed(lambda: scan(**inputs), PLAN.repeats)
    _reset_peak()
    seconds = _timed(step, PLAN.repeats)
    _SCAN_MS[(size, name)] = seconds * 1e3
    finite = bool(torch.isfinite(out["y"]).all()) and all(bool(torch.isfinite(v.grad).all()) for v in leaves.values())
    row = {"shape_b_d_n_L": [b, d, n, L], "fwd_bwd_ms": round(seconds * 1e3, 3), "fwd_ms": round(forward_s * 1e3, 3),
           "peak_gib": _peak_gib(), "finite": finite, "threshold": "output and gradients finite"}
    missed = False
    if name in VARIANTS and (size, "triton") in _SCAN_MS:
        row["vs_triton"] = round(seconds * 1e3 / _SCAN_MS[(size, "triton")], 3)  # < 1: the variant is faster
    if name == "triton":
        mamba_ms, chunked_ms = _SCAN_MS.get((size, "mamba")), _SCAN_MS.get((size, "chunked"))
        if mamba_ms:
            row["target"] = f"<= {TRITON_VS_MAMBA}x mamba-ssm ({mamba_ms:.3f} ms)"
            row["vs_mamba"] = round(seconds * 1e3 / mamba_ms, 2)
            missed = row["vs_mamba"] > TRITON_VS_MAMBA
        if chunked_ms:
            row["speedup_vs_chunked"] = round(chunked_ms / (seconds * 1e3), 1)
    return _mark(row, not finite, missed)


@check("Triton chunk length sweep at {0} size (fwd+bwd ms)")
def triton_block_sweep(size: str) -> dict:
    scan = _scan_function("triton")
    _, b, d, n, L = next(s for s in PLAN.scan_sizes if s[0] == size)
    inputs = _model_scan_inputs(b, d, n, L)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    grad_out = torch.randn(b, d, L, device=PLAN.device).to(torch.bfloat16)
    times, outputs = {}, {}
    for block in PLAN.block_sweep:
        def step(block: int = block) -> None:
            for leaf in leaves.values():
                leaf.grad = None
            outputs[block] = scan(**inputs, block_l=block)
            outputs[block].backward(grad_out)

        times[str(block)] = round(_timed(step, PLAN.repeats) * 1e3, 3)
    first = outputs[PLAN.block_sweep[0]]
    spread = max(_rel(y, first) for y in outputs.values())
    row = {"fwd_bwd_ms_by_block_l": times, "max_rel_l2_between_blocks": spread,
           "threshold": f"outputs agree across chunk lengths (rel L2 <= {BF16_TOL})"}
    return _mark(row, not spread <= BF16_TOL)


@check("prepass variant's gradient-kernel launch sweep at {0} size (fwd+bwd ms by programs x warps)")
def pre_launch_sweep(size: str) -> dict:
    """The prepass variant (pipelined) with its gradient kernel launched as (aimed-for programs, warps): the
    default (512, 8) runs 256 channels per program at `evim3` size; more groups give more programs in flight."""
    _budget("the launch sweep")
    from evim3.ops.selective_scan_triton_pre import selective_scan_triton_pre

    why = scan_unavailable("triton", PLAN.device)
    if why:
        raise SkipCheck(why)
    _, b, d, n, L = next(s for s in PLAN.scan_sizes if s[0] == size)
    inputs = _model_scan_inputs(b, d, n, L)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    grad_out = torch.randn(b, d, L, device=PLAN.device).to(torch.bfloat16)
    times, grads = {}, {}
    for programs, warps in PLAN.launch_sweep:
        def step(programs: int = programs, warps: int = warps) -> None:
            for leaf in leaves.values():
                leaf.grad = None
            selective_scan_triton_pre(**inputs, stages=2, grad_programs=programs, grad_warps=warps).backward(grad_out)

        times[f"{programs}x{warps}"] = round(_timed(step, PLAN.repeats) * 1e3, 3)
        grads[(programs, warps)] = (leaves["u"].grad.clone(), leaves["B"].grad.clone())
    first = grads[PLAN.launch_sweep[0]]
    spread = max(max(_rel(du, first[0]), _rel(dB, first[1])) for du, dB in grads.values())
    best = min(times, key=times.get)
    row = {"fwd_bwd_ms": times, "fastest": best, "max_rel_l2_du_dB_between_launches": spread,
           "threshold": f"gradients agree across launches (rel L2 <= {BF16_TOL}); the fastest is the one to keep"}
    return _mark(row, not spread <= BF16_TOL)


@check("{0} bf16 train and inference, batch {1}, {2} scan")
def train_with_scan(preset: str, batch: int, name: str) -> dict:
    if name == "mamba" and (PLAN.device != "cuda" or scan_unavailable("mamba", "cuda")):
        raise SkipCheck(f"mamba-ssm: {_mamba_missing()}")
    if name not in PLAN.model_scans:
        raise SkipCheck(f"not in this plan's model scans {PLAN.model_scans}")
    if name == "cpu" and scan_unavailable("cpu", PLAN.device):
        raise SkipCheck(f"cpu: {scan_unavailable('cpu', PLAN.device)}")
    cfg = PRESETS[preset].replace(**PLAN.shrink)
    torch.manual_seed(0)
    with forced_scan(name):
        model = EViM3(cfg).to(PLAN.device)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        clip = torch.randn(batch, 1, cfg.frames, cfg.img_size, cfg.img_size, device=PLAN.device)
        target = 55.0 + 10.0 * torch.randn(batch, 1, device=PLAN.device)  # EF points; the head starts at 55
        losses: list[float] = []

        def step() -> None:
            with torch.autocast(PLAN.device, dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(clip).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())

        _reset_peak()
        seconds = _timed(step, PLAN.repeats)
        peak = _peak_gib()
        model.eval()
        with torch.no_grad(), torch.autocast(PLAN.device, dtype=torch.bfloat16):
            infer = _timed(lambda: model(clip), PLAN.repeats)
    falling = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    _TRAIN[(preset, name)] = (batch / seconds, losses)
    row = {"batch": batch, "train_step_s": round(seconds, 4), "train_clips_per_s": round(batch / seconds, 2),
           "infer_clips_per_s": round(batch / infer, 2), "peak_gib": peak,
           "losses": [round(x, 4) for x in losses], "threshold": "loss finite and lower after the steps than before"}
    missed = False
    if name == "triton" and preset in TRAIN_TARGETS and not PLAN.shrink:
        clips_s, peak_gib = TRAIN_TARGETS[preset]
        row["target"] = f">= {clips_s} clips/s, peak <= {peak_gib:.1f} GiB"
        missed = row["train_clips_per_s"] < clips_s or (peak is not None and peak > peak_gib)
    return _mark(row, not falling, missed)


@check("evim3-p4 MAE pre-training step (bf16, STC 0.8, token-skipping encoder), {0} scan")
def pretrain_p4(name: str) -> dict:
    from evim3.models.pretrain import EViM3MAE

    if name == "mamba" and (PLAN.device != "cuda" or scan_unavailable("mamba", "cuda")):
        raise SkipCheck(f"mamba-ssm: {_mamba_missing()}")
    if name not in PLAN.model_scans:
        raise SkipCheck(f"not in this plan's model scans {PLAN.model_scans}")
    if name == "cpu" and scan_unavailable("cpu", PLAN.device):
        raise SkipCheck(f"cpu: {scan_unavailable('cpu', PLAN.device)}")
    cfg = PRESETS["evim3-p4"].replace(**PLAN.shrink)
    torch.manual_seed(0)  # weights and masks as issue 27's option rows draw them: their first losses compare
    with forced_scan(name):
        model = EViM3MAE(cfg, mask_ratio=0.8).to(PLAN.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = 4 if not PLAN.shrink else 1
        clip = torch.randn(batch, 1, cfg.frames, cfg.img_size, cfg.img_size, device=PLAN.device)
        losses: list[float] = []

        def step() -> None:
            with torch.autocast(PLAN.device, dtype=torch.bfloat16):
                loss = model(clip)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())

        _reset_peak()
        seconds = _timed(step, PLAN.repeats)
    _TRAIN[("p4-mae", name)] = (batch / seconds, losses)
    row = {"batch": batch, "step_s": round(seconds, 4), "clips_per_s": round(batch / seconds, 2),
           "peak_gib": _peak_gib(), "threshold": "losses finite"}
    missed = False
    if not PLAN.shrink:
        row["target"] = f">= {PRETRAIN_TARGET_CLIPS_S} clips/s"
        missed = row["clips_per_s"] < PRETRAIN_TARGET_CLIPS_S
    return _mark(row, not all(map(math.isfinite, losses)), missed)



# ---- issue 27: variants and options side by side, the decision, the profile, the kernels' registers ------------

_TRAIN: dict[tuple[str, str], tuple[float, list[float]]] = {}  # (preset key, scan or option) -> (clips/s, losses)
PROFILE_ROWS: list[dict] = []
ISSUE27_TARGETS = {"evim3": TRAIN_TARGETS["evim3"][0], "evim3-p4": TRAIN_TARGETS["evim3-p4"][0],
                   "p4-mae": PRETRAIN_TARGET_CLIPS_S}


def _baseline_scan() -> str:
    """The scan the option rows are compared with: the current Triton kernels; in a dry run the fused CPU kernel
    (the chunked scan where it cannot be built)."""
    if PLAN.device == "cuda":
        return "triton"
    return "cpu" if scan_unavailable("cpu", "cpu") is None else "chunked"


@check("issue 27 scan variant kept at {0} size (fastest of the exact ones, fwd+bwd)")
def scan_variant_decision(size: str) -> dict:
    times = {name: round(_SCAN_MS[(size, name)], 3) for name in ("triton", *VARIANTS) if (size, name) in _SCAN_MS}
    exact = [name for name in times if _EXACT.get(name)]
    if not exact:
        raise SkipCheck("no exact Triton scan was timed at this size")
    kept = min(exact, key=times.get)
    return {"fwd_bwd_ms": times, "exact": exact, "kept": kept,
            "speedup_vs_triton": round(times["triton"] / times[kept], 3) if "triton" in times else None,
            "threshold": "kept only if exact (its parity row) and faster than the current kernels"}


@check("{0} bf16 train step, issue 27 option: {1}")
def train_option(key: str, label: str, scan: str, fused: bool, compile_backend: str) -> dict:
    """One training step of `key` (a bench_gpu_profile preset) with the option, beside the baseline's row: clips/s,
    the ratio to the baseline, and the first step's loss against the baseline's (the same seed and clip)."""
    from evim3.models.evim3 import Mamba3DBlock
    from evim3.models.pretrain import EViM3MAE

    _budget(f"{key} {label}")
    scan = scan or _baseline_scan()
    why = scan_unavailable(scan, PLAN.device)
    if why:
        raise SkipCheck(f"{scan}: {why}")
    if compile_backend and key != "evim3":
        raise SkipCheck("compiled rows at evim3 only (each preset would compile its blocks again)")
    if scan in ("triton-pre", "triton-pre-s2") and PLAN.device != "cuda":
        raise SkipCheck("the prepass variants run the model through Triton's interpreter only on a GPU-less "
                        "dry run: too slow at model size (their parity is tests/test_scan_triton.py's)")
    config, batch, stage = {"evim3": ("evim3", PLAN.train[0][1], "finetune"),
                            "evim3-p4": ("evim3-p4", dict(PLAN.train).get("evim3-p4", 1), "finetune"),
                            "p4-mae": ("evim3-p4", 4 if not PLAN.shrink else 1, "pretrain")}[key]
    cfg = PRESETS[config].replace(**PLAN.shrink)
    torch.manual_seed(0)
    model = (EViM3MAE(cfg, mask_ratio=0.8) if stage == "pretrain" else EViM3(cfg)).to(PLAN.device)
    # use_scan as well as EVIM3_SCAN: under torch.compile the dispatcher ignores EVIM3_SCAN and traces the chunked
    # scan unless the unit names its scan
    with forced_scan(scan), use_scan(model, scan):
        if compile_backend:
            torch._dynamo.reset()
            backend, _, mode = compile_backend.partition("/")  # "inductor/reduce-overhead": CUDA graphs too
            for block in model.modules():
                if isinstance(block, Mamba3DBlock):
                    block.compile(backend=backend, **({"mode": mode} if mode else {}))
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4 if stage == "finetune" else 1e-4,
                                **({"fused": True} if fused else {}))
        clip = torch.randn(batch, 1, cfg.frames, cfg.img_size, cfg.img_size, device=PLAN.device)
        # no target drawn for pre-training: the masks drawn next must be the baseline row's
        target = 55.0 + 10.0 * torch.randn(batch, 1, device=PLAN.device) if stage == "finetune" else None
        losses: list[float] = []

        def step() -> None:
            with torch.autocast(PLAN.device, dtype=torch.bfloat16):
                out = model(clip)
                loss = out["loss"] if stage == "pretrain" else torch.nn.functional.mse_loss(out.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())

        t0 = time.perf_counter()
        step()  # compilation (and Triton's JIT) happen here: reported, not timed
        _sync()
        first_s = time.perf_counter() - t0
        _reset_peak()
        seconds = _timed(step, PLAN.repeats)
    clips_s = batch / seconds
    _TRAIN[(key, label)] = (clips_s, losses)
    row = {"batch": batch, "scan": scan, "fused_adamw": fused, "compile": compile_backend or "eager",
           "first_step_s": round(first_s, 2), "train_step_s": round(seconds, 4), "train_clips_per_s": round(clips_s, 2),
           "peak_gib": _peak_gib(), "losses": [round(x, 4) for x in losses]}
    finite = all(map(math.isfinite, losses))
    failed = not finite
    base = _TRAIN.get((key, _baseline_scan()))
    if base is not None:
        row["vs_baseline"] = round(clips_s / base[0], 3)
        # the same seed, clip and weights: the first loss agrees with the baseline's to bf16 precision
        row["first_loss_rel_diff"] = abs(losses[0] - base[1][0]) / max(abs(base[1][0]), 1e-12)
        failed = failed or row["first_loss_rel_diff"] > BF16_TOL
    row["threshold"] = f"losses finite; first loss within {BF16_TOL} (relative) of the baseline's"
    target = ISSUE27_TARGETS.get(key)
    missed = False
    if target and not PLAN.shrink:
        row["target"] = f">= {target} clips/s"
        missed = clips_s < target
    return _mark(row, failed, missed)


@check("issue 27 training option kept for {0} (fastest exact one)")
def option_decision(key: str) -> dict:
    base = _baseline_scan()
    labels = {base, *(option[0] for option in PLAN.options)}
    candidates = {label: clips for (k, label), (clips, _) in _TRAIN.items() if k == key and label in labels}
    good = {label: c for label, c in candidates.items()
            if label == base or any(r["check"].startswith(f"{key} bf16 train step, issue 27 option: {label}")
                                    and r["status"] in ("ok", "MISS") for r in RESULTS)}
    if base not in good:
        raise SkipCheck(f"no baseline ({base}) row for {key}")
    kept = max(good, key=good.get)
    return {"clips_per_s": {k: round(v, 2) for k, v in candidates.items()}, "kept": kept,
            "speedup_vs_baseline": round(good[kept] / good[base], 3),
            "threshold": "kept only if its row passed (exact first loss, finite) and it is faster"}


@check("step profile: {0} (time by kernel family, floors, MFU; benchmarks/bench_gpu_profile.py)")
def step_profile(key: str, scan: str | None = None) -> dict:
    _budget(f"the {key} profile")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # benchmarks/ is beside evim3/, not installed with it
        sys.path.insert(0, root)
    from benchmarks import bench_gpu_profile

    profile = bench_gpu_profile.profile_step(key, device=PLAN.device, scan=scan, tiny=bool(PLAN.shrink))
    rows = profile.rows()
    PROFILE_ROWS.extend(rows)
    step = rows[-1]
    top = sorted(((r["family"], r["ms"]) for r in rows[:-1]), key=lambda fr: -fr[1])[:4]
    row = {"step_ms": step["ms"], "clips_per_s": step["clips_per_s"], "mfu_pct": step["step_mfu_pct"],
           "families_sum_ms": step["families_sum_ms"], "largest": {f: ms for f, ms in top}, "peak": step["peak"],
           "threshold": "families add up to the step within 5 % + 0.5 ms"}
    failed = abs(step["families_sum_ms"] - step["ms"]) > 0.05 * step["ms"] + 0.5
    target = ISSUE27_TARGETS.get(key)
    missed = bool(target and not PLAN.shrink and step["clips_per_s"] < target)
    if target and not PLAN.shrink:
        row["target"] = f">= {target} clips/s"
    return _mark(row, failed, missed)


@check("Triton scan kernels compiled for this GPU's architecture: registers and spills (ptxas -v)")
def kernel_registers() -> dict:
    from evim3.ops import triton_static

    why = triton_static.target_unavailable()
    if why:
        raise SkipCheck(why)
    major, minor = torch.cuda.get_device_capability() if PLAN.device == "cuda" else (9, 0)
    try:
        reports = triton_static.report_in_subprocess(10 * major + minor)
    except Exception as e:  # noqa: BLE001 -- a diagnostic: the gate is tests/test_triton_sm90.py on any machine
        raise SkipCheck(f"could not compile the kernels statically here: {str(e)[-400:]}") from None
    spills = [r.kernel for r in reports if r.spill_stores or r.spill_loads]
    row = {"sm": 10 * major + minor,
           "registers": {r.kernel: f"{r.registers} regs x {r.num_warps} warps, spills {r.spill_stores}/{r.spill_loads} B"
                         for r in reports},
           "threshold": "no spills (a spill is a MISS: slower, not wrong)"}
    return _mark(row, False, bool(spills))


@check("evim3 train on CUDA: the real loop (synthetic data, fine-tune, resume, pre-train)")
def train_loop_cuda() -> dict:
    if PLAN.device != "cuda":
        raise SkipCheck("dry run: the real loop on CPU is tests/test_train.py's")
    try:
        from evim3.data.synth import generate_dataset
    except ImportError as e:
        raise SkipCheck(f"video I/O not installed ({e})") from None
    from evim3.train.loop import train
    from evim3.train.recipe import TrainConfig

    tmp = tempfile.mkdtemp()
    generate_dataset(os.path.join(tmp, "data"), 24, seed=0, workers=4)
    base = TrainConfig(stage="finetune", data=os.path.join(tmp, "data"), out=os.path.join(tmp, "ft"),
                       preset="evim3-tiny", frames=16, period=4, batch=4, accum=1, epochs=2, lr=4e-3, pad=4,
                       device=PLAN.device, workers=2, stats_videos=8, log_every=1)
    first = train(base, stop_after=3)  # as if stopped after step 3, then resumed to the end
    resumed = train(base.replace(resume=True))
    pre = train(base.replace(stage="pretrain", out=os.path.join(tmp, "pre"), epochs=1))
    row = {"stopped_at_step": first["step"], "resumed_to_step": resumed["step"], "val_mae": resumed["final"].get("val_mae"),
           "pretrain_loss": pre["final"].get("val_loss"), "resumed_wall_s": round(resumed["wall_s"], 1)}
    finite = [v for v in (row["val_mae"], row["pretrain_loss"]) if v is not None]
    if first["step"] != 3 or resumed["step"] != 2 * resumed["steps_per_epoch"] or not all(map(math.isfinite, finite)):
        row["status"] = "FAIL"
    return row


@check("mamba-ssm Mamba state_dict loads into evim3 Mamba (strict) with equal output")
def mamba_ssm_compat() -> dict:
    try:
        from mamba_ssm.modules.mamba_simple import Mamba as OfficialMamba
    except Exception as e:  # noqa: BLE001
        raise SkipCheck(f"mamba-ssm not installed ({type(e).__name__})") from None
    from evim3.modules import Mamba

    official = OfficialMamba(d_model=192).cuda()
    ours = Mamba(d_model=192).cuda()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 777, 192, device="cuda")
    with torch.no_grad():
        ref, out = official(x), ours(x)
        ours.use_fast_path = False
        slow = ours(x)
    return {"max_abs_fused": (ref - out).abs().max().item(), "max_abs_chunked": (ref - slow).abs().max().item()}


@check("ONNX Runtime CUDA vs PyTorch (evim3-tiny)")
def ort_cuda() -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise SkipCheck("onnxruntime not installed") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SkipCheck(f"no CUDAExecutionProvider (providers: {ort.get_available_providers()})")
    path, model, cfg = _export_tiny()
    sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    clip = torch.randn(1, 1, cfg.frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ref = model(clip).numpy()
    out = sess.run(None, {"clip": clip.numpy()})[0]
    t0 = time.perf_counter()
    for _ in range(20):
        sess.run(None, {"clip": clip.numpy()})
    return {"providers": sess.get_providers(), "max_abs_ef": float(abs(out - ref).max()),
            "latency_ms": round((time.perf_counter() - t0) / 20 * 1000, 2)}


@check("TensorRT engine vs PyTorch (evim3-tiny)")
def tensorrt_engine() -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise SkipCheck("TensorRT not installed") from None
    from evim3.export.tensorrt import build_engine
    from evim3.runtime.backends import open_backend

    path, model, cfg = _export_tiny()
    engine_path = path.replace(".onnx", ".engine")
    build_engine(path, engine_path)
    backend = open_backend(engine_path)
    clip = torch.randn(1, 1, cfg.frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ref = model(clip).numpy()
    out = backend.run(clip.numpy())
    return {"max_abs_ef": float(abs(out - ref).max())}


_EXPORTED: dict = {}


def _export_tiny():
    if not _EXPORTED:
        from evim3.export.onnx import export_onnx
        from evim3.runtime.meta import ModelMeta, PreprocessSpec

        cfg = PRESETS["evim3-tiny"]
        model = EViM3(cfg).eval()
        meta = ModelMeta(preset="evim3-tiny", model=cfg.to_dict(), ef_mean=55.0,
                         preprocess=PreprocessSpec(frames=cfg.frames, mean=30.0, std=45.0))
        path = os.path.join(tempfile.mkdtemp(), "tiny.onnx")
        export_onnx(model, meta, path)
        _EXPORTED.update(path=path, model=model, cfg=cfg)
    return _EXPORTED["path"], _EXPORTED["model"], _EXPORTED["cfg"]


def _write_json() -> None:
    out = os.environ.get("OUT")
    if out:
        gpu = torch.cuda.get_device_name() if PLAN.device == "cuda" else "none (dry run on CPU)"
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "results": RESULTS, "profile": PROFILE_ROWS}, f,
                      indent=2)


def main() -> int:
    global PLAN
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run the checks' code on CPU at toy sizes (Triton through its interpreter), for the script itself")
    args = parser.parse_args()
    if args.dry_run:
        PLAN = DRY
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are defined (at their module's import)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check (--dry-run runs the code on CPU).")
        return 2
    else:
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
              f"mamba-ssm fused: {fused_available()}", flush=True)
    sizes = [size[0] for size in PLAN.scan_sizes]
    scan_parity()
    triton_parity("triton")
    for name in VARIANTS:
        triton_parity(name)
    for size in sizes:
        for name in ("chunked", "mamba", "triton"):  # Triton after these: its row compares with the other two
            scan_timing(size, name)
        for name in VARIANTS:  # issue 27's candidates, each beside the current kernels' row just above
            scan_timing(size, name)
        scan_variant_decision(size)
    triton_block_sweep(sizes[0])
    pre_launch_sweep(sizes[0])
    for preset, batch in PLAN.train:
        for name in (*SCANS, "cpu") if args.dry_run else SCANS:
            train_with_scan(preset, batch, name)
    for name in ("triton", "mamba", *(("chunked", "cpu") if args.dry_run else ())):
        pretrain_p4(name)
    # issue 27, most important first (the budget skips what is left): evim3's options, the profiles, then the
    # other presets' options
    keys = ("evim3", *(("evim3-p4",) if len(PLAN.train) > 1 else ()), "p4-mae")
    for key in keys[:1]:
        for option in PLAN.options:
            train_option(key, *option)
        option_decision(key)
    for key in PLAN.profiles:
        step_profile(key)
    for key in keys[1:]:
        for option in PLAN.options:
            train_option(key, *option)
        option_decision(key)
    kernel_registers()
    for fn in (train_loop_cuda, mamba_ssm_compat, ort_cuda, tensorrt_engine):
        fn()
    print("\n| check | status | seconds | details |\n|---|---|---|---|")
    for r in RESULTS:
        details = {k: v for k, v in r.items() if k not in ("check", "status", "seconds")}
        print(f"| {r['check']} | {r['status']} | {r['seconds']} | {json.dumps(details)} |")
    if PROFILE_ROWS:
        keys = ["preset", "batch", "scan", "family", "ms", "share_pct", "floor_ms", "gflop", "gbytes", "step_mfu_pct",
                "clips_per_s", "target_clips_per_s", "status"]
        print("\nStep profile by kernel family (benchmarks/bench_gpu_profile.py; MFU of the step in every row):\n")
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in PROFILE_ROWS:
            print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
