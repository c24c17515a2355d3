"""One training step of the demo, by part, beside its GEMM floor (issue 26).

    python -m benchmarks step                    # the demo's fine-tuning and pre-training steps on this machine
    EVIM3_BENCH_STEP_EMULATE=avx2 python -m benchmarks step   # the same, as on an AVX2-only x86 CPU (see below)

The steps are the demo's (`evim3 demo`: evim3-tiny without register planes, 12 frames, batch 8;
evim3.train.recipe.DEMO_RECIPE), built by the real Trainer on a small synthetic dataset, so data loading, the
loss, clipping, AdamW, the EMA and the logger are the ones a run executes. Each part is wall-clock time per step
(median of EVIM3_BENCH_STEP_STEPS, default 12, after 3 warm-up steps): data, forward, backward, optimizer (clip +
AdamW + schedule), EMA, logging. Forward and backward are then split by operator family from a torch.profiler pass
(self CPU time of each op, scaled to the measured wall time): the scan's kernels, GEMMs (the linear layers),
convolutions (tubelet embedding and the depthwise conv), layout (copies, gathers, flips, concatenations: the moves
between the six scan orders), and the rest (norms, activations, reductions).

The floor: the step's matmul and convolution FLOPs (torch.utils.flop_counter over one forward + backward) at
the sgemm rate torch reaches here with the same threads: a 2048^3 matmul timed after each timed step, the median
(the steps' median and the rate's then come from the same minute of a machine whose speed may drift). The ratio
step / floor is what issue 26 targets (<= 3).

AVX2 emulation (EVIM3_BENCH_STEP_EMULATE=avx2): the benchmark re-runs itself in a child process with torch's
kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2), oneDNN and MKL limited to AVX2 (DNNL_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS) and evim3's C++ kernels built for x86-64-v3 (EVIM3_CPU_ARCH). It removes AVX-512 code
paths, not the machine: caches, memory bandwidth, clock and core count stay this CPU's, so a real AVX2-only
machine (an older or smaller core) is usually slower still; compare its sgemm rate, printed in each row.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

EMULATIONS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "EVIM3_CPU_ARCH": "x86-64-v3"},
}
STAGES = ("finetune", "pretrain")
WARMUP_STEPS = 3
SGEMM_SIZE = 2048  # the floor's rate: torch.mm of two SGEMM_SIZE^2 float32 matrices
VIDEOS = 24  # enough TRAIN videos for a few batches of 8; the step's cost does not depend on the dataset's size

# Operator families, first match wins (profiler event names: aten::<op>, or an autograd Function's name).
FAMILIES = (
    ("scan bwd", ("ScanFnBackward", "mamba_inner::scan_backward")),
    ("scan fwd", ("ScanFn", "mamba_inner::scan")),
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("conv", ("convolution", "aten::conv", "im2col", "col2im", "CpuConvFn", "causal_conv1d")),
    ("layout", ("aten::copy_", "aten::cat", "aten::flip", "aten::index_select", "aten::gather", "aten::scatter",
                "aten::index_add_", "aten::index", "aten::clone", "aten::_to_copy", "aten::fill_", "aten::zero_",
                "aten::empty", "aten::stack", "aten::constant_pad")),
)


def family_of(name: str) -> str:
    from evim3.ops.selective_scan_cpu import EXTENSION_PREFIX

    if name.startswith(EXTENSION_PREFIX):  # the fused CPU kernels' own operators, <extension>::<op>
        op = name.rsplit("::", 1)[-1]
        return "conv" if op.startswith("causal_conv1d") else "scan bwd" if op == "backward" else "scan fwd"
    for family, patterns in FAMILIES:
        if any(p in name for p in patterns):
            return family
    return "other"


def sgemm_seconds(a: Any, b: Any) -> float:
    """Wall time of one torch.mm(a, b) at torch's current threads."""
    import torch

    t0 = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t0


