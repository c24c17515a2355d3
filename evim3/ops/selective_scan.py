"""The Mamba-1 selective scan: the sequential reference, the exportable chunked form, and a dispatcher.

All three share mamba-ssm's ``selective_scan_fn`` signature and layout::

    u, delta, z: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)    D, delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: (batch, d, n)
    y_t     = <C_t, h_t> + D * u_t,   then y *= silu(z)

Returns y (batch, d, L) in u's dtype, and the last state h_L (batch, d, n) when ``return_last_state``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _discretize(
    u: Tensor, delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(
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
    """The definition, one token at a time, in float64. Slow and memory-hungry: for tests and benchmarks."""
    dtype = torch.float64
    u64, delta = _discretize(u, delta, delta_bias, delta_softplus, dtype)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (b, d, L, n)
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u64)
    h = u64.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else u64.new_zeros(u.shape)
    out = _finish(y, u64, D, z, u.dtype)
    return (out, h.to(u.dtype)) if return_last_state else out


def default_chunk(seqlen: int) -> int:
    """Chunk length ~ sqrt(L): both Python loops (within and across chunks) then run ~sqrt(L) steps."""
    return max(1, math.ceil(math.sqrt(seqlen)))


def selective_scan_chunked(
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
    chunk: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Two-level ("blocked") scan: exact, stable, and built from a bounded number of plain tensor ops.

    The sequence is cut into K chunks of T tokens (T ~ sqrt(L)); every chunk is processed at once.
      pass 1: run each chunk from a zero state -> its end state, and its total decay exp(A * sum(delta))
      carry : a K-step loop turns those into the true state entering each chunk
      pass 2: rerun each chunk from its entering state and emit y
    Every exponent is delta * A <= 0 (A < 0, delta >= 0), so nothing overflows whatever dt is, and the
    largest temporary is (batch, d, K, n) -- never (batch, d, L, n). Computes in float32 (float64 inputs
    stay float64). When gradients are needed, a hand-written backward (evim3.ops.scan_backward) keeps
    training memory at O(batch * d * L) per layer instead of autograd's O(batch * d * L * n).
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_c, delta = _discretize(u, delta, delta_bias, delta_softplus, dtype)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    T = chunk or default_chunk(u.shape[2])
    if _wants_custom_backward(u_c, delta, A, B, C):
        from evim3.ops.scan_backward import ChunkedScanFn

        y, last_state = ChunkedScanFn.apply(u_c, delta, A, B, C, T)
    else:
        y, last_state = chunked_scan_core(u_c, delta, A, B, C, T)
    out = _finish(y, u_c, D, z, u.dtype)
    return (out, last_state.to(u.dtype)) if return_last_state else out


def _wants_custom_backward(*tensors: Tensor) -> bool:
    """Use the autograd Function only in eager training; tracing/export sees the plain ops."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


def chunk_views(
    u: Tensor, delta: Tensor, B: Tensor, C: Tensor, T: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad L to K*T (delta = 0, u = 0: identity steps) and view as chunks: (b, d|n, K, T)."""
    batch, d, seqlen = u.shape
    n = B.shape[1]
    K = -(-seqlen // T)
    pad = K * T - seqlen
    du = F.pad(delta * u, (0, pad)).view(batch, d, K, T)
    delta_k = F.pad(delta, (0, pad)).view(batch, d, K, T)
    B_k = F.pad(B, (0, pad)).view(batch, n, K, T)
    C_k = F.pad(C, (0, pad)).view(batch, n, K, T)
    return du, delta_k, B_k, C_k


def step_decay(delta_k: Tensor, A: Tensor, t: int) -> Tensor:
    """exp(delta * A) of token t of every chunk: (b, d, K, n), exponent <= 0."""
    return torch.exp(delta_k[:, :, :, t, None] * A[:, None, :])


def step_drive(du: Tensor, B_k: Tensor, t: int) -> Tensor:
    """delta * u * B of token t of every chunk: (b, d, K, n)."""
    return du[:, :, :, t, None] * B_k[:, None, :, :, t].transpose(-1, -2)


def carry_across_chunks(local: Tensor, chunk_decay: Tensor, last_in: Tensor, reverse: bool = False) -> Tensor:
    """The K-step loop: turn per-chunk results from a zero start into true entering values.

    Forward: entering_k = decay_{k-1} * entering_{k-1} + local_{k-1}, entering_0 = last_in.
    Reverse (for the adjoint): entering_k = decay_{k+1} * entering_{k+1} + local_{k+1}, entering_{K-1} = last_in.
    """
    K = local.shape[2]
    ks = range(K - 1, 0, -1) if reverse else range(K - 1)
    entering = {ks.start: last_in}
    for k in ks:
        nxt = k - 1 if reverse else k + 1
        entering[nxt] = chunk_decay[:, :, k] * entering[k] + local[:, :, k]
    return torch.stack([entering[k] for k in range(K)], dim=2)


def chunked_scan_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """y_t = <C_t, h_t> (no D, no gate) and h_L, for discretised float inputs. See selective_scan_chunked."""
    y, last_state, _ = chunked_scan_states(u, delta, A, B, C, T)
    return y, last_state


def chunked_scan_states(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, T: int
) -> tuple[Tensor, Tensor, Tensor]:
    """chunked_scan_core plus the state entering every chunk (b, d, K, n), which the backward reuses."""
    batch, d, seqlen = u.shape
    du, delta_k, B_k, C_k = chunk_views(u, delta, B, C, T)
    K = du.shape[2]

    # pass 1: each chunk from a zero state
    h = u.new_zeros(batch, d, K, A.shape[1])
    for t in range(T):
        h = step_decay(delta_k, A, t) * h + step_drive(du, B_k, t)
    chunk_decay = torch.exp(delta_k.sum(-1)[..., None] * A[:, None, :])  # (b, d, K, n)

    # carry: the state entering chunk k is the state leaving chunk k-1
    entering = carry_across_chunks(h, chunk_decay, torch.zeros_like(h[:, :, 0]))
    last_state = chunk_decay[:, :, K - 1] * entering[:, :, K - 1] + h[:, :, K - 1]

    # pass 2: rerun each chunk from its true entering state and read out y
    h, ys = entering, []
    for t in range(T):
        h = step_decay(delta_k, A, t) * h + step_drive(du, B_k, t)
        ys.append(torch.einsum("bdkn,bnk->bdk", h, C_k[:, :, :, t]))
    y = torch.stack(ys, dim=-1).reshape(batch, d, K * T)[:, :, :seqlen]
    return y, last_state, entering


def _fused_scan():
    """mamba-ssm's CUDA kernel, or None when the [cuda] extra is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return selective_scan_fn


def fused_available() -> bool:
    return _fused_scan() is not None and torch.cuda.is_available()


def selective_scan(
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
    """mamba-ssm's fused kernel for CUDA tensors when it is installed, else the chunked scan."""
    fused = _fused_scan() if u.is_cuda else None
    scan = fused if fused is not None else selective_scan_chunked
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
