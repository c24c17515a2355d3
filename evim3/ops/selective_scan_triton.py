"""The selective scan as Triton kernels for CUDA tensors, forward and backward: nothing to compile but Triton's JIT.

Same signature and maths as selective_scan_ref (mamba-ssm's ``selective_scan_fn``), with what mamba-ssm's CUDA
kernel fuses around the recurrence fused here too: delta = softplus(delta + delta_bias), out = (y + D u) * silu(z).
Inputs may be float32, float16 or bfloat16 (each tensor its own dtype, as under autocast); the state and every
accumulation are float32; outputs and gradients come back in their input's dtype.

Why chunked associative scans and not a sequential loop per channel. A program that walks one channel's L tokens
one at a time makes L dependent steps, each waiting on a global-memory load of that token's u, delta, B, C
(hundreds of nanoseconds): ~6,700 steps at `evim3` and ~33,600 at `evim3-p4` per channel, latency-bound, with
strided loads of one element per channel. Here, as in mamba-ssm's kernel, one program owns one (batch, channel)
row and walks it chunk by chunk: a chunk's BLOCK_L tokens are loaded at once (contiguous along L, coalesced), the
(n, BLOCK_L) tile of decays exp(delta A) and drives delta u B is turned into states by ``tl.associative_scan`` over
the pairs (a, b) of the affine maps h -> a h + b (log-depth, every exponent <= 0: stable for any dt), and one
n-vector is carried to the next chunk: L / BLOCK_L sequential steps instead of L.

No (batch, d, L, n) tensor exists: states live in registers one chunk at a time. The forward saves the state
entering every chunk, (batch, d, K, n) with K = ceil(L / BLOCK_L). The backward runs two kernels:
  1. per row, right to left over chunks: the adjoint entering each chunk from its right, (batch, d, K, n)
     (one reverse associative scan per chunk, ``reverse=True``);
  2. per (chunk, channel group, batch): recompute the chunk's states from the saved entering state, the adjoint
     by a reverse scan from the saved boundary, and every gradient. Gradients summed over channels (dB, dC) are
     summed in registers over the group's channels and written once per group; gradients summed over batch and
     chunks (dA, dD, d delta_bias) are written per (batch, chunk, channel). Those partial sums are added by torch.
Every output element is written by exactly one program and nothing uses atomics, so the gradients are
deterministic (bit-identical from run to run), unlike mamba-ssm's atomicAdd of dB and dC.

Tested on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1) against the float64 reference
(tests/test_scan_triton.py); on CUDA by scripts/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L = 128  # tokens per chunk: a (16, 128) float32 tile is 16 registers a thread per tensor at 4 warps
NUM_WARPS = 4
# The gradient kernel holds ~12 such tiles at once (B, C, two accumulators, states, adjoints, scan temporaries):
# 8 warps keep that under ~100 registers a thread. Untuned: chosen by register count, not measured on a GPU.
GRAD_NUM_WARPS = 8
GRAD_PROGRAMS = 512  # enough programs of the gradient kernel to fill a GPU: channel groups are sized to reach it


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """h -> a1 h + b1, then h -> a2 h + b2. Under reverse=True the first pair is the one from the right."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20), with log1p(e) accurate for tiny e (Goldberg's correction)."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _load_dt(delta_ptr, t, mask, bias, SOFTPLUS: tl.constexpr):
    """(delta, the pre-softplus value) of the tokens at t; delta is 0 where masked (identity steps)."""
    x = tl.load(delta_ptr + t, mask=mask, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(x)
    else:
        dt = x
    return tl.where(mask, dt, 0.0), x


@triton.jit
def _column(tile, cols, j):
    """Column j of an (n, BLOCK_L) tile as an n-vector."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    d, L, n, num_chunks, sBb, sBn, sBl, sCb, sCn, sCl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_CKPT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1)
    row = b * d + c
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c).to(tl.float32)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(num_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + (row * num_chunks + k) * n + states, h, mask=smask)
        t = k * BLOCK_L + cols
        mask = t < L
        tile_mask = smask[:, None] & mask[None, :]
        u = tl.load(u_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
        dt, _ = _load_dt(delta_ptr + row * L, t, mask, bias, SOFTPLUS)
        Bt = tl.load(B_ptr + b * sBb + states[:, None] * sBn + t[None, :] * sBl, mask=tile_mask, other=0.0)
        Ct = tl.load(C_ptr + b * sCb + states[:, None] * sCn + t[None, :] * sCl, mask=tile_mask, other=0.0)
        decay = tl.exp(dt[None, :] * A[:, None])
        drive = (dt * u)[None, :] * Bt.to(tl.float32)
        decay_prod, local = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prod * h[:, None] + local
        y = tl.sum(Ct.to(tl.float32) * hs, axis=0)
        if HAS_D:
            y += tl.load(D_ptr + c).to(tl.float32) * u
        if HAS_Z:
            zt = tl.load(z_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(out_ptr + row * L + t, y.to(out_ptr.dtype.element_ty), mask=mask)
        h = _column(hs, cols, BLOCK_L - 1)  # masked tail tokens are identity steps: the last column is h_L
    tl.store(last_ptr + row * n + states, h, mask=smask)


@triton.jit
def _chunk_adjoint_inputs(delta_ptr, gout_ptr, z_ptr, Ct, A, bias, t, cols, mask, L,
                          HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr):
    """The reverse scan's pairs of one chunk: g_t = c_t + alpha_t g_{t+1} with c_t = gy_t C_t and alpha_t =
    a_{t+1} inside the chunk; 1 at the chunk's last column (the boundary value already carries a_{t1}) and past
    L. Also returns gy = d out / d y (before the D skip) and the loaded gout, z."""
    gout = tl.load(gout_ptr + t, mask=mask, other=0.0).to(tl.float32)
    z = gout
    if HAS_Z:
        z = tl.load(z_ptr + t, mask=mask, other=0.0).to(tl.float32)
        gy = gout * z * tl.sigmoid(z)
    else:
        gy = gout
    next_mask = (t + 1 < L) & (cols < BLOCK_L - 1)
    dt_next, _ = _load_dt(delta_ptr, t + 1, next_mask, bias, SOFTPLUS)
    alpha = tl.exp(dt_next[None, :] * A[:, None])
    return alpha, gy[None, :] * Ct, gy, gout, z


@triton.jit
def _scan_bwd_carry_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, gout_ptr, glast_ptr, adj_ptr,
    d, L, n, num_chunks, sCb, sCn, sCl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """adj[row, k] = a_{t1} g_{t1}: the adjoint flowing into chunk k from its right (glast for the last chunk)."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    row = b * d + c
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c).to(tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GLAST:
        carry = tl.load(glast_ptr + row * n + states, mask=smask, other=0.0).to(tl.float32)
    for kk in range(num_chunks):
        k = num_chunks - 1 - kk
        tl.store(adj_ptr + (row * num_chunks + k) * n + states, carry, mask=smask)
        t = k * BLOCK_L + cols
        mask = t < L
        Ct = tl.load(C_ptr + b * sCb + states[:, None] * sCn + t[None, :] * sCl,
                     mask=smask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        alpha, readout, _, _, _ = _chunk_adjoint_inputs(delta_ptr + row * L, gout_ptr + row * L, z_ptr + row * L,
                                                        Ct, A, bias, t, cols, mask, L, HAS_Z, SOFTPLUS, BLOCK_L)
        alpha_prod, local = tl.associative_scan((alpha, readout), 1, _affine_combine, reverse=True)
        g_first = _column(local + alpha_prod * carry[:, None], cols, 0)
        dt, _ = _load_dt(delta_ptr + row * L, t, mask, bias, SOFTPLUS)
        dt_first = tl.sum(tl.where(cols == 0, dt, 0.0), axis=0)
        carry = tl.exp(dt_first * A) * g_first


@triton.jit
def _scan_bwd_grad_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, ckpt_ptr, adj_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    batch, d, L, n, num_chunks, channels_per_group, sBb, sBn, sBl, sCb, sCn, sCl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Every gradient of one chunk of one batch element, for one group of channels.

    g_t = dL/dh_t;  a_t h_{t-1} = h_t - delta_t u_t B_t;   d(delta_t) = <g_t a_t h_{t-1}, A> + u_t <g_t, B_t>
    du_t = delta_t <g_t, B_t> + D gy_t;   dA += g_t a_t h_{t-1} delta_t;   dB_t += g_t delta_t u_t;  dC_t += gy_t h_t
    """
    k = tl.program_id(0)
    group = tl.program_id(1)
    b = tl.program_id(2)
    states = tl.arange(0, BLOCK_N)
    smask = states < n
    cols = tl.arange(0, BLOCK_L)
    t = k * BLOCK_L + cols
    mask = t < L
    tile_mask = smask[:, None] & mask[None, :]
    Bt = tl.load(B_ptr + b * sBb + states[:, None] * sBn + t[None, :] * sBl, mask=tile_mask, other=0.0)
    Ct = tl.load(C_ptr + b * sCb + states[:, None] * sCn + t[None, :] * sCl, mask=tile_mask, other=0.0)
    Bt = Bt.to(tl.float32)
    Ct = Ct.to(tl.float32)
    dB_acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    first = group * channels_per_group
    last = tl.minimum(first + channels_per_group, d)
    for c in range(first, last):
        row = b * d + c
        A = tl.load(A_ptr + c * n + states, mask=smask, other=0.0).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c).to(tl.float32)
        D = 0.0
        if HAS_D:
            D = tl.load(D_ptr + c).to(tl.float32)
        u = tl.load(u_ptr + row * L + t, mask=mask, other=0.0).to(tl.float32)
        dt, x = _load_dt(delta_ptr + row * L, t, mask, bias, SOFTPLUS)
        h0 = tl.load(ckpt_ptr + (row * num_chunks + k) * n + states, mask=smask, other=0.0)
        carry = tl.load(adj_ptr + (row * num_chunks + k) * n + states, mask=smask, other=0.0)

        # The chunk's states from the state entering it, and y = <C, h>.
        decay = tl.exp(dt[None, :] * A[:, None])
        drive = (dt * u)[None, :] * Bt
        decay_prod, local = tl.associative_scan((decay, drive), 1, _affine_combine)
        hs = decay_prod * h0[:, None] + local
        alpha, readout, gy, gout, z = _chunk_adjoint_inputs(
            delta_ptr + row * L, gout_ptr + row * L, z_ptr + row * L, Ct, A, bias, t, cols, mask, L,
            HAS_Z, SOFTPLUS, BLOCK_L)
        if HAS_Z:
            y = tl.sum(Ct * hs, axis=0) + D * u
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + row * L + t, (gout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                     mask=mask)

        # The adjoint, right to left from the boundary value, and the gradients.
        alpha_prod, local_adj = tl.associative_scan((alpha, readout), 1, _affine_combine, reverse=True)
        g = local_adj + alpha_prod * carry[:, None]
        g_decay = g * (hs - drive)  # g_t a_t h_{t-1} = dL/d(delta_t A)
        g_B = tl.sum(g * Bt, axis=0)
        ddt = tl.sum(g_decay * A[:, None], axis=0) + u * g_B
        du = dt * g_B + D * gy
        if SOFTPLUS:
            ddt = ddt * tl.where(x > 20.0, 1.0, tl.sigmoid(x))
        ddt = tl.where(mask, ddt, 0.0)
        tl.store(du_ptr + row * L + t, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + row * L + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        part = (b * num_chunks + k) * d + c  # partial sums over (batch, chunk), added by torch
        tl.store(dA_ptr + part * n + states, tl.sum(g_decay * dt[None, :], axis=1), mask=smask)
        if HAS_D:
            tl.store(dD_ptr + part, tl.sum(gy * u, axis=0))
        if HAS_BIAS:
            tl.store(dbias_ptr + part, tl.sum(ddt, axis=0))
        dB_acc += g * (dt * u)[None, :]
        dC_acc += gy[None, :] * hs
    out = ((group * batch + b) * n + states[:, None]) * L + t[None, :]  # (groups, batch, n, L)
    tl.store(dB_ptr + out, dB_acc, mask=tile_mask)
    tl.store(dC_ptr + out, dC_acc, mask=tile_mask)


def interpreted() -> bool:
    """Whether these kernels were defined under TRITON_INTERPRET=1: they then run CPU tensors (slowly, for tests)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_scan_fwd_kernel, InterpretedFunction)


def _device(x: Tensor):
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do for the interpreter's CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _flags(D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(delta_softplus)}


class TritonScanFn(torch.autograd.Function):
    """out, h_L for u, delta, z contiguous (b, d, L); B, C (b, n, L) of any strides; D, z, delta_bias may be None."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, block_l: int,
                grad_groups: int):
        needs_grad = any(ctx.needs_input_grad)
        out, last, ckpt = triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l, needs_grad)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.delta_softplus, ctx.block_l, ctx.grad_groups = delta_softplus, block_l, grad_groups
        return out, last

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grads = triton_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, grad_out, grad_last, ctx.delta_softplus,
                                ctx.block_l, ctx.grad_groups)
        return (*grads, None, None, None)


def triton_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                   delta_bias: Tensor | None, delta_softplus: bool, block_l: int, save_ckpt: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, last state float32, the state entering each chunk (b, d, K, n) -- `last` itself unless save_ckpt).
    Also the forward of the custom op (selective_scan_op.py)."""
    batch, d, L = u.shape
    n = A.shape[1]
    num_chunks = triton.cdiv(L, block_l)
    f32 = {"device": u.device, "dtype": torch.float32}
    out = torch.empty_like(u)
    last = torch.empty(batch, d, n, **f32)
    ckpt = torch.empty(batch, d, num_chunks, n, **f32) if save_ckpt else last
    with _device(u):
        _scan_fwd_kernel[(d, batch)](
            u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, out, last, ckpt,
            d, L, n, num_chunks, *B.stride(), *C.stride(), **_flags(D, z, delta_bias, delta_softplus),
            SAVE_CKPT=save_ckpt, BLOCK_L=block_l, BLOCK_N=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        )
    return out, last, ckpt


@dataclass
class GradParts:
    """The gradient kernel's outputs: du, ddelta, dz written; dB, dC as one partial sum per channel group and dA,
    dD, d delta_bias per (batch, chunk), added up here (no atomics: deterministic). Shared by the Triton
    variants' backwards."""

    du: Tensor
    ddelta: Tensor
    dz: Tensor | None
    dB: Tensor
    dC: Tensor
    dA: Tensor
    dD: Tensor | None
    dbias: Tensor | None
    groups: int
    per_group: int

    @classmethod
    def allocate(cls, u: Tensor, delta: Tensor, z: Tensor | None, D: Tensor | None, delta_bias: Tensor | None,
                 ckpt: Tensor, n: int, grad_groups: int, grad_programs: int) -> GradParts:
        batch, d, L = u.shape
        num_chunks = ckpt.shape[2]
        # Channel groups: enough (chunk, group, batch) programs to fill the GPU, few enough partial dB, dC.
        groups = grad_groups or min(d, max(1, math.ceil(grad_programs / (batch * num_chunks))))
        per_group = math.ceil(d / groups)
        groups = math.ceil(d / per_group)
        f32 = {"device": u.device, "dtype": torch.float32}
        return cls(
            du=torch.empty_like(u), ddelta=torch.empty_like(delta), dz=torch.empty_like(z) if z is not None else None,
            dB=torch.empty(groups, batch, n, L, **f32), dC=torch.empty(groups, batch, n, L, **f32),
            dA=torch.empty(batch, num_chunks, d, n, **f32),
            dD=torch.empty(batch, num_chunks, d, **f32) if D is not None else None,
            dbias=torch.empty(batch, num_chunks, d, **f32) if delta_bias is not None else None,
            groups=groups, per_group=per_group,
        )

    def kernel_outputs(self) -> tuple[Tensor, ...]:
        """The output pointers in the gradient kernels' order (an absent one's slot gets a stand-in)."""
        return (self.du, self.ddelta, self.dz if self.dz is not None else self.du, self.dB, self.dC, self.dA,
                self.dD if self.dD is not None else self.dA, self.dbias if self.dbias is not None else self.dA)

    def gradients(self, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, delta_bias: Tensor | None) -> tuple:
        """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias), each in its input's dtype, None where that is None."""
        dD = self.dD.sum((0, 1)).to(D.dtype) if D is not None else None
        dbias = self.dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
        return (self.du, self.ddelta, self.dA.sum((0, 1)).to(A.dtype), self.dB.sum(0).to(B.dtype),
                self.dC.sum(0).to(C.dtype), dD, self.dz, dbias)


def triton_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                    delta_bias: Tensor | None, ckpt: Tensor, grad_out: Tensor | None, grad_last: Tensor | None,
                    delta_softplus: bool, block_l: int, grad_groups: int) -> tuple:
    """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias), None where the input is None. Also the custom op's."""
    batch, d, L = u.shape
    n = A.shape[1]
    num_chunks = ckpt.shape[2]
    flags = {**_flags(D, z, delta_bias, delta_softplus), "BLOCK_L": block_l, "BLOCK_N": triton.next_power_of_2(n)}
    gout = torch.zeros_like(u) if grad_out is None else grad_out.contiguous()
    glast = None if grad_last is None else grad_last.float().contiguous()
    adj = torch.empty_like(ckpt)
    g = GradParts.allocate(u, delta, z, D, delta_bias, ckpt, n, grad_groups, GRAD_PROGRAMS)
    dummy = u
    with _device(u):
        _scan_bwd_carry_kernel[(d, batch)](
            delta, A, C, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
            gout, glast if glast is not None else dummy, adj, d, L, n, num_chunks, *C.stride(),
            HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"], HAS_GLAST=glast is not None,
            SOFTPLUS=flags["SOFTPLUS"], BLOCK_L=block_l, BLOCK_N=flags["BLOCK_N"], num_warps=NUM_WARPS,
        )
        _scan_bwd_grad_kernel[(num_chunks, g.groups, batch)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, gout, ckpt, adj,
            *g.kernel_outputs(), batch, d, L, n, num_chunks, g.per_group, *B.stride(), *C.stride(), **flags,
            num_warps=GRAD_NUM_WARPS,
        )
    return g.gradients(A, B, C, D, delta_bias)


def selective_scan_triton(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan by the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests).

    block_l: tokens per chunk (a power of two); grad_groups: channel groups of the gradient kernel (0: sized
    to fill the GPU). Returns out in u's dtype, and the last state in u's dtype when return_last_state.
    """
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan_triton: u, delta (b, d, L) and A (d, n) expected, got "
                         f"{tuple(u.shape)}, {tuple(delta.shape)}, {tuple(A.shape)}")
    if u.numel() * A.shape[1] >= 2**31:
        raise ValueError("selective_scan_triton: batch * d * L * n must stay below 2**31 (32-bit offsets)")

    def rows(x: Tensor | None) -> Tensor | None:  # (b, d, L) read as rows: contiguous along L, as mamba-ssm
        return None if x is None else x.contiguous()

    out, last_state = TritonScanFn.apply(
        rows(u), rows(delta), A.contiguous(), B, C, rows(D), rows(z), rows(delta_bias), delta_softplus,
        block_l, grad_groups,
    )
    return (out, last_state.to(u.dtype)) if return_last_state else out
