"""The selective scan as a torch.library custom op with its backward (issue 27): what lets ``torch.compile`` keep the
scan as one opaque call inside a compiled Mamba block and fuse the projections, conv1d + SiLU and LayerNorm
chains around it. Without it dynamo either graph-breaks at the Triton autograd Function or (the dispatcher's
choice while tracing) traces the chunked scan's many small ops.

Two ops, each with a fake (meta) implementation so the compiler knows the output shapes without running them:
    evim3::scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, block_l, backend) -> (out, last, ckpt)
    evim3::scan_bwd(..., ckpt, grad_out, grad_last, softplus, block_l, backend) -> (du, ddelta, dA, dB, dC, dD, dz, dbias)
joined by ``torch.library.register_autograd``. `backend` names the kernels: "triton" (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1) runs selective_scan_triton's kernels, "cpu" the fused C++ kernel (selective_scan_cpu's);
each backward starts from the states its forward saved per chunk of block_l tokens.
Absent inputs (D, z, delta_bias) get empty gradients from the op (a custom op returns tensors only), None outside.

Selectable as the scan "triton-op" (evim3.ops.use_scan / EVIM3_SCAN): backend "triton" for CUDA tensors, "cpu" for CPU
tensors. Checked against the float64 reference and by torch.library.opcheck in tests/test_scan_op.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("triton", "cpu")
# tokens per saved state: selective_scan_triton.BLOCK_L and selective_scan_cpu.CHUNK (not imported: each backend
# needs only its own kernels)
DEFAULT_BLOCK_L = {"triton": 128, "cpu": 64}
_EMPTY = (0,)


def _empty_like(x: Tensor) -> Tensor:
    return x.new_empty(_EMPTY)


def _state_dtype(u: Tensor, backend: str) -> torch.dtype:
    """The state's dtype: float32, except float64 inputs on the CPU kernel (which computes in their dtype)."""
    return torch.float64 if backend == "cpu" and u.dtype == torch.float64 else torch.float32


def _cpu_inputs(u, delta, A, B, C, D, z, delta_bias) -> list[Tensor | None]:
    """What the fused CPU kernel takes: one dtype, contiguous, B and C token-major (b, L, n)."""
    dtype = _state_dtype(u, "cpu")
    prepared = [None if x is None else x.to(dtype).contiguous() for x in (u, delta, A, B, C, D, z, delta_bias)]
    prepared[3], prepared[4] = (x.transpose(1, 2).contiguous() for x in prepared[3:5])
    return prepared


def _cpu_kernel():
    from evim3.ops.selective_scan_cpu import cpu_kernel

    kernel = cpu_kernel()
    if kernel is None:
        raise RuntimeError("the custom op's cpu backend needs the fused CPU scan, which is unavailable here")
    return kernel


@torch.library.custom_op("evim3::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, delta_softplus: bool, block_l: int, backend: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(out in u's dtype, last state, ckpt: the state entering each chunk of block_l tokens (b, d, K, n))."""
    if backend == "triton":
        from evim3.ops.selective_scan_triton import triton_forward

        out, last, ckpt = triton_forward(u.contiguous(), delta.contiguous(), A.contiguous(), B, C,
                                         None if D is None else D.contiguous(), None if z is None else z.contiguous(),
                                         None if delta_bias is None else delta_bias.contiguous(), delta_softplus,
                                         block_l, save_ckpt=True)
        return out, last, ckpt
    out, last, ckpt = _cpu_kernel().forward(*_cpu_inputs(u, delta, A, B, C, D, z, delta_bias), delta_softplus,
                                            block_l, True)
    return out.to(u.dtype), last, ckpt


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l, backend):
    batch, d, L = u.shape
    n = A.shape[1]
    state = _state_dtype(u, backend)
    ckpt = u.new_empty(batch, d, -(-L // block_l), n, dtype=state)
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(batch, d, n, dtype=state), ckpt


@torch.library.custom_op("evim3::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, ckpt: Tensor, grad_out: Tensor, grad_last: Tensor, delta_softplus: bool,
             block_l: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every input's gradient (empty for an absent D, z, delta_bias)."""
    if backend == "triton":
        from evim3.ops.selective_scan_triton import triton_backward

        grads = triton_backward(u.contiguous(), delta.contiguous(), A.contiguous(), B, C,
                                None if D is None else D.contiguous(), None if z is None else z.contiguous(),
                                None if delta_bias is None else delta_bias.contiguous(), ckpt, grad_out, grad_last,
                                delta_softplus, block_l, 0)
    else:
        prepared = _cpu_inputs(u, delta, A, B, C, D, z, delta_bias)
        du, ddelta, dA, dB, dC, dD, dbias, dz = _cpu_kernel().backward(
            *prepared, delta_softplus, ckpt, grad_out.to(prepared[0].dtype).contiguous(),
            grad_last.to(prepared[0].dtype), block_l, None)
        grads = (du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD if D is not None else None,
                 dz if z is not None else None, dbias if delta_bias is not None else None)
    # contiguous, in each input's dtype: what the fake implementation promises
    return tuple(_empty_like(u) if g is None else g.to(x.dtype).contiguous()
                 for g, x in zip(grads, (u, delta, A, B, C, D, z, delta_bias)))


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ckpt, grad_out, grad_last, delta_softplus, block_l, backend):
    def like(x: Tensor | None) -> Tensor:
        return u.new_empty(_EMPTY) if x is None else x.new_empty(x.shape)
    return tuple(like(x) for x in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.block_l, ctx.backend = delta_softplus, block_l, backend
    ctx.present = tuple(x is not None for x in (D, z, delta_bias))
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_out: Tensor | None, grad_last: Tensor | None, _grad_ckpt: Tensor | None) -> tuple:
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    grad_out = torch.zeros_like(u) if grad_out is None else grad_out
    state = ckpt.dtype
    grad_last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=state) if grad_last is None else grad_last
    grads = scan_bwd(u, delta, A, B, C, D, z, delta_bias, ckpt, grad_out.contiguous(), grad_last.to(state).contiguous(),
                     ctx.delta_softplus, ctx.block_l, ctx.backend)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    dD, dz, dbias = (g if present else None for g, present in zip((dD, dz, dbias), ctx.present))
    return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def default_backend(u: Tensor) -> str:
    """Triton's kernels for CUDA tensors; the fused C++ kernel for CPU tensors (one op signature everywhere)."""
    return "triton" if u.is_cuda else "cpu"


def unavailable(device_type: str) -> str | None:
    """Why the op cannot run tensors on `device_type` here (the registry's question), or None."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"Triton is not installed ({e})"
        return None
    if device_type == "cpu":
        from evim3.ops.selective_scan_cpu import cpu_kernel

        return None if cpu_kernel() is not None else "the fused CPU scan (the op's cpu backend) is unavailable"
    return f"no backend for {device_type} tensors"


def selective_scan_op(
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
    block_l: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan through the custom op (selective_scan_ref's signature); backend: see BACKENDS (default by device)."""
    backend = backend or default_backend(u)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    block_l = DEFAULT_BLOCK_L[backend] if block_l is None else block_l
    out, last, _ = scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), int(block_l), backend)
    return (out, last.to(u.dtype)) if return_last_state else out
