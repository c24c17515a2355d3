"""A variant of the Triton scan (selective_scan_triton.py) for issue 27: same maths, same outputs, different memory
traffic and instruction mix. Selectable beside the current kernels (scans "triton-pre" and "triton-pre-s2" in the
registry), so that one GPU run times both side by side and keeps the faster (scripts/gpu_check.py).

What changes, and why:
  * A per-token prepass (one small Triton kernel): dt = softplus(delta + delta_bias) in float32, and in the
    backward also softplus'(delta + delta_bias) = sigmoid. The current kernels recompute softplus per token in every
    program that needs it: twice per channel in the gradient kernel (for t and for t + 1, the adjoint's decay) and
    twice in the carry kernel. Here each is one float32 load. Nothing extra is saved for the backward: the backward
    runs the prepass again (one elementwise pass over (b, d, L)), so peak memory is the current kernels' plus two
    transient (b, d, L) float32 buffers during one scan.
  * Time-contiguous B and C: the model hands B, C as (b, n, L) views of x_proj's (b, L, n) output (n-contiguous), so
    a (n, BLOCK_L) tile load is strided along L. One copy to (b, n, L) contiguous makes those loads coalesced; B, C
    are small (b * n * L, 1/48 of u at `evim3` size).
  * Software pipelining: the chunk loops (forward, carry) and the gradient kernel's channel loop are
    ``tl.range(..., num_stages=STAGES)``: the loads of the next iteration do not depend on the carried state, so
    Triton may issue them ahead. STAGES = 1 is the plain loop ("triton-pre"), 2 the pipelined one
    ("triton-pre-s2"); which is faster (and whether either beats the current kernels) only a GPU can say.

Exactness: the same float32 arithmetic as the current kernels (the prepass's softplus is the same function), checked
against the float64 reference under TRITON_INTERPRET=1 (tests/test_scan_triton.py) and on CUDA by
scripts/gpu_check.py. Register use per kernel for sm_90 without a GPU: evim3/ops/triton_static.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from evim3.ops.selective_scan_triton import (
    BLOCK_L,
    GRAD_NUM_WARPS,
    GRAD_PROGRAMS,
    NUM_WARPS,
    GradParts,
    _affine_combine,
    _column,
    _device,
    _softplus,
)

PREPASS_BLOCK = 1024  # tokens per prepass program: a pure elementwise pass


@triton.jit
def _prepass_kernel(delta_ptr, bias_ptr, dt_ptr, dsp_ptr, d, L,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_DSP: tl.constexpr, BLOCK: tl.constexpr):
    """dt = softplus?(delta + bias) (float32) and, for the backward, d dt / d delta (0 past L)."""
    row = tl.program_id(1)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < L
    x = tl.load(delta_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + row % d).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(x)
    else:
        dt = x
    tl.store(dt_ptr + row * L + t, dt, mask=mask)
    if SAVE_DSP:
        if SOFTPLUS:
            dsp = tl.where(x > 20.0, 1.0, tl.sigmoid(x))
        else:
            dsp = tl.full([BLOCK], 1.0, tl.float32)
        tl.store(dsp_ptr + row * L + t, dsp, mask=mask)


@triton.jit
def _pre_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, last_ptr, ckpt_ptr,
    d, L, n, num_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_CKPT: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """As _scan_fwd_kernel, with dt from the prepass and B, C (b, n, L) contiguous."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    row = b * d + c
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
    Dc = 0.0
    if HAS_D:
        Dc = tl.load(D_ptr + c).to(tl.float32)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, num_chunks, num_stages=STAGES):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + (row * num_chunks + k) * n + states, h, mask=smask)
        t = k * BLOCK_L + cols
        mask = t < L
        tile = (b * n + states[:, None]) * L + t[None, :]
        tile_mask = smask[:, None] & mask[None, :]
        u = tl.load(u_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row * L + t, mask=mask, other=0.0)  # 0 past L: identity steps
        Bt = tl.load(B_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
        decay = tl.exp(dt[None, :] * A[:, None])
        drive = (dt * u)[None, :] * Bt
        decay_prod, local = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prod * h[:, None] + local
        y = tl.sum(Ct * hs, axis=0)
        if HAS_D:
            y += Dc * u
        if HAS_Z:
            zt = tl.load(z_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(out_ptr + row * L + t, y.to(out_ptr.dtype.element_ty), mask=mask)
        h = _column(hs, cols, BLOCK_L - 1)
    tl.store(last_ptr + row * n + states, h, mask=smask)


@triton.jit
def _pre_adjoint_inputs(dt_ptr, gout_ptr, z_ptr, Ct, A, t, cols, mask, L,
                        HAS_Z: tl.constexpr, BLOCK_L: tl.constexpr):
    """The reverse scan's pairs of one chunk (see _chunk_adjoint_inputs), dt_{t+1} read from the prepass."""
    gout = tl.load(gout_ptr + t, mask=mask, other=0.0).to(tl.float32)
    z = gout
    if HAS_Z:
        z = tl.load(z_ptr + t, mask=mask, other=0.0).to(tl.float32)
        gy = gout * z * tl.sigmoid(z)
    else:
        gy = gout
    next_mask = (t + 1 < L) & (cols < BLOCK_L - 1)
    dt_next = tl.load(dt_ptr + t + 1, mask=next_mask, other=0.0)
    alpha = tl.exp(dt_next[None, :] * A[:, None])
    return alpha, gy[None, :] * Ct, gy, gout, z


@triton.jit
def _pre_bwd_carry_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, gout_ptr, glast_ptr, adj_ptr,
    d, L, n, num_chunks,
    HAS_Z: tl.constexpr, HAS_GLAST: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """As _scan_bwd_carry_kernel: adj[row, k] = the adjoint flowing into chunk k from its right."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    row = b * d + c
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GLAST:
        carry = tl.load(glast_ptr + row * n + states, mask=smask, other=0.0).to(tl.float32)
    for kk in tl.range(0, num_chunks, num_stages=STAGES):
        k = num_chunks - 1 - kk
        tl.store(adj_ptr + (row * num_chunks + k) * n + states, carry, mask=smask)
        t = k * BLOCK_L + cols
        mask = t < L
        Ct = tl.load(C_ptr + (b * n + states[:, None]) * L + t[None, :],
                     mask=smask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        alpha, readout, _, _, _ = _pre_adjoint_inputs(dt_ptr + row * L, gout_ptr + row * L, z_ptr + row * L,
                                                      Ct, A, t, cols, mask, L, HAS_Z, BLOCK_L)
        alpha_prod, local = tl.associative_scan((alpha, readout), 1, _affine_combine, reverse=True)
        g_first = _column(local + alpha_prod * carry[:, None], cols, 0)
        dt_first = tl.load(dt_ptr + row * L + k * BLOCK_L)  # k * BLOCK_L < L always
        carry = tl.exp(dt_first * A) * g_first


@triton.jit
def _pre_bwd_grad_kernel(
    u_ptr, dt_ptr, dsp_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, gout_ptr, ckpt_ptr, adj_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    batch, d, L, n, num_chunks, channels_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """As _scan_bwd_grad_kernel (same formulas), with dt, dt_{t+1} and softplus' read from the prepass."""
    k = tl.program_id(0)
    group = tl.program_id(1)
    b = tl.program_id(2)
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    t = k * BLOCK_L + cols
    mask = t < L
    tile_mask = smask[:, None] & mask[None, :]
    tile = (b * n + states[:, None]) * L + t[None, :]
    Bt = tl.load(B_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    dB_acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    first = group * channels_per_group
    last = tl.minimum(first + channels_per_group, d)
    for c in tl.range(first, last, num_stages=STAGES):
        row = b * d + c
        A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
        D = 0.0
        if HAS_D:
            D = tl.load(D_ptr + c).to(tl.float32)
        u = tl.load(u_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row * L + t, mask=mask, other=0.0)
        dsp = tl.load(dsp_ptr + row * L + t, mask=mask, other=0.0)  # 0 past L: masks ddt there
        h0 = tl.load(ckpt_ptr + (row * num_chunks + k) * n + states, mask=smask, other=0.0)
        carry = tl.load(adj_ptr + (row * num_chunks + k) * n + states, mask=smask, other=0.0)

        decay = tl.exp(dt[None, :] * A[:, None])
        dtu = dt * u
        drive = dtu[None, :] * Bt
        decay_prod, local = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prod * h0[:, None] + local
        alpha, readout, gy, gout, z = _pre_adjoint_inputs(
            dt_ptr + row * L, gout_ptr + row * L, z_ptr + row * L, Ct, A, t, cols, mask, L, HAS_Z, BLOCK_L)
        if HAS_Z:
            y = tl.sum(Ct * hs, axis=0) + D * u
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + row * L + t, (gout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                     mask=mask)

        alpha_prod, local_adj = tl.associative_scan((alpha, readout), 1, _affine_combine, reverse=True)
        g = local_adj + alpha_prod * carry[:, None]
        g_decay = g * (hs - drive)
        g_B = tl.sum(g * Bt, axis=0)
        ddt = (tl.sum(g_decay * A[:, None], axis=0) + u * g_B) * dsp
        du = dt * g_B + D * gy
        tl.store(du_ptr + row * L + t, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + row * L + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        part = (b * num_chunks + k) * d + c
        tl.store(dA_ptr + part * n + states, tl.sum(g_decay * dt[None, :], axis=1), mask=smask)
        if HAS_D:
            tl.store(dD_ptr + part, tl.sum(gy * u, axis=0))
        if HAS_BIAS:
            tl.store(dbias_ptr + part, tl.sum(ddt, axis=0))
        dB_acc += g * dtu[None, :]
        dC_acc += gy[None, :] * hs
    out = ((group * batch + b) * n + states[:, None]) * L + t[None, :]
    tl.store(dB_ptr + out, dB_acc, mask=tile_mask)
    tl.store(dC_ptr + out, dC_acc, mask=tile_mask)


def prepass(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, with_derivative: bool
            ) -> tuple[Tensor, Tensor | None]:
    """(dt, d dt / d delta) as float32 (b, d, L); the derivative only when asked (the backward)."""
    batch, d, L = delta.shape
    dt = torch.empty(batch, d, L, device=delta.device, dtype=torch.float32)
    dsp = torch.empty_like(dt) if with_derivative else None
    with _device(delta):
        _prepass_kernel[(triton.cdiv(L, PREPASS_BLOCK), batch * d)](
            delta, delta_bias if delta_bias is not None else dt, dt, dsp if dsp is not None else dt, d, L,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), SAVE_DSP=with_derivative,
            BLOCK=PREPASS_BLOCK, num_warps=4,
        )
    return dt, dsp


class TritonPreScanFn(torch.autograd.Function):
    """out, h_L for u, delta, z contiguous (b, d, L), B, C contiguous (b, n, L); D, z, delta_bias may be None."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, block_l: int,
                grad_groups: int, stages: int, grad_programs: int, grad_warps: int):
        batch, d, L = u.shape
        n = A.shape[1]
        num_chunks = triton.cdiv(L, block_l)
        needs_grad = any(ctx.needs_input_grad)
        f32 = {"device": u.device, "dtype": torch.float32}
        dt, _ = prepass(delta, delta_bias, delta_softplus, with_derivative=False)
        out = torch.empty_like(u)
        last = torch.empty(batch, d, n, **f32)
        ckpt = torch.empty(batch, d, num_chunks, n, **f32) if needs_grad else last
        with _device(u):
            _pre_fwd_kernel[(d, batch)](
                u, dt, A, B, C, D if D is not None else u, z if z is not None else u, out, last, ckpt,
                d, L, n, num_chunks, HAS_D=D is not None, HAS_Z=z is not None, SAVE_CKPT=needs_grad,
                STAGES=stages, BLOCK_L=block_l, BLOCK_N=triton.next_power_of_2(n), num_warps=NUM_WARPS,
            )
        if needs_grad:
            # delta, not dt, is saved: the backward's prepass recomputes dt (no float32 (b, d, L) kept alive)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.delta_softplus, ctx.block_l, ctx.grad_groups, ctx.stages = delta_softplus, block_l, grad_groups, stages
            ctx.grad_programs, ctx.grad_warps = grad_programs, grad_warps
        return out, last

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grads = pre_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, grad_out, grad_last, ctx.delta_softplus,
                             ctx.block_l, ctx.grad_groups, ctx.stages, ctx.grad_programs, ctx.grad_warps)
        return (*grads, None, None, None, None, None, None)


def pre_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, ckpt: Tensor, grad_out: Tensor | None, grad_last: Tensor | None,
                 delta_softplus: bool, block_l: int, grad_groups: int, stages: int,
                 grad_programs: int = GRAD_PROGRAMS, grad_warps: int = GRAD_NUM_WARPS) -> tuple:
    """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias) from the forward's saved tensors (None where absent).

    grad_programs: how many (chunk, channel group, batch) programs the gradient kernel aims for (more: more
    parallelism, more partial dB, dC sums); grad_warps: its warps per program (fewer: more registers a thread)."""
    batch, d, L = u.shape
    n = A.shape[1]
    num_chunks = ckpt.shape[2]
    block_n = triton.next_power_of_2(n)
    dt, dsp = prepass(delta, delta_bias, delta_softplus, with_derivative=True)
    gout = torch.zeros_like(u) if grad_out is None else grad_out.contiguous()
    glast = None if grad_last is None else grad_last.float().contiguous()
    adj = torch.empty_like(ckpt)
    g = GradParts.allocate(u, delta, z, D, delta_bias, ckpt, n, grad_groups, grad_programs)
    dummy = u
    with _device(u):
        _pre_bwd_carry_kernel[(d, batch)](
            dt, A, C, z if z is not None else dummy, gout, glast if glast is not None else dummy, adj,
            d, L, n, num_chunks, HAS_Z=z is not None, HAS_GLAST=glast is not None, STAGES=stages,
            BLOCK_L=block_l, BLOCK_N=block_n, num_warps=NUM_WARPS,
        )
        _pre_bwd_grad_kernel[(num_chunks, g.groups, batch)](
            u, dt, dsp, A, B, C, D if D is not None else dummy, z if z is not None else dummy, gout, ckpt, adj,
            *g.kernel_outputs(), batch, d, L, n, num_chunks, g.per_group, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, STAGES=stages, BLOCK_L=block_l, BLOCK_N=block_n,
            num_warps=grad_warps,
        )
    return g.gradients(A, B, C, D, delta_bias)


def selective_scan_triton_pre(
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
    block_l: int = BLOCK_L,
    grad_groups: int = 0,
    stages: int = 1,
    grad_programs: int = GRAD_PROGRAMS,
    grad_warps: int = GRAD_NUM_WARPS,
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan by the prepass variant (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests).

    block_l, grad_groups as selective_scan_triton; stages: the loops' software-pipelining depth (1: none);
    grad_programs, grad_warps: the gradient kernel's launch (see pre_backward; scripts/gpu_check.py sweeps them).
    At `evim3` size the default 512 programs run 256 channels each in sequence, one 8-warp program per SM at ~170
    registers a thread: few warps to hide latency, which the sweep measures against more, smaller groups.
    """
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan_triton_pre: u, delta (b, d, L) and A (d, n) expected, got "
                         f"{tuple(u.shape)}, {tuple(delta.shape)}, {tuple(A.shape)}")
    if u.numel() * A.shape[1] >= 2**31:
        raise ValueError("selective_scan_triton_pre: batch * d * L * n must stay below 2**31 (32-bit offsets)")

    def rows(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.contiguous()

    # B, C time-contiguous (b, n, L): the copy is what makes their tile loads coalesced
    out, last_state = TritonPreScanFn.apply(
        rows(u), rows(delta), A.contiguous(), B.contiguous(), C.contiguous(), rows(D), rows(z), rows(delta_bias),
        delta_softplus, block_l, grad_groups, stages, grad_programs, grad_warps,
    )
    return (out, last_state.to(u.dtype)) if return_last_state else out


def selective_scan_triton_pre_s2(*args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """The prepass variant with its loops software-pipelined two deep (tl.range num_stages=2)."""
    return selective_scan_triton_pre(*args, stages=2, **kwargs)


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1 (CPU tensors, for tests)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_pre_fwd_kernel, InterpretedFunction)
