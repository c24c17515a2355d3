"""The selective scan's registry and dispatcher. Each implementation lives in its own file beside the reference
(selective_scan_ref.py) with the same signature (mamba-ssm's ``selective_scan_fn``):

    chunked     selective_scan_chunked.py     plain tensor ops, any device, differentiable; what tracers see
    exportable  selective_scan_exportable.py  Scan loops for ONNX export (inference only)
    cpu         selective_scan_cpu.py         the fused C++ kernel, CPU tensors
    triton      selective_scan_triton.py      Triton kernels, CUDA tensors
    triton-pre  selective_scan_triton_pre.py  the Triton kernels with a per-token prepass (issue 27 variant;
                                              "triton-pre-s2": loops software-pipelined), CUDA tensors
    triton-op   selective_scan_op.py          the Triton scan as a torch.library custom op (torch.compile
                                              fuses around it); on CPU tensors it wraps the fused C++ kernel
    mamba       mamba-ssm's CUDA kernel (the [cuda] extra)

``selective_scan(..., impl=None)`` runs the one `impl` names, or the best for u's device (``scan_name``): the
one EVIM3_SCAN forces (read here only, by ``forced_scan``), else on CUDA mamba-ssm, then Triton; on CPU the
fused kernel; else the chunked scan. A Mamba module passes its own ``scan`` attribute as `impl`;
``use_scan(model, name)`` sets it for a block (export: "exportable").

A new scan: a file with a function of the reference's signature, then ``register_scan(name, Scan(...))``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from evim3.ops.selective_scan_chunked import selective_scan_chunked, tracing
from evim3.ops.selective_scan_exportable import selective_scan_exportable

SCAN_ENV = "EVIM3_SCAN"


@dataclass(frozen=True)
class Scan:
    """One implementation: `load` returns its function (importing what it needs on first use);
    `unavailable(device_type)` says why it cannot run tensors there, or None when it can; `forcible`: EVIM3_SCAN
    may name it."""

    load: Callable[[], Callable[..., Tensor | tuple[Tensor, Tensor]]]
    unavailable: Callable[[str], str | None]
    forcible: bool = True


@functools.cache
def _mamba_fn():
    """mamba-ssm's CUDA kernel, or None when the [cuda] extra is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 -- ImportError, or a broken CUDA build raising at import
        return None
    return selective_scan_fn


def _mamba_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return "mamba-ssm's kernel runs CUDA tensors only"
    return None if _mamba_fn() is not None else "mamba-ssm is not installed (the [cuda] extra)"


def _triton_fn():
    from evim3.ops.selective_scan_triton import selective_scan_triton

    return selective_scan_triton


def _triton_unavailable(device_type: str) -> str | None:
    try:
        from evim3.ops import selective_scan_triton as triton_scan
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if device_type == "cuda" or (device_type == "cpu" and triton_scan.interpreted()):
        return None
    return "Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"


def _triton_pre_fn(stages: int):
    def load():
        from evim3.ops.selective_scan_triton_pre import (
            selective_scan_triton_pre,
            selective_scan_triton_pre_s2,
        )

        return selective_scan_triton_pre_s2 if stages == 2 else selective_scan_triton_pre
    return load


def _triton_pre_unavailable(device_type: str) -> str | None:
    why = _triton_unavailable(device_type)
    if why is None and device_type == "cpu":
        from evim3.ops import selective_scan_triton_pre as pre

        if not pre.interpreted():
            return "Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"
    return why


def _op_fn():
    from evim3.ops.selective_scan_op import selective_scan_op

    return selective_scan_op


def _op_unavailable(device_type: str) -> str | None:
    from evim3.ops.selective_scan_op import unavailable

    return unavailable(device_type)


def _cpu_fn():
    from evim3.ops.selective_scan_cpu import selective_scan_cpu

    return selective_scan_cpu


def _cpu_unavailable(device_type: str) -> str | None:
    from evim3.ops.selective_scan_cpu import DISABLE_ENV, cpu_kernel

    if device_type != "cpu":
        return "the fused C++ kernel runs CPU tensors only"
    return None if cpu_kernel() is not None else f"the fused C++ kernel could not be built, or {DISABLE_ENV}=0"


