"""The selective scan as a fused C++ kernel for CPU tensors (csrc/selective_scan_cpu.cpp), forward and backward.

The CPU counterpart of mamba-ssm's CUDA kernel: a group of 16 channels of one batch element walks the sequence
with its states in cache, one SIMD lane a channel, groups in parallel over torch's threads; u, delta and z may be
channel-last views (the kernels: runtime/csrc/selective_scan_kernel.h). It is compiled on first use with the C++
compiler torch finds (torch.utils.cpp_extension, cached under ~/.cache/torch_extensions), and when that is not
possible the dispatcher falls back to the chunked scan with one warning. EVIM3_CPU_SCAN=0 turns it off.
Same signature as selective_scan_ref; checked against it in float64 and float32 (tests/test_scan_cpu.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evim3.runtime.fused_scan import KERNEL_HEADER, VECTOR_FLAGS, arch_flag

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "selective_scan_cpu.cpp"  # the torch binding; the scan kernels: the runtime's KERNEL_HEADER
CONV_HEADER = CSRC / "causal_conv1d_cpu.h"  # Mamba's causal conv1d, built into the same extension
CHUNK = 64  # tokens between saved states: the backward recomputes at most this many a channel
DISABLE_ENV = "EVIM3_CPU_SCAN"
# The extension's name and the namespace of its operators: this prefix, then the build tag (_build_tag).
EXTENSION_PREFIX = "evim3_selective_scan_cpu_"


def _build_tag() -> str:
    """A short hash of this CPU's architecture and instruction-set flags, the -march, and the source's path. The
    kernel is built with -march=native (3x faster than the baseline ISA here: the exp and state updates vectorise to
    AVX2/FMA), so a build cache shared between different machines must not hand one machine's build to another.
    The path: torch keys the build directory by the extension's name, and its build file names the source by
    absolute path, so two checkouts sharing one cache under one name would rebuild over each other at every
    switch -- and a process killed mid-build leaves a lock file that stalls the next one."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    # The header's content too: torch's rebuild check hashes the listed sources only.
    header = KERNEL_HEADER.read_bytes() + CONV_HEADER.read_bytes()
    build = f"{platform.machine()} {flags} {arch_flag()} {VECTOR_FLAGS} {SOURCE.resolve()}"
    return hashlib.sha1(build.encode() + header).hexdigest()[:10]


@functools.cache
def cpu_kernel() -> Any | None:
    """The compiled extension's operators (torch.ops.<its name>: forward, backward, causal_conv1d_forward,
    causal_conv1d_backward), or None (turned off, or no working compiler: warned once)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    from torch.utils import cpp_extension

    name = EXTENSION_PREFIX + _build_tag()
    try:
        # A plain library registering torch operators, not a pybind11 module: its build takes 14 s, not 36 (2 cores).
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_include_paths=[str(KERNEL_HEADER.parent)],
            extra_cflags=["-O3", "-fopenmp", arch_flag(), *VECTOR_FLAGS],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return getattr(torch.ops, name)
    except Exception as e:  # noqa: BLE001 -- no compiler, no ninja, a failed build: all mean "fall back"
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"evim3: the fused CPU scan could not be built ({reason[:200]}); using the chunked scan "
            f"(slower). Set {DISABLE_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


class CpuScanFn(torch.autograd.Function):
    """out, h_L = (scan(u, softplus(delta + delta_bias), A, B, C) + D u) * silu(z) for inputs of one dtype:
    u, delta, z (b, d, L) of any strides, B, C token-major (b, L, n); D, z, delta_bias may be None."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool):
        kernel = cpu_kernel()
        needs_grad = any(ctx.needs_input_grad)
        out, last, checkpoints = kernel.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHUNK, needs_grad)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
            ctx.delta_softplus = delta_softplus
        return out, last

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        grad_out = torch.zeros_like(u) if grad_out is None else grad_out
        du, ddelta, dA, dB, dC, dD, dbias, dz = cpu_kernel().backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, checkpoints, grad_out, grad_last, CHUNK, None)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, None)


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan by the fused CPU kernel; float32 (float64 inputs stay float64). Raises if it is unavailable."""
    if cpu_kernel() is None:
        raise RuntimeError("the fused CPU scan is not available (see the warning above); use selective_scan")
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32

    def prepared(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(dtype).contiguous()

    def token_major(x: Tensor) -> Tensor:  # (b, n, L) -> (b, L, n) with a token's n-vector contiguous
        x = x.to(dtype).transpose(1, 2)
        return x if x.stride(2) == 1 else x.contiguous()

    # u, delta and z keep their strides (the kernel reads any; evim3's Mamba passes channel-last views).
    B_t, C_t = token_major(B), token_major(C)
    if B_t.stride() != C_t.stride():
        B_t, C_t = B_t.contiguous(), C_t.contiguous()
    out, last_state = CpuScanFn.apply(u.to(dtype), delta.to(dtype), prepared(A), B_t, C_t, prepared(D),
                                      None if z is None else z.to(dtype), prepared(delta_bias), delta_softplus)
    out = out.to(u.dtype)
    return (out, last_state.to(u.dtype)) if return_last_state else out
