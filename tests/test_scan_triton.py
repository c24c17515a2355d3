"""The Triton selective scan (evim3/ops/selective_scan_triton.py) against the sequential float64 reference, on CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1): the kernels' own code, run by numpy.

Tolerances: float32 inputs vs the float64 reference <= F32_REL_TOL (1e-5) relative L2 for the output, the last
state and every gradient (as the chunked and fused CPU scans; measured ~1e-7 to 1e-6); bfloat16 inputs (float32
A, D, delta_bias, as under autocast) vs the reference on the same rounded inputs <= 1e-2 (the output and the
gradients are rounded to bfloat16, 2**-9 relative each). Shapes are tiny because the interpreter runs every
scan combine as a Python call; L is never a multiple of the chunk (BLOCK = 16 tokens) unless on purpose.
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from ci import require
from test_scan import F32_REL_TOL, inverse_softplus, rel_l2, scan_args

from evim3.ops import selective_scan, selective_scan_ref


def _interpreted_module(name: str = "evim3.ops.selective_scan_triton"):
    """The kernels module with its kernels defined under TRITON_INTERPRET=1 (triton.jit reads the variable when
    it decorates, i.e. at import). The variable is restored afterwards and set again around each test of this
    module (Triton reads it at launch too): the rest of the session is unaffected."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(name)
        return module if module.interpreted() else importlib.reload(module)  # imported earlier without it
    except ImportError:
        return None
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


triton_scan = _interpreted_module()
require(None if triton_scan is not None else "Triton is not installed (the [dev] extra pins it on Linux)")
# issue 27's prepass variant: imported after the kernels module above, so it calls the interpreted helpers
triton_pre = _interpreted_module("evim3.ops.selective_scan_triton_pre")

BLOCK = 16


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BF16_REL_TOL = 1e-2


def flagged_args(seqlen: int, z: bool, D: bool, bias: bool, softplus: bool, seed: int = 0, **kw) -> dict:
    """scan_args whose discretised step softplus?(delta + bias) is the fixture's heavy-tailed dt, for any flags."""
    args = scan_args(seqlen=seqlen, z=z, D=D, delta_bias=False, seed=seed, dtype=torch.float64, **kw)
    dt = args["delta"]
    b = 0.5 * torch.randn(dt.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raw = inverse_softplus(dt) if softplus else dt
    args.update(delta=raw - b[:, None] if bias else raw, delta_bias=b if bias else None, delta_softplus=softplus)
    return args


def run(scan, args: dict, dtype: torch.dtype, last_state: bool, **kw):
    """Output, last state and the gradient of every tensor input of sum(w_y * y) + sum(w_h * h)."""
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in args.items() if isinstance(v, torch.Tensor)}
    result = scan(**{**args, **leaves}, return_last_state=last_state, **kw)
    y, h = result if last_state else (result, None)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
    if h is not None:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)).sum()
    loss.backward()
    return y, h, {k: v.grad for k, v in leaves.items()}


def close(x: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Relative L2 error within tol; exactly zero where the reference is (dA at L = 1: no previous state)."""
    return x.shape == ref.shape and (rel_l2(x, ref) <= tol if ref.abs().max() > 0 else not x.abs().max() > 0)


def assert_matches_reference(args: dict, last_state: bool = True, tol: float = F32_REL_TOL, scan=None, **kw) -> None:
    scan = scan or triton_scan.selective_scan_triton
    y, h, grads = run(scan, args, torch.float32, last_state, block_l=BLOCK, **kw)
    y_ref, h_ref, grads_ref = run(selective_scan_ref, args, torch.float64, last_state)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert close(y, y_ref, tol)
    if last_state:
        assert close(h, h_ref, tol)
    for name, ref in grads_ref.items():
        assert close(grads[name], ref, tol), name


FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("z,D,bias,softplus,last_state", FLAGS, ids=lambda v: "T" if v else "F")
def test_every_flag_combination(z: bool, D: bool, bias: bool, softplus: bool, last_state: bool) -> None:
    """Forward, last state and every gradient; L = 21 over two chunks, the second partly past L."""
    seed = sum(flag << i for i, flag in enumerate((z, D, bias, softplus, last_state)))
    assert_matches_reference(flagged_args(21, z, D, bias, softplus, seed=seed, batch=2, d=2, n=4), last_state)


@pytest.mark.parametrize("seqlen", [1, BLOCK, 2 * BLOCK + 3])
def test_lengths_around_the_chunk(seqlen: int) -> None:
    assert_matches_reference(flagged_args(seqlen, True, True, True, True, seed=seqlen, batch=2, d=2, n=3))


@pytest.mark.parametrize("max_step", [1e-6, 1e3], ids=["tiny-dt", "huge-dt"])
def test_tiny_and_huge_steps(max_step: float) -> None:
    """Per-step |delta A| up to 1e-6 (no decay: the state integrates) and up to 1e3 (exp underflows to 0). delta is
    given as is (no bias): a float32 delta - bias rounds a 1e-7 step away before the kernel sees it."""
    assert_matches_reference(flagged_args(37, True, True, False, False, batch=1, d=2, n=4, max_step=max_step))


def test_channel_groups_of_the_gradient_kernel() -> None:
    """Uneven groups of channels (2 + 1): dB, dC summed over a group in registers, then over groups."""
    assert_matches_reference(flagged_args(21, True, True, True, True, seed=5, batch=2, d=3, n=4), grad_groups=2)


def test_bfloat16_inputs() -> None:
    """As under autocast: u, delta, B, C, z in bfloat16; A, D, delta_bias float32. Outputs and gradients come
    back in each input's dtype; the state is float32 inside."""
    args = flagged_args(37, True, True, True, True, seed=9, batch=2, d=2, n=4)
    low = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v.float() if isinstance(v, torch.Tensor)
           else v for k, v in args.items()}
    results = []
    for scan, inputs in ((triton_scan.selective_scan_triton, low),
                         (selective_scan_ref, {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in low.items()})):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        kw = {"block_l": BLOCK} if scan is not selective_scan_ref else {}
        y, h = scan(**{**inputs, **leaves}, return_last_state=True, **kw)
        (y.double().sum() + h.double().sum()).backward()
        results.append((y, h, leaves))
    (y, h, leaves), (y_ref, h_ref, leaves_ref) = results
    assert y.dtype == h.dtype == torch.bfloat16
    assert rel_l2(y, y_ref) <= BF16_REL_TOL and rel_l2(h, h_ref) <= BF16_REL_TOL
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, name
        assert rel_l2(leaf.grad, leaves_ref[name].grad) <= BF16_REL_TOL, name


