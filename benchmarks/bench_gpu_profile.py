"""Where one training step's time goes (issue 27): the step of each preset profiled with torch.profiler, its time
bucketed by kernel family, each family beside its own floor, and the step's MFU in every row.

Presets: `evim3` fine-tuning (batch 4), `evim3-p4` fine-tuning (batch 2), `evim3-p4` MAE pre-training (batch 4);
bf16 autocast, AdamW, clips from a torch DataLoader (worker processes on CUDA) over synthetic clips.

Families: scan fwd, scan bwd (the scan's kernels, and whatever runs inside the scan's autograd node), GEMM,
gather (the Psi permutations between scan orders, flips, index ops), conv (patch embedding, conv1d), norm/elementwise
(every other aten kernel: LayerNorm, SiLU, gating, casts, reductions), optimizer (anything under Optimizer.step),
other (memcpy/memset and unattributed kernels), loader wait (the host waiting on the DataLoader, and the batch's
copy to the device), idle (the device doing nothing inside the step outside loader wait: launch and host overhead).
On CUDA the times are the device's (kernel intervals); on CPU (the tiny code-path check) they are each op's self
time on the host. The families and loader wait and idle add up to the step's time measured by the profiler.

Floors: a family's time if it ran at the card's peak: max(FLOPs / peak, bytes / bandwidth). FLOPs are the
profiler's (with_flops: matmuls, convolutions, elementwise adds and multiplies), counted once per leaf op; GEMM and
conv FLOPs against the bf16 dense tensor peak, the rest against the fp32 vector peak. Bytes: each kernel-launching
op's tensor inputs read once plus one output the size of its largest input (dtypes from the profiler): an
estimate, not a measurement. The scan's FLOPs and bytes are counted from its shapes (recorded per call): forward
~8 FLOPs per (token, channel, state) and u, delta, z, B, C read once and out written once; backward ~24 FLOPs per
element and the forward's reads plus grad_out read and every gradient written. MFU: every counted FLOP over the
step's time at the bf16 dense peak.

Peaks by device name (PEAKS; dense, no sparsity), or EVIM3_BENCH_GPU_PROFILE_PEAK="bf16_tflops,fp32_tflops,tb_s".
Options (each also a keyword of profile_step, which scripts/gpu_check.py calls side by side):
    EVIM3_BENCH_GPU_PROFILE_PRESETS   evim3,evim3-p4,p4-mae (default all three)
    EVIM3_BENCH_GPU_PROFILE_SCAN      the scan the Mamba units run (default: the dispatcher's choice)
    EVIM3_BENCH_GPU_PROFILE_FUSED     1: AdamW(fused=True) (CUDA)
    EVIM3_BENCH_GPU_PROFILE_COMPILE   a torch.compile backend ("inductor") for each Mamba-3D block; empty: eager
    EVIM3_BENCH_GPU_PROFILE_STEPS     profiled steps (default 2 on CUDA, 1 on CPU), after 2 (1) warm-up steps

Without CUDA the same code runs at a tiny size on CPU (toy model, batch 1), so a CPU test executes it end to end.

    python -m benchmarks gpu_profile
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

FAMILIES = ("scan fwd", "scan bwd", "GEMM", "gather", "conv", "norm/elementwise", "optimizer", "other",
            "loader wait", "idle")
# name fragment -> (dense bf16 tensor FLOP/s, fp32 vector FLOP/s, bytes/s); first match wins (most specific first)
PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200", (989e12, 67e12, 4.8e12)),
    ("H100 NVL", (835e12, 60e12, 3.9e12)),
    ("H100 PCIe", (756e12, 51e12, 2.0e12)),
    ("H100", (989e12, 67e12, 3.35e12)),  # SXM
    ("A100", (312e12, 19.5e12, 2.0e12)),
    ("L40S", (362e12, 91.6e12, 0.864e12)),
    # nominal: a CPU run checks the code path, its MFU is not a claim about the CPU
    ("cpu", (1e11, 1e11, 2e10)),
)
PEAK_ENV = "EVIM3_BENCH_GPU_PROFILE_PEAK"
PRESET_STEPS = {"evim3": ("evim3", 4, "finetune"), "evim3-p4": ("evim3-p4", 2, "finetune"),
                "p4-mae": ("evim3-p4", 4, "pretrain")}
# Issue 27's targets (clips/s, bf16, one H100/H200)
TARGETS = {"evim3": 20.0, "evim3-p4": 8.0, "p4-mae": 16.0}
TINY = {"frames": 4, "img_size": 32, "dim": 16, "depth": 1}  # the CPU code-path check's toy model

_SCAN_KERNEL = (re.compile(r"_scan_bwd|_pre_bwd|selective_scan_bwd"), re.compile(r"_scan_fwd|_pre_fwd|selective_scan_fwd"))
_SCAN_BWD = re.compile(r"ScanFnBackward|scan_bwd|evim3\.scan\.bwd")
_SCAN_FWD = re.compile(r"evim3\.scan\.fwd|evim3::scan_fwd")
_OPTIMIZER = re.compile(r"^Optimizer\.step|multi_tensor_apply|fused_adam|_fused_adamw")
_OP_FAMILIES = (
    ("conv", re.compile(r"^aten::(_?convolution|conv\w*|cudnn_convolution\w*|_conv_depthwise\w*|"
                        r"convolution_backward|_slow_conv\w*|mkldnn_convolution)$|ConvolutionBackward")),
    ("GEMM", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm|addmv|mv)$|"
                        r"(Mm|Addmm|Bmm)Backward")),
    ("gather", re.compile(r"^aten::(index_select|index|index_add_?|gather|take|scatter_add_?|scatter|index_put_?|"
                          r"_index_put_impl_|flip|embedding\w*)$|(IndexSelect|Index|Gather|Flip)Backward")),
    ("norm/elementwise", re.compile(r"^aten::")),
)
_KERNEL_FAMILIES = (
    ("conv", re.compile(r"conv|implicit_gemm|depthwise|winograd", re.IGNORECASE)),
    ("GEMM", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|matmul", re.IGNORECASE)),
    ("gather", re.compile(r"index|gather|scatter", re.IGNORECASE)),
    ("norm/elementwise", re.compile(r"elementwise|reduce|norm|softmax|triton_", re.IGNORECASE)),
)
_VIEWS = {"aten::view", "aten::transpose", "aten::t", "aten::as_strided", "aten::reshape", "aten::expand",
          "aten::permute", "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::detach",
          "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::split",
          "aten::chunk", "aten::narrow", "aten::_unsafe_view", "aten::lift_fresh", "aten::unbind", "aten::flatten",
          "aten::contiguous", "aten::to", "aten::_to_copy", "aten::zeros", "aten::ones", "aten::new_empty",
          "aten::new_zeros", "aten::zero_", "aten::fill_", "aten::set_", "aten::result_type", "aten::is_nonzero",
          "aten::item", "aten::_local_scalar_dense", "aten::expand_as", "aten::view_as", "aten::numpy_T",
          "aten::resolve_conj", "aten::resolve_neg", "aten::as_strided_", "aten::clone"}
_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1,
             "unsigned char": 1, "signed char": 1, "short int": 2}


def device_peaks(device: torch.device) -> tuple[str, tuple[float, float, float]]:
    """(the name matched, (bf16 tensor FLOP/s, fp32 vector FLOP/s, bytes/s)) of `device`, or the override."""
    override = os.environ.get(PEAK_ENV, "").strip()
    if override:
        bf16, fp32, bandwidth = (float(v) for v in override.split(","))
        return f"{PEAK_ENV}={override}", (bf16 * 1e12, fp32 * 1e12, bandwidth * 1e12)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for fragment, peaks in PEAKS:
        if fragment.lower() in name.lower():
            return name, peaks
    raise ValueError(f"no peak FLOP/s and bandwidth known for {name!r}: set {PEAK_ENV}=bf16_tflops,fp32_tflops,tb_s")


# ---- the scan, recorded: its shapes for the floors, a named range for the CPU's families ----------------------

@dataclass
class ScanCalls:
    calls: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (b, d, L, n, itemsize) per call

    def flops_bytes(self) -> dict[str, tuple[float, float]]:
        """{family: (FLOPs, bytes)} of every recorded call's forward and backward (see the module docstring)."""
        fwd_f = bwd_f = fwd_b = bwd_b = 0.0
        for b, d, L, n, s in self.calls:
            elements = b * d * L * n
            fwd_f += 8 * elements
            bwd_f += 24 * elements
            reads = (3 * b * d * L + 2 * b * n * L) * s  # u, delta, z; B, C
            fwd_b += reads + b * d * L * s
            bwd_b += reads + b * d * L * s + (3 * b * d * L + 2 * b * n * L) * s  # + grad_out; du, ddelta, dz, dB, dC
        return {"scan fwd": (fwd_f, fwd_b), "scan bwd": (bwd_f, bwd_b)}