def step_parts(trainer: Any, batches: Any, timed: bool = True) -> dict[str, float]:
    """One optimizer step of `trainer` as Trainer._optimizer_step does it (accum 1), each part timed."""
    import torch

    parts: dict[str, float] = {}
    clock = time.perf_counter

    t0 = clock()
    batch = next(batches)
    t1 = clock()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.task.loss(trainer.net, batch, trainer.ctx.device)
    t2 = clock()
    loss.backward()
    t3 = clock()
    value = float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.clip_grad or float("inf")))
    trainer.optimizer.step()
    trainer.scheduler.step()
    t4 = clock()
    trainer.step += 1
    trainer.ema.update_parameters(trainer.model)
    t5 = clock()
    trainer.logger.step(trainer.step, 1, value, trainer.optimizer.param_groups[0]["lr"], grad_norm, trainer.cfg.batch)
    t6 = clock()
    if timed:
        parts = {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "ema": t5 - t4,
                 "logging": t6 - t5}
    return parts


def endless_batches(trainer: Any):
    epoch = 0
    while True:
        trainer.train_loader.sampler.set_epoch(epoch)
        yield from trainer.train_loader
        epoch += 1


def _grouped_conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, _transposed,
                                 _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """A convolution's backward as (gradients computed) x its forward's FLOPs. torch's own formula ignores
    groups: it counted Mamba's depthwise conv1d (groups = channels) d_inner times over, 14 of the demo step's
    33 "GFLOP" (torch 2.13)."""
    c_out, c_in_per_group, *kernel = w_shape
    forward = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * c_out * c_in_per_group * math.prod(kernel)
    return forward * sum(bool(m) for m in output_mask[:2])


def _inplace_addmm_flops(_self_shape, a_shape, b_shape, *_, out_shape=None, **__) -> int:
    """x.addmm_(a, b) as torch counts addmm: 2 m k n. torch's counter has no formula for the in-place form, which
    the fused CPU Mamba block uses to add x_proj's input gradient onto the scan's (~1 GFLOP a demo step)."""
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


def matmul_flops(trainer: Any, batch: dict) -> int:
    """Matmul + convolution FLOPs of one forward and backward (torch's flop counter: mm, bmm, addmm, conv; the
    conv backward by the groups-aware formula above, in-place addmm by the one above). evim3's fused CPU conv1d is no aten op and is not counted
    (its 2 d_inner d_conv per token are elementwise work)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _grouped_conv_backward_flops,
                                              torch.ops.aten.addmm_: _inplace_addmm_flops})
    with counter:
        trainer.task.loss(trainer.net, batch, trainer.ctx.device).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def profile_families(trainer: Any, batches: Any, steps: int = 3) -> dict[str, dict[str, float]]:
    """Self CPU seconds per family in the forward and in the backward, per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    totals: dict[str, dict[str, float]] = {"forward": defaultdict(float), "backward": defaultdict(float)}
    for _ in range(steps):
        batch = next(batches)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("evim3.forward"):
                loss = trainer.task.loss(trainer.net, batch, trainer.ctx.device)
            with record_function("evim3.backward"):
                loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        # Which phase an op belongs to: the backward runs on autograd's thread(s) outside our record_function
        # ranges, so an op is "forward" only when it lies inside the forward range on the main thread.
        events = prof.events()
        ranges = {e.name: e.time_range for e in events if e.name in ("evim3.forward", "evim3.backward")}
        fwd = ranges["evim3.forward"]
        for e in events:
            if e.name.startswith("evim3.") or e.self_cpu_time_total <= 0:
                continue
            phase = "forward" if fwd.start <= e.time_range.start < fwd.end else "backward"
            totals[phase][family_of(e.name)] += e.self_cpu_time_total / 1e6 / steps
    return {phase: dict(v) for phase, v in totals.items()}


