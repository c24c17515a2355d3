"""Mamba's whole inner block -- causal conv1d + SiLU, x_proj, dt_proj, the selective scan with its gate, out_proj --
as one autograd function for CPU tensors, beside its plain reference; the CPU counterpart of mamba-ssm's
``mamba_inner_fn`` (same signature and maths; B and C are always the input-dependent ones, as in every evim3 block).

Why one function: composed from separate autograd nodes, the backward of a Mamba block on CPU spent a fifth of its
time outside every kernel -- copying the conv's and the scan's gradients into in_proj's (batch, L, 2d) layout,
zero-filling and adding the two gradients that reach the conv output (from the scan and from x_proj), and
concatenating x_proj's three output gradients. Here the backward writes each gradient once where the next matmul
reads it: dz from the scan and dx from the conv straight into the halves of one buffer for in_proj's output,
x_proj's input gradient accumulated onto the scan's du by an in-place GEMM, dB and dC into one buffer beside
dt_proj's input gradient. Everything stays channel-last, (batch, L, channels) in memory, the layout of the
projections' outputs. Each kernel call is a profiler range ("mamba_inner::scan" etc.: benchmarks/bench_step.py
sorts them into families). The kernels: csrc/causal_conv1d_cpu.h and runtime/csrc/selective_scan_kernel.h.
Checked against ``mamba_inner_ref`` in float64 for the output and every gradient (tests/test_scan_cpu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from evim3.ops.causal_conv1d import causal_conv1d_ref, channel_last
from evim3.ops.selective_scan_cpu import CHUNK, cpu_kernel
from evim3.ops.selective_scan_ref import selective_scan_ref


def mamba_inner_ref(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, x_proj_weight: Tensor,
                    delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor | None, A: Tensor,
                    B: Tensor | None = None, C: Tensor | None = None, D: Tensor | None = None,
                    delta_bias: Tensor | None = None, delta_softplus: bool = True) -> Tensor:
    """xz (batch, 2d, L) -> (batch, L, d_model), by the reference ops. conv1d_weight (d, 1, k), x_proj_weight
    (dt_rank + 2n, d), delta_proj_weight (d, dt_rank), A (d, n)."""
    _input_dependent_bc(B, C)
    d, n, rank = xz.shape[1] // 2, A.shape[1], delta_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_ref(x, conv1d_weight.reshape(d, -1), conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, L, rank + 2n)
    delta = F.linear(x_dbl[..., :rank], delta_proj_weight).transpose(1, 2)
    B_t, C_t = x_dbl[..., rank : rank + n].transpose(1, 2), x_dbl[..., rank + n :].transpose(1, 2)
    y = selective_scan_ref(x, delta, A, B_t, C_t, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def _input_dependent_bc(B: Tensor | None, C: Tensor | None) -> None:
    if B is not None or C is not None:
        raise ValueError("mamba_inner: B and C come from x_proj here (fixed B or C is not supported)")


class CpuMambaInnerFn(torch.autograd.Function):
    """The block from in_proj's output to the gated scan output y (b, d, L) -- a channel-last view; out_proj is
    applied outside (its autograd needs no help)."""

    @staticmethod
    def forward(ctx, xz: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor,
                delta_proj_weight: Tensor, A: Tensor, D: Tensor | None, delta_bias: Tensor | None,
                delta_softplus: bool) -> Tensor:
        kernel = cpu_kernel()
        xz_cl = channel_last(xz)  # (b, L, 2d): in_proj's output as it lies in memory
        batch, L, d, n, rank = xz_cl.shape[0], xz_cl.shape[1], xz_cl.shape[2] // 2, A.shape[1], delta_proj_weight.shape[1]
        conv_weight_t = conv_weight.reshape(d, -1).t().contiguous()  # (k, d): a tap's weights for every channel
        with record_function("mamba_inner::causal_conv1d"):
            x = kernel.causal_conv1d_forward(xz_cl[..., :d], conv_weight_t, conv_bias, True)  # (b, L, d)
        x_dbl = F.linear(x.view(-1, d), x_proj_weight)  # (b L, rank + 2n)
        delta = F.linear(x_dbl[:, :rank], delta_proj_weight).view(batch, L, d)
        B, C = x_dbl[:, rank : rank + n].view(batch, L, n), x_dbl[:, rank + n :].view(batch, L, n)
        z = xz_cl[..., d:].transpose(1, 2)
        keep = any(ctx.needs_input_grad)
        with record_function("mamba_inner::scan"):
            y, _, checkpoints = kernel.forward(x.transpose(1, 2), delta.transpose(1, 2), A, B, C, D, z, delta_bias,
                                               delta_softplus, CHUNK, keep)
        if keep:
            ctx.save_for_backward(xz_cl, conv_weight_t, conv_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias,
                                  x, x_dbl, delta, checkpoints)
            ctx.delta_softplus = delta_softplus
            ctx.conv_shape = conv_weight.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (xz_cl, conv_weight_t, conv_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias, x, x_dbl, delta,
         checkpoints) = ctx.saved_tensors
        kernel = cpu_kernel()
        batch, L, d, n, rank = xz_cl.shape[0], xz_cl.shape[1], xz_cl.shape[2] // 2, A.shape[1], delta_proj_weight.shape[1]
        grad_y = channel_last(grad_y).transpose(1, 2)
        B, C = x_dbl[:, rank : rank + n].view(batch, L, n), x_dbl[:, rank + n :].view(batch, L, n)
        grad_xz = torch.empty_like(xz_cl)  # (b, L, 2d): the scan writes the z half, the conv the x half
        with record_function("mamba_inner::scan_backward"):
            du, ddelta, dA, dB, dC, dD, dbias, _ = kernel.backward(
                x.transpose(1, 2), delta.transpose(1, 2), A, B, C, D, xz_cl[..., d:].transpose(1, 2), delta_bias,
                ctx.delta_softplus, checkpoints, grad_y, None, CHUNK, grad_xz[..., d:].transpose(1, 2))
        ddelta_rows = ddelta.transpose(1, 2).reshape(-1, d)  # (b L, d), a view: the kernel wrote it channel-last
        grad_x_dbl = torch.empty_like(x_dbl)
        # dt_proj's two gradients with the rank (4 at evim3-tiny) as the GEMM's M, not its N: MKL took 5-10x longer
        # for the (b L, d) x (d, rank) and (d, b L) x (b L, rank) forms (1.2 and 2.0 ms vs 0.24 and 0.20 at the
        # demo's size, one thread)
        grad_x_dbl[:, :rank] = (delta_proj_weight.t() @ ddelta_rows.t()).t()
        grad_x_dbl[:, rank : rank + n] = dB.view(-1, n)
        grad_x_dbl[:, rank + n :] = dC.view(-1, n)
        grad_delta_proj = (x_dbl[:, :rank].t() @ ddelta_rows).t()
        grad_x_proj = grad_x_dbl.t() @ x.view(-1, d)
        grad_x = du.transpose(1, 2).reshape(-1, d)  # the scan's du, a view; x_proj's input gradient added in place
        grad_x.addmm_(grad_x_dbl, x_proj_weight)
        with record_function("mamba_inner::causal_conv1d_backward"):
            _, grad_conv_t, grad_conv_bias = kernel.causal_conv1d_backward(
                xz_cl[..., :d], conv_weight_t, conv_bias, grad_x.view(batch, L, d), True, grad_xz[..., :d])
        return (grad_xz.transpose(1, 2), grad_conv_t.t().reshape(ctx.conv_shape),
                grad_conv_bias if conv_bias is not None else None, grad_x_proj, grad_delta_proj, dA,
                dD if D is not None else None, dbias if delta_bias is not None else None, None)


def mamba_inner_cpu(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, x_proj_weight: Tensor,
                    delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor | None, A: Tensor,
                    B: Tensor | None = None, C: Tensor | None = None, D: Tensor | None = None,
                    delta_bias: Tensor | None = None, delta_softplus: bool = True) -> Tensor:
    """mamba_inner_ref by the fused CPU kernels; float32 or float64 CPU tensors of one dtype."""
    _input_dependent_bc(B, C)
    if cpu_kernel() is None:
        raise RuntimeError("the fused CPU kernels are not available (see the warning above); use mamba_inner_ref")
    def prepared(t: Tensor | None) -> Tensor | None:  # the kernels take one dtype, xz's (A, D: float32 in a model)
        return None if t is None else t.to(xz.dtype).contiguous()

    y = CpuMambaInnerFn.apply(xz, *map(prepared, (conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D,
                                                  delta_bias)), delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