_RECORDER: ScanCalls | None = None
_INNER: str | None = None


def _profiled_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The chosen scan, its call recorded and its forward in a named range (the CPU families' anchor)."""
    from evim3.ops import selective_scan

    if _RECORDER is not None:
        _RECORDER.calls.append((*u.shape, A.shape[1], u.element_size()))
    with torch.profiler.record_function("evim3.scan.fwd"):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, impl=_INNER)


def _register_profiled_scan() -> None:
    from evim3.ops import SCANS, Scan, register_scan

    if "profiled" not in SCANS:
        register_scan("profiled", Scan(lambda: _profiled_scan, lambda device_type: None, forcible=False))


# ---- data: a real DataLoader, so that its wait is measured ------------------------------------------------------

class _Clips(torch.utils.data.Dataset):
    """Synthetic clips (and EF targets): random, deterministic per index."""

    def __init__(self, shape: tuple[int, ...], length: int):
        self.shape, self.length = shape, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.shape, generator=g), 55.0 + 10.0 * torch.randn(1, generator=g)


# ---- the profile --------------------------------------------------------------------------------------------------

@dataclass
class StepProfile:
    preset: str
    batch: int
    step_ms: float  # host-measured, mean over the profiled steps
    window_ms: float  # the profiler's step range, mean
    family_ms: dict[str, float]
    family_flops: dict[str, float]
    family_bytes: dict[str, float]
    peaks: tuple[float, float, float]
    peak_name: str
    options: dict
    tiny: bool = False  # the CPU code-path check's toy model: no target applies

    @property
    def flops(self) -> float:
        return sum(self.family_flops.values())

    @property
    def mfu(self) -> float:
        return self.flops / (self.step_ms / 1e3 * self.peaks[0])

    def floor_ms(self, family: str) -> float:
        bf16, fp32, bandwidth = self.peaks
        peak = bf16 if family in ("GEMM", "conv") else fp32
        return 1e3 * max(self.family_flops.get(family, 0.0) / peak, self.family_bytes.get(family, 0.0) / bandwidth)

    def rows(self) -> list[dict]:
        clips_s = self.batch / (self.step_ms / 1e3)
        common = {"preset": self.preset, "batch": self.batch, **self.options}
        rows = []
        for family in FAMILIES:
            ms = self.family_ms.get(family, 0.0)
            row = {**common, "family": family, "ms": round(ms, 3), "share_pct": round(100 * ms / self.window_ms, 1)}
            if family not in ("loader wait", "idle"):
                row.update(floor_ms=round(self.floor_ms(family), 3), gflop=round(self.family_flops.get(family, 0) / 1e9, 2),
                           gbytes=round(self.family_bytes.get(family, 0) / 1e9, 3))
            row["step_mfu_pct"] = round(100 * self.mfu, 2)
            rows.append(row)
        target = None if self.tiny else TARGETS.get(self.preset)
        rows.append({**common, "family": "step", "ms": round(self.step_ms, 3), "share_pct": 100.0,
                     "floor_ms": round(sum(self.floor_ms(f) for f in FAMILIES[:8]), 3),
                     "gflop": round(self.flops / 1e9, 2), "step_mfu_pct": round(100 * self.mfu, 2),
                     "clips_per_s": round(clips_s, 2), "families_sum_ms": round(sum(self.family_ms.values()), 3),
                     "target_clips_per_s": target, "peak": self.peak_name,
                     "status": "MISS" if target is not None and clips_s < target else "ok"})
        return rows