def test_gradients_are_deterministic_and_no_state_tensor_is_saved() -> None:
    """No atomics: two backward passes give bit-identical gradients. The forward saves the state entering each
    chunk (b, d, K, n), never one per token (b, d, L, n)."""
    args = flagged_args(21, True, True, True, True, seed=3, batch=2, d=3, n=4)
    first = run(triton_scan.selective_scan_triton, args, torch.float32, True, block_l=BLOCK)[2]
    second = run(triton_scan.selective_scan_triton, args, torch.float32, True, block_l=BLOCK)[2]
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name
    leaves = {k: v.float().requires_grad_(True) for k, v in args.items() if isinstance(v, torch.Tensor)}
    y = triton_scan.selective_scan_triton(**{**args, **leaves}, block_l=BLOCK)
    largest = max(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    assert largest < 2 * 3 * 21 * 4  # the (b, d, L, n) count


def test_dispatcher_runs_triton_when_forced(monkeypatch) -> None:
    args = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in
            flagged_args(21, True, True, True, True, batch=1, d=2, n=4).items()}
    monkeypatch.setenv("EVIM3_SCAN", "triton")
    y = selective_scan(**args)
    assert torch.equal(y, triton_scan.selective_scan_triton(**args))  # the same kernels ran
    assert not torch.equal(y, selective_scan_ref(**args).float())


def test_softplus_matches_torch_near_the_threshold_and_far_below() -> None:
    """The kernels' softplus (threshold 20, log1p accurate for tiny e^x) through a one-token scan: y = dt u."""
    x = torch.tensor([-60.0, -30.0, -17.0, -1e-3, 0.0, 3.0, 19.9, 20.1, 40.0])
    ones = torch.ones(1, x.numel(), 1)
    y = triton_scan.selective_scan_triton(ones, x.view(1, -1, 1), -torch.ones(x.numel(), 1), torch.ones(1, 1, 1),
                                          torch.ones(1, 1, 1), delta_softplus=True, block_l=BLOCK)
    torch.testing.assert_close(y.flatten(), F.softplus(x.double()).float(), rtol=1e-6, atol=0)


def test_mamba_block_through_the_triton_scan(monkeypatch) -> None:
    """The Mamba block with EVIM3_SCAN=triton hands the scan what a model does: B, C as strided views of
    x_proj's output, u, delta, z not contiguous along L. Output and every parameter gradient as with the chunked
    scan (float32, <= F32_REL_TOL relative L2)."""
    from evim3.modules.mamba import Mamba

    torch.manual_seed(0)
    block = Mamba(4, d_state=4)  # d_inner 8
    x = torch.randn(2, 21, 4)
    weight = torch.randn(2, 21, 4)
    results = []
    for name in ("chunked", "triton"):
        monkeypatch.setenv("EVIM3_SCAN", name)
        block.zero_grad()
        y = block(x)
        (y * weight).sum().backward()
        results.append((y.detach(), {k: p.grad.clone() for k, p in block.named_parameters()}))
    (y_chunked, grads_chunked), (y_triton, grads_triton) = results
    assert rel_l2(y_triton, y_chunked) <= F32_REL_TOL
    for k, grad in grads_chunked.items():
        assert rel_l2(grads_triton[k], grad) <= F32_REL_TOL, k