def measure(stage: str, data: Path, steps: int) -> dict[str, Any]:
    import torch

    from evim3.train.distributed import init_distributed
    from evim3.train.logging import RunLogger
    from evim3.train.loop import Trainer
    from evim3.train.recipe import DEMO_RECIPE, TrainConfig

    with tempfile.TemporaryDirectory(prefix="evim3-step-") as out:
        cfg = TrainConfig(stage=stage, out=out, data=str(data), **DEMO_RECIPE, max_steps=10_000)
        trainer = Trainer(cfg, init_distributed("cpu"))
        trainer.logger = RunLogger(out, enabled=True, total_steps=trainer.total_steps, start_step=0,
                                   log_every=cfg.log_every)
        trainer.data.train.preload()
        trainer.net.train()
        batches = endless_batches(trainer)
        for _ in range(WARMUP_STEPS):
            step_parts(trainer, batches, timed=False)
        # The sgemm rate is sampled after every timed step: this VM's throughput drifts (2,048^3 sgemm: 130-175
        # GFLOP/s in four readings seconds apart), so one reading taken before or after the steps moved the ratio
        # by up to a third. Both medians then come from the same minute.
        a, b = torch.randn(SGEMM_SIZE, SGEMM_SIZE), torch.randn(SGEMM_SIZE, SGEMM_SIZE)
        sgemm_seconds(a, b)
        records, sgemm_samples = [], []
        for _ in range(steps):
            records.append(step_parts(trainer, batches))
            sgemm_samples.append(sgemm_seconds(a, b))
        parts = {k: statistics.median(r[k] for r in records) for k in records[0]}
        step_s = statistics.median(sum(r.values()) for r in records)
        families = profile_families(trainer, batches)
        flops = matmul_flops(trainer, next(batches))
        trainer.logger.close()
    rate = 2 * SGEMM_SIZE**3 / statistics.median(sgemm_samples)
    floor = flops / rate
    row: dict[str, Any] = {"stage": stage, "step s": step_s, "GEMM floor s": floor, "step / floor": step_s / floor,
                           "matmul GFLOP": flops / 1e9, "sgemm GFLOP/s": rate / 1e9}
    row.update({f"{k} s": v for k, v in parts.items()})
    for phase in ("forward", "backward"):
        profiled = sum(families[phase].values())
        for family, seconds in sorted(families[phase].items(), key=lambda kv: -kv[1]):
            # profiler self times, scaled so that the phase's families add up to its measured wall time
            row[f"{phase[:3]}: {family} s"] = seconds / profiled * parts[phase] if profiled else 0.0
    row["threads"] = torch.get_num_threads()
    row["torch ISA"] = torch.backends.cpu.get_cpu_capability()
    return row


def run() -> dict[str, Any]:
    emulate = os.environ.get("EVIM3_BENCH_STEP_EMULATE", "")
    if emulate and os.environ.get("EVIM3_BENCH_STEP_CHILD") != "1":
        if emulate not in EMULATIONS:
            raise SystemExit(f"EVIM3_BENCH_STEP_EMULATE={emulate!r}: choose one of {', '.join(EMULATIONS)}")
        import json

        env = {**os.environ, **EMULATIONS[emulate], "EVIM3_BENCH_STEP_CHILD": "1"}
        code = "import json, benchmarks.bench_step as b; print('RESULT ' + json.dumps(b.run()))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent.parent)  # its stderr goes into the error below
        if done.returncode != 0:
            raise RuntimeError(f"the emulated run failed:\n{done.stderr[-3000:]}")
        print("\n".join(x for x in done.stdout.splitlines() if not x.startswith("RESULT ")))
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        result["emulation"] = {k: v for k, v in EMULATIONS[emulate].items()}
        return result

    from evim3.data.synth import generate_dataset

    steps = int(os.environ.get("EVIM3_BENCH_STEP_STEPS", "12"))
    with tempfile.TemporaryDirectory(prefix="evim3-step-data-") as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, VIDEOS, seed=0, workers=1)
        rows = [measure(stage, data, steps) for stage in STAGES]
    for row in rows:
        print(f"{row['stage']}: step {row['step s']:.3f} s = {row['step / floor']:.1f}x its GEMM floor "
              f"({row['matmul GFLOP']:.1f} GFLOP at {row['sgemm GFLOP/s']:.0f} GFLOP/s = {row['GEMM floor s']:.3f} s; "
              f"torch ISA {row['torch ISA']}, {row['threads']} threads)")
        for key, value in row.items():
            if key.endswith(" s") and key not in ("step s", "GEMM floor s"):
                print(f"    {key:<28} {value * 1e3:8.1f} ms")
    return {"rows": rows}