def _chain(evt) -> list:
    """The event and its CPU ancestors, innermost first."""
    out = []
    while evt is not None:
        out.append(evt)
        evt = evt.cpu_parent
    return out


def classify(name: str, ancestors: list[str]) -> str:
    """The family of a kernel (or a CPU op's self time) named `name`, launched under ops `ancestors` (innermost
    first, `name` itself included on CPU)."""
    if _SCAN_KERNEL[0].search(name):
        return "scan bwd"
    if _SCAN_KERNEL[1].search(name):
        return "scan fwd"
    if any(_SCAN_BWD.search(a) for a in ancestors):
        return "scan bwd"
    if any(_SCAN_FWD.search(a) for a in ancestors):
        return "scan fwd"
    if _OPTIMIZER.search(name) or any(_OPTIMIZER.search(a) for a in ancestors):
        return "optimizer"
    for a in ancestors:  # innermost op first: an add inside a layer_norm's backward is elementwise, a mm a GEMM
        for family, pattern in _OP_FAMILIES:
            if pattern.search(a):
                return family
    for family, pattern in _KERNEL_FAMILIES:
        if pattern.search(name):
            return family
    return "other"


def _op_bytes(evt) -> float:
    """Tensor inputs read once plus one output the size of the largest (an estimate; see the docstring)."""
    sizes = []
    # getattr: older torch's FunctionEvent may lack the dtypes (the GPU machines ran torch 2.11)
    for shape, dtype in zip(evt.input_shapes or [], getattr(evt, "input_dtypes", None) or []):
        if isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape):
            numel = 1
            for s in shape:
                numel *= s
            sizes.append(numel * _ITEMSIZE.get(dtype, 4))
    return float(sum(sizes) + (max(sizes) if sizes else 0))


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _conv_flops(evt) -> float:
    """2 x MACs of aten::convolution (forward) and aten::convolution_backward (input and weight gradients), from
    the recorded shapes and the concrete stride, padding, groups: the profiler counts FLOPs of conv2d only."""
    shapes = evt.input_shapes or []
    concrete = list(getattr(evt, "concrete_inputs", None) or [])

    def arg(i, default):
        v = concrete[i] if i < len(concrete) else None
        return v if v not in (None, "", []) else default
    try:
        if evt.name == "aten::convolution":
            x, w = shapes[0], shapes[1]
            k = w[2:]
            stride = arg(3, [1] * len(k))
            pad = arg(4, [0] * len(k))
            groups = int(arg(8, 1))
            out = [(x[2 + i] + 2 * pad[i] - k[i]) // stride[i] + 1 for i in range(len(k))]
            return 2.0 * x[0] * w[0] * _numel(out) * (x[1] // groups) * _numel(k)
        if evt.name == "aten::convolution_backward":
            grad_out, x, w = shapes[0], shapes[1], shapes[2]
            groups = int(arg(9, 1))
            return 2 * 2.0 * _numel(grad_out) * (x[1] // groups) * _numel(w[2:])
    except (IndexError, TypeError, ValueError, ZeroDivisionError):
        return 0.0
    return 0.0


def _launches(evt, device_type: str) -> bool:
    """Whether `evt` is an op that does the work itself (its bytes counted once): on CUDA one that launched a
    kernel; on CPU an aten op none of whose children is another working aten op."""
    if not evt.name.startswith("aten::") or evt.name in _VIEWS:
        return False
    if device_type == "cuda":
        return bool(evt.kernels)
    return not any(c.name.startswith("aten::") and c.name not in _VIEWS for c in evt.cpu_children)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def analyse(events, device_type: str) -> tuple[dict, dict, dict, float, int]:
    """({family: ms}, {family: FLOPs}, {family: bytes}, window ms, steps) of the profiled steps, per step."""
    from torch.autograd import DeviceType

    steps = [e for e in events if e.name == "evim3.step" and e.device_type == DeviceType.CPU]
    loaders = [e for e in events if e.name == "evim3.loader" and e.device_type == DeviceType.CPU]
    loader_ms = sum(e.time_range.end - e.time_range.start for e in loaders) / 1e3
    loader_ranges = [(e.time_range.start, e.time_range.end) for e in loaders]
    step_ranges = [(e.time_range.start, e.time_range.end) for e in steps]

    def inside(t0: float, t1: float, ranges) -> bool:
        return any(a <= t0 and t1 <= b + 1.0 for a, b in ranges)  # 1 us: the clocks' rounding

    def around(t0: float, t1: float, ranges) -> int | None:
        """The range holding the interval's midpoint: a device interval a few us off the host's clock still
        lands in its step (or in the loader's wait), counted whole."""
        mid = (t0 + t1) / 2
        return next((i for i, (a, b) in enumerate(ranges) if a <= mid <= b), None)

    ms: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    nbytes: dict[str, float] = defaultdict(float)
    busy: list[tuple[float, float]] = []
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and e.name not in ("evim3.step", "evim3.loader")
               and inside(e.time_range.start, e.time_range.end, step_ranges)]
    in_loader = {id(e) for e in cpu_ops if any(c.name == "evim3.loader" for c in _chain(e))}
    by_id = {e.id: e for e in events if e.device_type == DeviceType.CPU}

    # Work (FLOPs, bytes) from the ops, classified like their time
    for e in cpu_ops:
        if id(e) in in_loader:
            continue
        names = [c.name for c in _chain(e)]
        family = classify(e.name, names)
        if family.startswith("scan"):
            continue  # the scan's work is counted from its shapes
        leaf_flops = e.flops and not any(c.flops for c in e.cpu_children)
        if leaf_flops:
            flops[family] += e.flops
        flops[family] += _conv_flops(e)
        if _launches(e, device_type):
            nbytes[family] += _op_bytes(e)

    ends = [b for _, b in step_ranges]  # a step's window ends with its last device interval, if that is later
    if device_type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA
                   and around(e.time_range.start, e.time_range.end, step_ranges) is not None]
        for k in kernels:
            t0, t1 = k.time_range.start, k.time_range.end
            i = around(t0, t1, step_ranges)
            ends[i] = max(ends[i], t1)
            if around(t0, t1, loader_ranges) is not None:
                continue  # the batch's copy to the device: loader wait
            parent = by_id.get(getattr(k, "linked_correlation_id", 0))
            names = [c.name for c in _chain(parent)] if parent is not None else []
            ms[classify(k.name, names)] += (t1 - t0) / 1e3
            busy.append((t0, t1))
    else:
        for e in cpu_ops:
            if id(e) in in_loader:
                continue
            self_us = (e.time_range.end - e.time_range.start) - sum(
                c.time_range.end - c.time_range.start for c in e.cpu_children)
            ms[classify(e.name, [c.name for c in _chain(e)])] += self_us / 1e3
            if e.cpu_parent is None or e.cpu_parent.name == "evim3.step":
                busy.append((e.time_range.start, e.time_range.end))
    window = sum(end - a for (a, _), end in zip(step_ranges, ends)) / 1e3
    ms["loader wait"] = loader_ms
    ms["idle"] = max(0.0, window - loader_ms - _union_ms(busy))
    n = max(1, len(steps))
    return ({k: v / n for k, v in ms.items()}, {k: v / n for k, v in flops.items()},
            {k: v / n for k, v in nbytes.items()}, window / n, n)


@contextlib.contextmanager
def _scan_choice(model: torch.nn.Module, inner: str | None, recorder: ScanCalls) -> Iterator[None]:
    global _RECORDER, _INNER
    from evim3.ops import use_scan

    _register_profiled_scan()
    _RECORDER, _INNER = recorder, inner
    try:
        with use_scan(model, "profiled"):
            yield
    finally:
        _RECORDER, _INNER = None, None


def profile_step(preset: str, *, device: str | None = None, scan: str | None = None, fused_adamw: bool = False,
                 compile_backend: str = "", steps: int | None = None, tiny: bool | None = None) -> StepProfile:
    """Profile `steps` training steps of `preset` (a key of PRESET_STEPS) after warm-up steps; see the docstring."""
    from evim3.config import PRESETS
    from evim3.models import EViM3
    from evim3.models.evim3 import Mamba3DBlock
    from evim3.models.pretrain import EViM3MAE

    if compile_backend and scan is None:
        scan = "triton-op"  # compiled, the dispatcher would trace the chunked scan: the custom op stays one call
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    tiny = (not cuda) if tiny is None else tiny
    steps = steps or (2 if cuda else 1)
    warmup = 2 if cuda else 1
    config, batch, stage = PRESET_STEPS[preset]
    cfg = PRESETS[config].replace(**TINY) if tiny else PRESETS[config]
    batch = 1 if tiny else batch
    torch.manual_seed(0)
    model = (EViM3MAE(cfg, mask_ratio=0.8) if stage == "pretrain" else EViM3(cfg)).to(device)
    if compile_backend:
        for block in model.modules():
            if isinstance(block, Mamba3DBlock):
                block.compile(backend=compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused_adamw else {}))
    loader = torch.utils.data.DataLoader(
        _Clips((cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size), batch * (warmup + steps)),
        batch_size=batch, num_workers=2 if cuda else 0, pin_memory=cuda)
    recorder = ScanCalls()
    step_s: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(it) -> None:
        t0 = time.perf_counter()
        with torch.profiler.record_function("evim3.step"):
            with torch.profiler.record_function("evim3.loader"):
                clip, target = next(it)
                clip, target = clip.to(device, non_blocking=True), target.to(device, non_blocking=True)
                sync()  # the copy belongs to the loader's wait
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(clip)
                loss = out["loss"] if stage == "pretrain" else torch.nn.functional.mse_loss(out.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
        step_s.append(time.perf_counter() - t0)

    with _scan_choice(model, scan, recorder):
        it = iter(loader)
        for _ in range(warmup):
            step(it)
        recorder.calls.clear()
        step_s.clear()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, record_shapes=True, with_flops=True) as prof:
            for _ in range(steps):
                step(it)
    family_ms, family_flops, family_bytes, window_ms, n = analyse(prof.events(), "cuda" if cuda else "cpu")
    for family, (f, b) in recorder.flops_bytes().items():
        family_flops[family] = family_flops.get(family, 0.0) + f / n
        family_bytes[family] = family_bytes.get(family, 0.0) + b / n
    peak_name, peaks = device_peaks(torch.device(device))
    from evim3.ops import scan_name

    options = {"scan": scan or scan_name(device), "fused_adamw": fused_adamw, "compile": compile_backend or "eager"}
    return StepProfile(preset, batch, 1e3 * sum(step_s) / len(step_s), window_ms, dict(family_ms), dict(family_flops),
                       dict(family_bytes), peaks, peak_name, options, tiny)


def run() -> dict:
    presets = [p for p in os.environ.get("EVIM3_BENCH_GPU_PROFILE_PRESETS", ",".join(PRESET_STEPS)).split(",") if p]
    steps = int(os.environ.get("EVIM3_BENCH_GPU_PROFILE_STEPS", "0")) or None
    options = {"scan": os.environ.get("EVIM3_BENCH_GPU_PROFILE_SCAN") or None,
               "fused_adamw": os.environ.get("EVIM3_BENCH_GPU_PROFILE_FUSED", "0") == "1",
               "compile_backend": os.environ.get("EVIM3_BENCH_GPU_PROFILE_COMPILE", "")}
    rows = []
    for preset in presets:
        rows += profile_step(preset, steps=steps, **options).rows()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (tiny code-path check, nominal peaks)"
    return {"rows": rows, "device": device}
