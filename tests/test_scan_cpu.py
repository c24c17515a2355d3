"""The fused C++ CPU scan (evim3/ops/csrc/selective_scan_cpu.cpp) against the sequential float64 reference.

Tolerances: float64 forward and gradients vs the reference (autograd through it) <= 1e-10 absolute, relative
to the largest value where that exceeds 1; float32 vs the float64 reference <= 1e-5 relative L2 (as the
chunked scan; the kernel's polynomial exp is good to ~2e-7). Inputs are the heavy-tailed ones of
test_scan.py (per-step |delta * A| up to 70), over lengths below, at and across the kernel's checkpoint
interval.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from ci import require
from test_scan import F32_REL_TOL, F64_ABS_TOL, rel_l2, scan_args

import evim3.ops.selective_scan_cpu as scan_cpu
from evim3.ops import selective_scan, selective_scan_ref
from evim3.ops.selective_scan_cpu import CHUNK, selective_scan_cpu

require(None if scan_cpu.cpu_kernel() is not None else "the fused CPU scan did not build here")

LENGTHS = (1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("seqlen", LENGTHS)
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias", "plain"])
def test_forward_matches_reference_float64(seqlen: int, full: bool) -> None:
    args = scan_args(seqlen=seqlen, dtype=torch.float64, z=full, D=full, delta_bias=full, seed=seqlen)
    y, h = selective_scan_cpu(**args, return_last_state=True)
    y_ref, h_ref = selective_scan_ref(**args, return_last_state=True)
    assert y.dtype == torch.float64 and y.shape == y_ref.shape and h.shape == h_ref.shape
    assert (y - y_ref).abs().max().item() <= F64_ABS_TOL * max(1.0, y_ref.abs().max().item())
    assert (h - h_ref).abs().max().item() <= F64_ABS_TOL * max(1.0, h_ref.abs().max().item())


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_gradients_match_reference_float64(seqlen: int) -> None:
    """Every input's gradient, through y and the last state, against autograd through the reference."""
    args = scan_args(batch=3, d=5, n=4, seqlen=seqlen, dtype=torch.float64, seed=100 + seqlen)
    g = torch.Generator().manual_seed(seqlen)
    weight_y = torch.randn(3, 5, seqlen, generator=g, dtype=torch.float64)
    weight_h = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    grads = []
    for scan in (selective_scan_cpu, selective_scan_ref):
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if isinstance(v, torch.Tensor)}
        y, h = scan(**{**args, **leaves}, return_last_state=True)
        ((y * weight_y).sum() + (h * weight_h).sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    got, ref = grads
    for name in NAMES:
        tol = F64_ABS_TOL * max(1.0, ref[name].abs().max().item())
        assert (got[name] - ref[name]).abs().max().item() <= tol, name


def test_gradcheck_float64() -> None:
    args = scan_args(batch=2, d=3, n=2, seqlen=CHUNK + 5, dtype=torch.float64, max_step=5.0)
    leaves = [args[k].requires_grad_(True) for k in ("u", "delta", "A", "B", "C")]

    def scan(u, delta, A, B, C):
        return selective_scan_cpu(u, delta, A, B, C, delta_bias=args["delta_bias"], delta_softplus=True,
                                  return_last_state=True)

    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("seqlen", [CHUNK + 1, 500])
def test_float32_matches_reference(seqlen: int) -> None:
    args = scan_args(batch=2, d=8, n=16, seqlen=seqlen, seed=7)
    ref = selective_scan_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    y = selective_scan_cpu(**args)
    assert y.dtype == torch.float32 and rel_l2(y, ref) <= F32_REL_TOL


def test_float32_gradients_match_reference() -> None:
    """The float32-only paths (polynomial softplus and sigmoid, vectorised gate): every gradient against
    the float64 reference within F32_REL_TOL (1e-5) relative L2; measured 0.8e-7 to 2.4e-7."""
    args = scan_args(batch=2, d=8, n=16, seqlen=2 * CHUNK + 9, seed=11)
    weight = torch.randn(2, 8, 2 * CHUNK + 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for scan, dtype in ((selective_scan_cpu, torch.float32), (selective_scan_ref, torch.float64)):
        leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in args.items() if isinstance(v, torch.Tensor)}
        (scan(**{**args, **leaves}) * weight.to(dtype)).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in NAMES:
        assert rel_l2(grads[0][name], grads[1][name]) <= F32_REL_TOL, name


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_gradients_do_not_depend_on_the_thread_count() -> None:
    """Per-thread accumulators for dA, dB, dC are summed at the end: 1 and 2 threads agree to rounding."""
    args = scan_args(batch=2, d=16, n=4, seqlen=2 * CHUNK + 3, dtype=torch.float64, seed=3)
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = {k: args[k].clone().requires_grad_(True) for k in ("A", "B", "C")}
            selective_scan_cpu(**{**args, **leaves}).sum().backward()
            results.append([leaves[k].grad for k in ("A", "B", "C")])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


def test_dispatcher_runs_the_fused_kernel_on_cpu() -> None:
    args = scan_args(seqlen=70)
    assert torch.equal(selective_scan(**args), selective_scan_cpu(**args))  # bit-identical: the same code ran


def test_failed_build_warns_once_and_falls_back(monkeypatch) -> None:
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    scan_cpu.cpu_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required"):
            assert scan_cpu.cpu_kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # cached: no second warning, no second attempt
            y = selective_scan(**scan_args(seqlen=10))
        assert torch.isfinite(y).all()
    finally:
        scan_cpu.cpu_kernel.cache_clear()


def test_switched_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv(scan_cpu.DISABLE_ENV, "0")
    scan_cpu.cpu_kernel.cache_clear()
    try:
        assert scan_cpu.cpu_kernel() is None
        with pytest.raises(RuntimeError, match="not available"):
            selective_scan_cpu(**scan_args(seqlen=4))
    finally:
        monkeypatch.delenv(scan_cpu.DISABLE_ENV)
        scan_cpu.cpu_kernel.cache_clear()


def channel_last(x: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """The same values as (b, d, L) but a view of (b, L, d + extra) memory, as Mamba's halves of in_proj's output."""
    b, d, L = x.shape
    memory = torch.randn(b, L, d + extra, dtype=x.dtype)
    view = memory.transpose(1, 2)[:, extra:]
    view.copy_(x)
    return view


@pytest.mark.parametrize("d", [5, 16, 70, 130])
def test_channel_last_views_and_channel_blocks_match_reference(d: int, two_threads: None) -> None:
    """Strided (channel-last) u, delta, z and token-major B, C views, and channel counts that leave a partial lane
    group and more than one backward block of groups (kLanes 16; at 2 threads and batch 2 a block is half a batch
    element's groups: 130 channels are blocks of 4, 4 and 1 groups): outputs and every gradient equal autograd
    through the float64 reference (F64_ABS_TOL)."""
    args = scan_args(batch=2, d=d, n=4, seqlen=CHUNK + 9, dtype=torch.float64, seed=d)
    weight = torch.randn(2, d, CHUNK + 9, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    grads = []
    for scan, layout in ((selective_scan_cpu, channel_last), (selective_scan_ref, lambda x, extra=0: x)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if isinstance(v, torch.Tensor)}
        inputs = {**args, **leaves}
        for name, extra in (("u", 3), ("delta", 0), ("z", d)):
            inputs[name] = layout(leaves[name], extra) if scan is selective_scan_cpu else leaves[name]
        for name in ("B", "C"):  # (b, n, L) views of (b, L, n + 2) memory, as x_proj's output split
            if scan is selective_scan_cpu:
                inputs[name] = channel_last(leaves[name], 2)
        y = scan(**inputs)
        if scan is selective_scan_cpu:
            assert y.stride(1) == 1  # the output follows u's channel-last layout
        (y * weight).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()} | {"y": y.detach()})
    got, ref = grads
    for name in (*NAMES, "y"):
        tol = F64_ABS_TOL * max(1.0, ref[name].abs().max().item())
        assert (got[name] - ref[name]).abs().max().item() <= tol, name


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_reference(dtype: torch.dtype, tol: float, activation: str | None) -> None:
    """The fused channel-last conv1d (+ SiLU) against torch's grouped conv1d: output and the gradients of x, the
    weight and the bias, relative to each one's largest value (float32: the polynomial sigmoid, ~2e-7)."""
    from evim3.ops.causal_conv1d import CpuConvFn, causal_conv1d, causal_conv1d_ref

    g = torch.Generator().manual_seed(0)
    for seqlen in (1, 3, 50):
        memory = torch.randn(3, seqlen, 2 * 20, generator=g, dtype=dtype, requires_grad=True)
        x = memory.transpose(1, 2)[:, :20]  # x half of an in_proj output
        weight = torch.randn(20, 4, generator=g, dtype=dtype, requires_grad=True)
        bias = torch.randn(20, generator=g, dtype=dtype, requires_grad=True)
        grad = torch.randn(3, 20, seqlen, generator=g, dtype=dtype)
        results = []
        for conv in (causal_conv1d, causal_conv1d_ref):
            y = conv(x, weight, bias, activation)
            results.append((y, *torch.autograd.grad(y, (memory, weight, bias), grad)))
        assert results[0][0].grad_fn.name().startswith(CpuConvFn.__name__)  # the kernel ran, not the reference
        for got, ref in zip(*results):
            assert ((got - ref).abs().max() / ref.abs().max()).item() <= tol


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"])
def test_kernel_loops_vectorise_for_avx2_and_avx512(arch: str, tmp_path) -> None:
    """The kernels' float helpers (exp, softplus, sigmoid) in a loop over the lanes vectorise when built as the
    project builds them (VECTOR_FLAGS) for AVX2 and for AVX-512, and not without -fno-trapping-math on AVX2 --
    the regression that left the AVX2 build's scan 9x slower. Read from GCC's vectoriser report."""
    import platform
    import shutil
    import subprocess

    from evim3.runtime.fused_scan import KERNEL_HEADER, VECTOR_FLAGS

    compiler = shutil.which("g++")
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None:
        pytest.skip("needs g++ on x86-64 (its -fopt-info report)")
    source = tmp_path / "loops.cpp"
    source.write_text('#include "selective_scan_kernel.h"\nusing namespace evim3_scan;\n'
                      "void f(const float* __restrict x, float* __restrict y) {\n#pragma omp simd\n"
                      "  for (int64_t w = 0; w < kLanes; ++w) y[w] = fast_exp(x[w]) + softplus(x[w]) + sigmoid(x[w]);\n}\n")

    def vectorised(flags: tuple[str, ...]) -> bool:
        done = subprocess.run([compiler, "-O3", f"-march={arch}", *flags, "-fopenmp", "-std=c++17",
                               f"-I{KERNEL_HEADER.parent}", "-c", str(source), "-o", str(tmp_path / "loops.o"),
                               "-fopt-info-vec-optimized"], capture_output=True, text=True, check=True)
        return "loops.cpp:5" in done.stderr and "loop vectorized" in done.stderr

    assert vectorised(VECTOR_FLAGS)
    if arch == "x86-64-v3":
        assert not vectorised(()), "GCC now vectorises without the flag: VECTOR_FLAGS may be dropped"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("d, seqlen, with_biases", [(20, CHUNK + 9, True), (70, 3, False)])
def test_mamba_inner_matches_reference(dtype: torch.dtype, tol: float, d: int, seqlen: int, with_biases: bool,
                                       two_threads: None) -> None:
    """The fused CPU block (conv, x_proj, dt_proj, gated scan, out_proj; the scan's dz and the conv's dx written
    into one buffer for xz, x_proj's input gradient added onto du in place) against mamba_inner_ref in float64:
    the output and the gradients of xz and of every weight, each relative to its largest value (float32: the
    kernels' polynomial exp and sigmoid, ~3e-7 measured)."""
    from evim3.ops.mamba_inner_cpu import mamba_inner_cpu, mamba_inner_ref

    g = torch.Generator().manual_seed(d)
    n, rank, k, d_model, batch = 8, 3, 4, 12, 2

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)

    xz_memory = rand(batch, seqlen, 2 * d)  # in_proj's output: (b, L, 2d) memory, passed as a (b, 2d, L) view
    weights = {"conv1d_weight": rand(d, 1, k, scale=0.5), "conv1d_bias": rand(d) if with_biases else None,
               "x_proj_weight": rand(rank + 2 * n, d, scale=0.3), "delta_proj_weight": rand(d, rank, scale=0.3),
               "out_proj_weight": rand(d_model, d, scale=0.3), "out_proj_bias": rand(d_model) if with_biases else None}
    A = (-torch.rand(d, n, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    D, delta_bias = rand(d), rand(d, scale=0.5)
    leaves = [xz_memory, *(w for w in weights.values() if w is not None), A, D, delta_bias]
    grad_out = torch.randn(batch, seqlen, d_model, generator=g, dtype=torch.float64)
    results = []
    for fn, cast in ((mamba_inner_cpu, dtype), (mamba_inner_ref, torch.float64)):
        def c(t: torch.Tensor | None, cast: torch.dtype = cast) -> torch.Tensor | None:
            return None if t is None else t.to(cast)

        out = fn(c(xz_memory).transpose(1, 2), **{name: c(w) for name, w in weights.items()}, A=c(A), D=c(D),
                 delta_bias=c(delta_bias))
        results.append((out, *torch.autograd.grad(out, leaves, grad_out.to(cast))))
    assert any(n.name().startswith("CpuMambaInnerFn") for n in _graph(results[0][0]))  # the fused function ran
    for got, ref in zip(*results):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= tol


def _graph(t: torch.Tensor) -> list:
    """Every autograd node behind t."""
    seen, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.append(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_mamba_block_runs_the_fused_function_on_cpu_and_matches_the_unfused_path() -> None:
    """A CPU Mamba block (float64) takes the fused path by default; with the chunked scan chosen it composes
    separate ops instead; both give the same output and parameter gradients (1e-10 relative)."""
    from evim3.modules.mamba import Mamba
    from evim3.ops import use_scan

    torch.manual_seed(0)
    block = Mamba(24, d_state=8, expand=2).double()
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    results = []
    for scan in (None, "chunked"):
        block.zero_grad()
        if scan is None:
            y = block(x)
        else:
            with use_scan(block, scan):
                y = block(x)
        names = [n.name() for n in _graph(y)]
        assert any(n.startswith("CpuMambaInnerFn") for n in names) == (scan is None), names
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in block.parameters()])
    for got, ref in zip(*results):
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-10
