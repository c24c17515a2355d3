"""The scan as a torch.library custom op (evim3/ops/selective_scan_op.py): forward, last state and every gradient
against the float64 reference (F32_REL_TOL, as every scan), for both backends -- the fused C++ kernel (CPU tensors) and
the Triton kernels (on CPU tensors through TRITON_INTERPRET=1) -- torch.library.opcheck's checks of the
registration (schema, fake implementation, autograd, AOT dispatch), and torch.compile through the op without a
graph break. Tiny shapes: a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
from test_scan import F32_REL_TOL, rel_l2
from test_scan_triton import BLOCK, flagged_args, run, triton_scan  # noqa: F401 -- interpreted kernels loaded

from evim3.ops import selective_scan, selective_scan_ref
from evim3.ops.selective_scan_op import scan_fwd, selective_scan_op


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _op(backend: str):
    def scan(**kw):
        return selective_scan_op(**kw, backend=backend, block_l=BLOCK)
    return scan


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False), (True, False, True, False)],
                         ids=["all", "none", "z-bias"])
@pytest.mark.parametrize("last_state", [True, False], ids=["last", "out-only"])
def test_op_matches_the_reference(backend: str, flags: tuple, last_state: bool) -> None:
    args = flagged_args(21, *flags, seed=4, batch=2, d=2, n=4)
    y, h, grads = run(_op(backend), args, torch.float32, last_state)
    y_ref, h_ref, grads_ref = run(selective_scan_ref, args, torch.float64, last_state)
    assert y.dtype == torch.float32 and rel_l2(y, y_ref) <= F32_REL_TOL
    if last_state:
        assert rel_l2(h, h_ref) <= F32_REL_TOL
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        assert grads[name].shape == ref.shape and rel_l2(grads[name], ref) <= F32_REL_TOL, name


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend: str) -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch tests of torch.library.opcheck."""
    a = flagged_args(19, True, True, True, True, seed=2, batch=1, d=2, n=4)
    leaves = {k: v.float().requires_grad_(True) for k, v in a.items() if isinstance(v, torch.Tensor)}
    torch.library.opcheck(scan_fwd, (leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                     leaves["D"], leaves["z"], leaves["delta_bias"], True, BLOCK, backend))


def test_registry_name_and_compile_without_graph_break() -> None:
    """The scan "triton-op" runs the op (its cpu backend on CPU); torch.compile (aot_eager: no C++ toolchain
    needed) traces through it in one graph, with the same output and gradients as eager."""
    args = {k: v.float() if isinstance(v, torch.Tensor) else v
            for k, v in flagged_args(21, True, True, True, True, seed=6, batch=1, d=2, n=4).items()}
    eager = selective_scan(**args, impl="triton-op")
    assert rel_l2(eager, selective_scan_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                               for k, v in args.items()})) <= F32_REL_TOL

    def f(u, delta, B, C, z):
        return selective_scan(u * 1.0, delta, args["A"], B, C, args["D"], z * 1.0, args["delta_bias"], True,
                              impl="triton-op").square().sum()

    inputs = [args[k].clone().requires_grad_(True) for k in ("u", "delta", "B", "C", "z")]
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    loss = compiled(*inputs)
    loss.backward()
    reference = [x.detach().clone().requires_grad_(True) for x in inputs]
    f(*reference).backward()
    assert rel_l2(loss, f(*reference)) <= F32_REL_TOL
    for x, r in zip(inputs, reference):
        assert rel_l2(x.grad, r.grad) <= F32_REL_TOL


def test_mamba_unit_compiles_in_one_graph_with_the_op() -> None:
    """A Mamba unit running "triton-op" compiles with fullgraph=True (no graph break anywhere in the unit: what
    lets inductor fuse conv1d + SiLU, the projections' epilogues and the gating around the scan on a GPU); output
    and every parameter gradient as eager. aot_eager: the capture is what is checked here, not C++ codegen."""
    from evim3.modules.mamba import Mamba
    from evim3.ops import use_scan

    torch.manual_seed(0)
    unit = Mamba(8, d_state=4)
    x = torch.randn(2, 21, 8)
    with use_scan(unit, "triton-op"):
        eager = unit(x)
        eager.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in unit.named_parameters()}
        unit.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(unit, backend="aot_eager", fullgraph=True)(x)
        compiled.square().sum().backward()
    assert rel_l2(compiled, eager) <= F32_REL_TOL
    for k, p in unit.named_parameters():
        assert rel_l2(p.grad, grads[k]) <= F32_REL_TOL, k
