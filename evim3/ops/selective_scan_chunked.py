"""The two-level ("blocked") selective scan in plain tensor ops: exact, stable, differentiable (its backward
is evim3.ops.scan_backward), and the form tracers and compilers see. Same signature as selective_scan_ref.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.ops.selective_scan_ref import discretize, finish


def default_chunk(seqlen: int) -> int:
    """Chunk length ~ sqrt(L): both Python loops (within and across chunks) then run ~sqrt(L) steps."""
    return max(1, math.ceil(math.sqrt(seqlen)))


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, chunk: int = 0) -> Tensor | tuple[Tensor, Tensor]:
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
    u_c, delta = discretize(u, delta, delta_bias, delta_softplus, dtype)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    T = chunk or default_chunk(u.shape[2])
    if _wants_custom_backward(u_c, delta, A, B, C):
        from evim3.ops.scan_backward import ChunkedScanFn

        y, last_state = ChunkedScanFn.apply(u_c, delta, A, B, C, T)
    else:
        y, last_state = chunked_scan_core(u_c, delta, A, B, C, T)
    out = finish(y, u_c, D, z, u.dtype)
    return (out, last_state.to(u.dtype)) if return_last_state else out


def tracing() -> bool:
    """Inside a tracer, exporter or compiler, which must see plain tensor ops, not custom kernels."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _wants_custom_backward(*tensors: Tensor) -> bool:
    """Use the autograd Function only in eager training; tracing/export sees the plain ops."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return not tracing()


def chunk_views(
    u: Tensor, delta: Tensor, B: Tensor, C: Tensor, T: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad L to K*T (delta = 0, u = 0: identity steps) and view as chunks: (b, d|n, K, T)."""
    batch, d, seqlen = u.shape
    n = B.shape[1]
    K = (seqlen + T - 1) // T  # not -(-L // T): the TorchScript tracer turns that floor division into truncation
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

    # pass 2: rerun each chunk from its true entering state and read out y, into one preallocated
    # buffer: a list of T small per-step outputs would interleave long-lived blocks with the per-step
    # (b, d, K, n) temporaries, and the CPU heap then grows by about one state per step (+0.8 GB of
    # peak RSS at L = 33,635; benchmarks/bench_scan.py).
    h, y = entering, u.new_empty(batch, d, K, T)
    for t in range(T):
        h = step_decay(delta_k, A, t) * h + step_drive(du, B_k, t)
        y[:, :, :, t] = torch.einsum("bdkn,bnk->bdk", h, C_k[:, :, :, t])
    return y.reshape(batch, d, K * T)[:, :, :seqlen], last_state, entering