# The prepass variant (evim3/ops/selective_scan_triton_pre.py), plain loops and pipelined (stages 2): the same
# tolerances as the current kernels against the float64 reference -- outputs, last state, every gradient.
STAGES = (1, 2)


def _pre(stages: int):
    def scan(**kw):
        return triton_pre.selective_scan_triton_pre(**kw, stages=stages)
    return scan


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("z,D,bias,softplus,last_state",
                         [(True, True, True, True, True), (False, False, False, False, False),
                          (True, False, True, False, True), (False, True, False, True, False)],
                         ids=lambda v: "T" if v else "F")
def test_prepass_variant_flags(stages: int, z: bool, D: bool, bias: bool, softplus: bool, last_state: bool) -> None:
    seed = sum(flag << i for i, flag in enumerate((z, D, bias, softplus, last_state)))
    assert_matches_reference(flagged_args(21, z, D, bias, softplus, seed=seed, batch=2, d=2, n=4), last_state,
                             scan=_pre(stages))


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("seqlen", [1, 2 * BLOCK + 3])
def test_prepass_variant_lengths_and_groups(stages: int, seqlen: int) -> None:
    """L = 1 (no previous state), three chunks with a ragged tail; uneven channel groups (2 + 1)."""
    assert_matches_reference(flagged_args(seqlen, True, True, True, True, seed=seqlen, batch=2, d=3, n=3),
                             scan=_pre(stages), grad_groups=2)


@pytest.mark.parametrize("max_step", [1e-6, 1e3], ids=["tiny-dt", "huge-dt"])
def test_prepass_variant_tiny_and_huge_steps(max_step: float) -> None:
    assert_matches_reference(flagged_args(37, True, True, False, False, batch=1, d=2, n=4, max_step=max_step),
                             scan=_pre(2))


def test_prepass_variant_bfloat16_and_strided_B_C() -> None:
    """bf16 activations (float32 A, D, delta_bias) with B, C handed as the model does, (b, n, L) views of an
    n-contiguous (b, L, n) tensor: within BF16_REL_TOL of float64 on the same rounded inputs; gradients come
    back in each input's dtype and B, C's gradients in their (view's) shape."""
    args = flagged_args(37, True, True, True, True, seed=9, batch=2, d=2, n=4)
    low = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v.float() if isinstance(v, torch.Tensor)
           else v for k, v in args.items()}
    results = []
    for scan in (_pre(2), selective_scan_ref):
        inputs = low if scan is not selective_scan_ref else {k: v.double() if isinstance(v, torch.Tensor) else v
                                                              for k, v in low.items()}
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        call = dict(leaves)
        for name in ("B", "C"):  # n-contiguous views, as x_proj's output transposed
            call[name] = leaves[name].transpose(1, 2).contiguous().transpose(1, 2)
        kw = {"block_l": BLOCK} if scan is not selective_scan_ref else {}
        y, h = scan(**{**inputs, **call}, return_last_state=True, **kw)
        (y.double().sum() + h.double().sum()).backward()
        results.append((y, h, leaves))
    (y, h, leaves), (y_ref, h_ref, leaves_ref) = results
    assert y.dtype == h.dtype == torch.bfloat16
    assert rel_l2(y, y_ref) <= BF16_REL_TOL and rel_l2(h, h_ref) <= BF16_REL_TOL
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        assert rel_l2(leaf.grad, leaves_ref[name].grad) <= BF16_REL_TOL, name


@pytest.mark.parametrize("name", ["triton-pre", "triton-pre-s2"])
def test_registry_runs_the_variants_by_name(name: str) -> None:
    """EVIM3_SCAN / use_scan select the variants by name; the same kernels ran (bit-identical output)."""
    args = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in
            flagged_args(21, True, True, True, True, batch=1, d=2, n=4).items()}
    y = selective_scan(**args, impl=name)
    assert torch.equal(y, _pre(2 if name.endswith("s2") else 1)(**args))
    assert rel_l2(y, selective_scan_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                           for k, v in args.items()})) <= F32_REL_TOL


@pytest.mark.parametrize("programs,warps", [(1, 8), (10**6, 4)])
def test_prepass_variant_gradient_launches(programs: int, warps: int) -> None:
    """The launch options scripts/gpu_check.py sweeps: one channel group (programs 1) or one group per channel
    (programs 10**6), and 4 warps: the same gradients within the tolerances."""
    def scan(**kw):
        return triton_pre.selective_scan_triton_pre(**kw, stages=2, grad_programs=programs, grad_warps=warps)
    assert_matches_reference(flagged_args(2 * BLOCK + 3, True, True, True, True, seed=11, batch=2, d=3, n=4),
                             scan=scan)
