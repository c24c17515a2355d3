"""The Mamba-1 selective scan's definition: the sequential reference every implementation is checked against.

Every implementation beside it (selective_scan_chunked, _exportable, _cpu, _triton, and mamba-ssm's own)
shares mamba-ssm's ``selective_scan_fn`` signature and layout::

    u, delta, z: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)    D, delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: (batch, d, n)
    y_t     = <C_t, h_t> + D * u_t,   then y *= silu(z)

Returns y (batch, d, L) in u's dtype, and the last state h_L (batch, d, n) when ``return_last_state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discretize(
    u: Tensor, delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """u and the step sizes delta (bias added, softplus applied when asked) in `dtype`."""
    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The readout's skip (D * u) and gate (silu(z)), in `out_dtype`."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The definition, one token at a time, in float64. Slow and memory-hungry: for tests and benchmarks."""
    dtype = torch.float64
    u64, delta = discretize(u, delta, delta_bias, delta_softplus, dtype)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (b, d, L, n)
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u64)
    h = u64.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else u64.new_zeros(u.shape)
    out = finish(y, u64, D, z, u.dtype)
    return (out, h.to(u.dtype)) if return_last_state else out
