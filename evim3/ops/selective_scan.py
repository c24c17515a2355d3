"""The Mamba-1 selective scan: the sequential reference, the exportable chunked form, and a dispatcher.

All three share mamba-ssm's ``selective_scan_fn`` signature and layout::

    u, delta, z: (batch, d, L)    A: (d, n)    B, C: (batch, n, L)    D, delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: (batch, d, n)
    y_t     = <C_t, h_t> + D * u_t,   then y *= silu(z)

Returns y (batch, d, L) in u's dtype, and the last state h_L (batch, d, n) when ``return_last_state``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.runtime.fused_scan import SCAN_INPUTS, SCAN_OUTPUT


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


def _tracing() -> bool:
    """Inside a tracer, exporter or compiler, which must see plain tensor ops, not custom kernels."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _wants_custom_backward(*tensors: Tensor) -> bool:
    """Use the autograd Function only in eager training; tracing/export sees the plain ops."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return not _tracing()


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


def selective_scan_exportable(
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


_exportable_active = False


@contextlib.contextmanager
def exportable_scan() -> Iterator[None]:
    """Inside this block the dispatcher ``selective_scan`` runs ``selective_scan_exportable``.

    ``evim3 export`` traces the model inside it, so the ONNX graph gets Scan loops whatever device the
    model would otherwise pick (fused CUDA kernel, or the chunked scan with Python loops). Not
    thread-safe: a module-level switch, which is what torch.export's tracer can see.
    """
    global _exportable_active
    previous, _exportable_active = _exportable_active, True
    try:
        yield
    finally:
        _exportable_active = previous


SCAN_ENV = "EVIM3_SCAN"
SCAN_NAMES = ("mamba", "triton", "chunked", "cpu")
_AUTO_ORDER = {"cuda": ("mamba", "triton"), "cpu": ("cpu",)}  # tried in turn; the chunked scan runs anywhere


@functools.cache
def _fused_scan():
    """mamba-ssm's CUDA kernel, or None when the [cuda] extra is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 -- ImportError, or a broken CUDA build raising at import
        return None
    return selective_scan_fn


def fused_available() -> bool:
    return _fused_scan() is not None and torch.cuda.is_available()


def forced_scan() -> str | None:
    """The scan EVIM3_SCAN names (for benchmarks and bug reports), or None when it is not set."""
    name = os.environ.get(SCAN_ENV, "").strip().lower()
    if not name:
        return None
    if name not in SCAN_NAMES:
        raise ValueError(f"{SCAN_ENV}={name!r} is not a scan; choose one of {', '.join(SCAN_NAMES)}")
    return name


def scan_unavailable(name: str, device_type: str) -> str | None:
    """Why scan `name` cannot run tensors on `device_type` here, or None when it can."""
    if name == "chunked":
        return None
    if name == "mamba":
        if device_type != "cuda":
            return "mamba-ssm's kernel runs CUDA tensors only"
        return None if _fused_scan() is not None else "mamba-ssm is not installed (the [cuda] extra)"
    if name == "triton":
        try:
            from evim3.ops import selective_scan_triton as triton_scan
        except ImportError as e:
            return f"Triton is not installed ({e})"
        if device_type == "cuda" or (device_type == "cpu" and triton_scan.interpreted()):
            return None
        return "Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"
    from evim3.ops.selective_scan_cpu import DISABLE_ENV, cpu_kernel

    if device_type != "cpu":
        return "the fused C++ kernel runs CPU tensors only"
    return None if cpu_kernel() is not None else f"the fused C++ kernel could not be built, or {DISABLE_ENV}=0"


def scan_name(device_type: str) -> str:
    """The scan the dispatcher runs for tensors on `device_type`: the one EVIM3_SCAN forces (an error when it
    cannot run there), else on CUDA mamba-ssm, then Triton; on CPU the fused C++ kernel; else the chunked scan."""
    forced = forced_scan()
    if forced is not None:
        why = scan_unavailable(forced, device_type)
        if why is not None:
            raise ValueError(f"{SCAN_ENV}={forced} cannot run {device_type} tensors: {why}")
        return forced
    order = _AUTO_ORDER.get(device_type, ())
    return next((name for name in order if scan_unavailable(name, device_type) is None), "chunked")


def scan_choice(device_type: str) -> tuple[str, list[str]]:
    """(the scan for tensors on `device_type`, why each scan tried before it was passed over) -- for `evim3
    info`. Raises as scan_name does when EVIM3_SCAN forces one that cannot run there."""
    name = scan_name(device_type)
    if forced_scan() is not None:
        return name, [f"forced by {SCAN_ENV}"]
    order = _AUTO_ORDER.get(device_type, ())
    passed = order[: order.index(name)] if name in order else order
    return name, [f"not {other}: {scan_unavailable(other, device_type)}" for other in passed]


def _scan_function(name: str):
    if name == "mamba":
        return _fused_scan()
    if name == "triton":
        from evim3.ops.selective_scan_triton import selective_scan_triton

        return selective_scan_triton
    if name == "cpu":
        from evim3.ops.selective_scan_cpu import selective_scan_cpu

        return selective_scan_cpu
    return selective_scan_chunked


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
    """The scan ``scan_name`` picks for u's device; inside a tracer or compiler the chunked scan (plain tensor
    ops), and inside ``exportable_scan()`` always the exportable form."""
    if _exportable_active:
        return selective_scan_exportable(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    scan = selective_scan_chunked if _tracing() else _scan_function(scan_name(u.device.type))
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
