"""The selective scan for ONNX export: the chunked scan's three loops as ``torch.ops.higher_order.scan``, each
written as one ONNX Scan; Mamba's full form marks its inputs and output with the ``evim3::scan_boundary``
op, so that the exporter knows where each scan is. Same signature as selective_scan_ref (plus `chunk`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.ops.selective_scan_chunked import default_chunk
from evim3.runtime.fused_scan import SCAN_INPUTS, SCAN_OUTPUT


def selective_scan_exportable(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                              z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                              return_last_state: bool = False, chunk: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    """The two-level scan of selective_scan_chunked with its three loops as ``torch.ops.higher_order.scan``.

    The ONNX exporter turns each loop into one ONNX ``Scan`` whose body is a few elementwise ops, so the
    graph has the same handful of nodes per scan whatever the sequence length (unrolling the chunked
    form's loops costs ~sqrt(L) nodes per step kind). Inference only (no backward); eager calls compile
    the loop bodies with dynamo, so use it for tracing and export, not for speed.

    The state is laid out (batch, K, n, d), d innermost: every broadcast in the loop bodies then runs
    over contiguous spans of d, which ONNX Runtime's CPU kernels need to be fast.
    """
    from torch._higher_order_ops.scan import scan

    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_c, delta = u.to(dtype), delta.to(dtype)
    B, C = (x.to(dtype).transpose(1, 2) for x in (B, C))  # (b, L, n): Mamba's own layout, so no transposes
    A_nd = A.to(dtype).t()  # (n, d)
    D_col = None if D is None else D.to(dtype)[:, None]  # (d, 1)
    bias_col = None if delta_bias is None else delta_bias.to(dtype)[:, None]
    z = None if z is None else z.to(dtype)
    # Mamba's full form (all its inputs, no state out) is what the edge runtime's fused op computes: mark
    # its inputs and output, in the op's order, so the exporter can record where they are in the graph.
    boundary = None not in (D, z, delta_bias) and delta_softplus and not return_last_state
    if boundary:
        u_c, delta, A_nd, B, C, D_col, z, bias_col = (
            scan_boundary(x, role) for x, role in zip((u_c, delta, A_nd, B, C, D_col, z, bias_col), SCAN_INPUTS))
    if bias_col is not None:
        delta = delta + bias_col
    if delta_softplus:
        delta = _stable_softplus(delta)
    batch, d, seqlen = u.shape
    n = A_nd.shape[0]
    T = chunk or default_chunk(seqlen)
    K = (seqlen + T - 1) // T
    delta_t = _token_steps(delta.transpose(1, 2), T, K, row=True)  # (T, b, K, 1, d): token t of every chunk
    du_t = _token_steps((delta * u_c).transpose(1, 2), T, K, row=True)
    B_t = _token_steps(B, T, K, row=False)  # (T, b, K, n, 1)
    C_t = _token_steps(C, T, K, row=False)

    def advance(h: Tensor, step: tuple[Tensor, ...]) -> Tensor:
        """One token in every chunk at once: h = exp(delta A) h + delta u B (exponent <= 0)."""
        delta_s, du_s, B_s = step[:3]
        return (torch.exp(delta_s * A_nd) * h + du_s * B_s).contiguous()

    def zero_start(h: Tensor, step: tuple[Tensor, ...]) -> tuple[Tensor, list]:
        return advance(h, step), []

    # pass 1: every chunk from a zero state -> its end state (b, K, n, d)
    local_end, _ = scan(zero_start, u_c.new_zeros(batch, K, n, d), (delta_t, du_t, B_t))
    chunk_decay = torch.exp(delta_t.sum(0) * A_nd)  # (b, K, n, d), exponent <= 0

    def carry(h: Tensor, chunk_k: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        decay_k, local_k = chunk_k
        return (decay_k * h + local_k).contiguous(), h.clone()

    # carry: the state entering chunk k is the state leaving chunk k-1
    last_state, entering = scan(
        carry, u_c.new_zeros(batch, n, d), (chunk_decay.movedim(1, 0), local_end.movedim(1, 0))
    )
    entering = entering.movedim(0, 1).clone(memory_format=torch.contiguous_format)

    def read_out(h: Tensor, step: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        h = advance(h, step)
        return h, (h * step[3]).sum(2)

    # pass 2: rerun every chunk from its true entering state and read out y_t = <C_t, h_t>
    _, ys = scan(read_out, entering, (delta_t, du_t, B_t, C_t))  # (T, b, K, d)
    y = ys.permute(1, 2, 0, 3).reshape(batch, K * T, d)[:, :seqlen].transpose(1, 2)
    if D_col is not None:
        y = y + u_c * D_col
    if z is not None:
        y = y * F.silu(z)
    if boundary:
        y = scan_boundary(y, SCAN_OUTPUT)
    out = y.to(u.dtype)
    return (out, last_state.transpose(1, 2).to(u.dtype)) if return_last_state else out


@torch.library.custom_op("evim3::scan_boundary", mutates_args=())
def scan_boundary(x: Tensor, role: str) -> Tensor:
    """An identity marking one input or the output of a selective scan for export: export/onnx.py writes it
    as a node, records the name of the tensor it marks under `role` (runtime/fused_scan.py reads that to put
    its fused op in the scan's place) and removes it, so the exported graph is what it would be without."""
    return x.clone()


@scan_boundary.register_fake
def _(x: Tensor, role: str) -> Tensor:
    return torch.empty_like(x)


def _token_steps(x: Tensor, T: int, K: int, row: bool) -> Tensor:
    """(b, L, c) -> (T, b, K, 1, c) if row else (T, b, K, c, 1): zero-padded to K*T tokens (identity
    steps), scan axis first, and the channel axis c kept innermost through the move so that it copies
    contiguous rows."""
    batch, seqlen, c = x.shape
    if K * T > seqlen:
        x = torch.cat([x, x.new_zeros(batch, K * T - seqlen, c)], dim=1)
    x = x.reshape(batch, K, T, 1, c) if row else x.reshape(batch, K, T, c, 1)
    return x.permute(2, 0, 1, 3, 4)


def _stable_softplus(x: Tensor) -> Tensor:
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)): exact for every x, and in ONNX Runtime 2.4x faster
    than its Softplus kernel (plus the threshold Where that F.softplus exports with)."""
    return torch.relu(x) + torch.log1p(torch.exp(-x.abs()))
