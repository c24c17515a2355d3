"""Hand-written backward of the chunked selective scan.

Autograd through the chunked scan keeps every step's (b, d, K, n) temporaries alive until backward:
(b, d, L, n) per layer, for all layers at once -- gigabytes for a 36-layer model. This Function saves
only the inputs and the (b, d, K, n) chunk-entering states; its backward recomputes one layer's states
transiently and runs the adjoint recurrence with the same two-level structure as the forward:

    g_t = c_t + a_{t+1} g_{t+1},   c_t = gy_t * C_t,   a_t = exp(delta_t A)      (reverse in time)
    dA += g_t h_{t-1} a_t delta_t,  d(delta_t) = <g_t h_{t-1} a_t, A> + u_t <g_t, B_t>,
    du_t = delta_t <g_t, B_t>,      dB_t = sum_d g_t delta_t u_t,   dC_t = sum_d gy_t h_t

Checked against autograd through the reference scan by gradcheck in float64 (tests/test_scan.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.ops.selective_scan_chunked import (
    carry_across_chunks,
    chunk_views,
    chunked_scan_states,
    step_decay,
    step_drive,
)


class ChunkedScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, T: int):
        y, last_state, entering = chunked_scan_states(u, delta, A, B, C, T)
        ctx.save_for_backward(u, delta, A, B, C, entering)
        ctx.T = T
        return y, last_state

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_last: Tensor | None):
        u, delta, A, B, C, entering = ctx.saved_tensors
        T = ctx.T
        batch, _, seqlen = u.shape
        du, delta_k, B_k, C_k = chunk_views(u, delta, B, C, T)
        u_k = F.pad(u, (0, du.shape[2] * T - seqlen)).view_as(du)
        K = du.shape[2]
        gy = torch.zeros_like(u) if grad_y is None else grad_y
        gy_k = F.pad(gy, (0, K * T - seqlen)).view_as(du)

        # Recompute the states h_t of every chunk (transient: one layer at a time).
        states, h = [], entering
        for t in range(T):
            h = step_decay(delta_k, A, t) * h + step_drive(du, B_k, t)
            states.append(h)

        def readout_grad(t: int) -> Tensor:  # c_t = gy_t * C_t: (b, d, K, n)
            return gy_k[:, :, :, t, None] * C_k[:, None, :, :, t].transpose(-1, -2)

        # Adjoint, pass 1: each chunk from a zero adjoint at its end; r = a_t g_t flows to token t-1.
        r = torch.zeros_like(h)
        for t in reversed(range(T)):
            r = step_decay(delta_k, A, t) * (readout_grad(t) + r)
        chunk_decay = torch.exp(delta_k.sum(-1)[..., None] * A[:, None, :])
        last_in = torch.zeros_like(h[:, :, 0]) if grad_last is None else grad_last
        r = carry_across_chunks(r, chunk_decay, last_in, reverse=True)

        # Adjoint, pass 2: the true adjoint, and every gradient from it.
        g_delta, g_u, g_B, g_C = [], [], [], []
        g_A = torch.zeros_like(A)
        for t in reversed(range(T)):
            g = readout_grad(t) + r
            decay = step_decay(delta_k, A, t)
            h_prev = states[t - 1] if t > 0 else entering
            g_decay = g * h_prev * decay  # dL/d(delta_t A), elementwise
            B_t = B_k[:, None, :, :, t].transpose(-1, -2)  # (b, 1, K, n)
            gB_dot = (g * B_t).sum(-1)  # <g_t, B_t>: (b, d, K)
            delta_t, u_t = delta_k[:, :, :, t], u_k[:, :, :, t]
            g_delta.append((g_decay * A[:, None, :]).sum(-1) + gB_dot * u_t)
            g_u.append(gB_dot * delta_t)
            g_B.append((g * du[:, :, :, t, None]).sum(1))  # (b, K, n)
            g_C.append((gy_k[:, :, :, t, None] * states[t]).sum(1))
            g_A += (g_decay * delta_t[..., None]).sum((0, 2))
            r = decay * g

        def assemble(grads: list[Tensor], channel_last: bool) -> Tensor:
            x = torch.stack(grads[::-1], dim=-1)  # (b, d, K, T) or (b, K, n, T)
            if channel_last:
                x = x.permute(0, 2, 1, 3)  # (b, n, K, T)
            return x.reshape(batch, x.shape[1], K * T)[:, :, :seqlen]

        return (
            assemble(g_u, False), assemble(g_delta, False), g_A,
            assemble(g_B, True), assemble(g_C, True), None,
        )
