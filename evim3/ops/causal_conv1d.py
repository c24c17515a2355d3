"""Mamba's causal depthwise conv1d (+ SiLU): the reference, and the fused C++ kernel for CPU tensors.

Same signature as causal-conv1d's ``causal_conv1d_fn`` (the CUDA package mamba-ssm uses): x (batch, d, L),
weight (d, k), bias (d) or None, activation None or "silu"; returns (batch, d, L). The CPU kernel
(csrc/causal_conv1d_cpu.h, built into the fused scan's extension) reads x channel-last -- a view of in_proj's
(batch, L, 2d) output, as evim3's Mamba block has it -- and returns a channel-last result, so neither side
copies a transpose. Checked against the reference in float64 (tests/test_scan_cpu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.ops.selective_scan_chunked import tracing
from evim3.ops.selective_scan_cpu import cpu_kernel


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """The reference: torch's grouped conv1d, left-padded by k - 1 and cut back to L."""
    k = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def channel_last(x: Tensor) -> Tensor:
    """(b, d, L) -> the (b, L, d) view the kernel reads, copied only when channels are not contiguous."""
    x = x.transpose(1, 2)
    return x if x.stride(2) == 1 else x.contiguous()


class CpuConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        x_cl = channel_last(x)
        weight_t = weight.t().contiguous()  # (k, d): a tap's weights for every channel together
        ctx.save_for_backward(x_cl, weight_t, bias)
        ctx.silu = silu
        return cpu_kernel().causal_conv1d_forward(x_cl, weight_t, bias, silu).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_cl, weight_t, bias = ctx.saved_tensors
        dx, dweight_t, dbias = cpu_kernel().causal_conv1d_backward(x_cl, weight_t, bias, channel_last(grad_out),
                                                                   ctx.silu, None)
        return dx.transpose(1, 2), dweight_t.t(), dbias if bias is not None else None, None


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """The fused CPU kernel for float32/float64 CPU tensors outside tracing; the reference otherwise."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    fused = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not tracing()
             and weight.dtype == x.dtype and cpu_kernel() is not None)
    if not fused:
        return causal_conv1d_ref(x, weight, bias, activation)
    return CpuConvFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(), activation == "silu")