SCANS: dict[str, Scan] = {
    "mamba": Scan(_mamba_fn, _mamba_unavailable),
    "triton": Scan(_triton_fn, _triton_unavailable),
    "chunked": Scan(lambda: selective_scan_chunked, lambda device_type: None),
    "cpu": Scan(_cpu_fn, _cpu_unavailable),
    # issue 27's candidates, selectable beside "triton" so that one GPU run times them side by side (after the
    # established scans: messages that list the scans name those first)
    "triton-pre": Scan(_triton_pre_fn(1), _triton_pre_unavailable),
    "triton-pre-s2": Scan(_triton_pre_fn(2), _triton_pre_unavailable),
    "triton-op": Scan(_op_fn, _op_unavailable),
    # inference only, and compiled by dynamo when called eagerly: for export, chosen by use_scan
    "exportable": Scan(lambda: selective_scan_exportable, lambda device_type: None, forcible=False),
}
_AUTO_ORDER = {"cuda": ("mamba", "triton"), "cpu": ("cpu",)}  # tried in turn; the chunked scan runs anywhere


def register_scan(name: str, scan: Scan) -> None:
    SCANS[name] = scan


def scan_names() -> tuple[str, ...]:
    """The scans EVIM3_SCAN may name."""
    return tuple(name for name, scan in SCANS.items() if scan.forcible)


def fused_available() -> bool:
    return scan_unavailable("mamba", "cuda") is None


def forced_scan() -> str | None:
    """The scan EVIM3_SCAN names (a user override, for benchmarks and bug reports), or None when it is not set."""
    name = os.environ.get(SCAN_ENV, "").strip().lower()
    if not name:
        return None
    if name not in scan_names():
        raise ValueError(f"{SCAN_ENV}={name!r} is not a scan; choose one of {', '.join(scan_names())}")
    return name


def scan_unavailable(name: str, device_type: str) -> str | None:
    """Why scan `name` cannot run tensors on `device_type` here, or None when it can."""
    return SCANS[name].unavailable(device_type)


def scan_name(device_type: str) -> str:
    """The scan the dispatcher runs for tensors on `device_type`: the one EVIM3_SCAN forces (an error when it
    cannot run there), else on CUDA mamba-ssm, then Triton; on CPU the fused C++ kernel; else the chunked scan."""
    forced = forced_scan()
    if forced is not None:
        why = scan_unavailable(forced, device_type)
        if why is not None:
            raise ValueError(f"{SCAN_ENV}={forced} cannot run {device_type} tensors: {why}")
        return forced
    order = _AUTO_ORDER.get(device_type, ())
    return next((name for name in order if scan_unavailable(name, device_type) is None), "chunked")


def scan_choice(device_type: str) -> tuple[str, list[str]]:
    """(the scan for tensors on `device_type`, why each scan tried before it was passed over) -- for `evim3
    info`. Raises as scan_name does when EVIM3_SCAN forces one that cannot run there."""
    name = scan_name(device_type)
    if forced_scan() is not None:
        return name, [f"forced by {SCAN_ENV}"]
    order = _AUTO_ORDER.get(device_type, ())
    passed = order[: order.index(name)] if name in order else order
    return name, [f"not {other}: {scan_unavailable(other, device_type)}" for other in passed]


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, impl: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The scan `impl` names (one of SCANS), else the one ``scan_name`` picks for u's device; inside a tracer
    or compiler, without `impl`, the chunked scan (plain tensor ops)."""
    if impl is None:
        impl = "chunked" if tracing() else scan_name(u.device.type)
    elif impl not in SCANS:
        raise ValueError(f"unknown scan {impl!r}; choose one of {', '.join(SCANS)}")
    return SCANS[impl].load()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@contextlib.contextmanager
def use_scan(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Inside this block every scanning module of `model` (one with a ``scan`` attribute: the Mamba units)
    runs scan `name`; their own choice is restored after. State on the model, where a tracer sees it."""
    if name not in SCANS:
        raise ValueError(f"unknown scan {name!r}; choose one of {', '.join(SCANS)}")
    units = [m for m in model.modules() if hasattr(m, "scan")]
    previous = [m.scan for m in units]
    for m in units:
        m.scan = name
    try:
        yield model
    finally:
        for m, scan in zip(units, previous):
            m.scan = scan

