"""evim3's Mamba block against mamba_ssm.modules.mamba_simple.Mamba: constructor, parameter names and shapes,
initialisation, and forward maths (an independent float64 re-implementation of mamba_simple's slow path,
tolerance 1e-10 absolute). With mamba-ssm installed (CUDA boxes), its own state_dicts load strictly."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from evim3.modules.mamba import Mamba, ResidualMamba
from evim3.ops import selective_scan_ref

# mamba_simple.Mamba.__init__ (state-spaces/mamba), in order, with defaults.
MAMBA_SIMPLE_SIGNATURE = [
    ("d_model", inspect.Parameter.empty), ("d_state", 16), ("d_conv", 4), ("expand", 2), ("dt_rank", "auto"),
    ("dt_min", 0.001), ("dt_max", 0.1), ("dt_init", "random"), ("dt_scale", 1.0), ("dt_init_floor", 1e-4),
    ("conv_bias", True), ("bias", False), ("use_fast_path", True), ("layer_idx", None), ("device", None),
    ("dtype", None),
]

# Parameter names and shapes mamba_simple.Mamba creates, worked out by hand for two sizes: (d_model, kwargs, shapes).
EXPECTED_SHAPES = [
    # evim3's width: d_inner 768, dt_rank ceil(384 / 16) = 24, x_proj out 24 + 2 * 16 = 56
    (384, {}, {
        "A_log": (768, 16), "D": (768,), "in_proj.weight": (1536, 384), "conv1d.weight": (768, 1, 4),
        "conv1d.bias": (768,), "x_proj.weight": (56, 768), "dt_proj.weight": (768, 24), "dt_proj.bias": (768,),
        "out_proj.weight": (384, 768),
    }),
    # non-defaults: d_inner 50, dt_rank 7, x_proj out 7 + 2 * 8 = 23, Linear biases, no conv bias
    (50, {"d_state": 8, "d_conv": 3, "expand": 1, "dt_rank": 7, "conv_bias": False, "bias": True}, {
        "A_log": (50, 8), "D": (50,), "in_proj.weight": (100, 50), "in_proj.bias": (100,),
        "conv1d.weight": (50, 1, 3), "x_proj.weight": (23, 50), "dt_proj.weight": (50, 7),
        "dt_proj.bias": (50,), "out_proj.weight": (50, 50), "out_proj.bias": (50,),
    }),
]


def test_constructor_signature_is_mamba_simple() -> None:
    params = list(inspect.signature(Mamba.__init__).parameters.values())[1:]  # drop self
    assert [(p.name, p.default) for p in params] == MAMBA_SIMPLE_SIGNATURE


@pytest.mark.parametrize("d_model,kwargs,expected", EXPECTED_SHAPES, ids=["d384-default", "d50-custom"])
def test_parameter_names_and_shapes(d_model: int, kwargs: dict, expected: dict) -> None:
    m = Mamba(d_model, **kwargs)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == expected
    assert set(m.state_dict()) == set(shapes)  # no buffers in the state_dict


def test_initialisation() -> None:
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, dt_min=0.002, dt_max=0.05)
    dt = F.softplus(m.dt_proj.bias.double())  # the bias is the inverse softplus of dt in [dt_min, dt_max]
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform spread, not a constant
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    expected_A = torch.arange(1, 17, dtype=torch.float32).repeat(m.d_inner, 1)  # S4D-real: A = -(1..n)
    assert m.A_log.dtype == torch.float32
    torch.testing.assert_close(torch.exp(m.A_log), expected_A)
    assert torch.equal(m.D, torch.ones(m.d_inner))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.dt_proj.bias._no_reinit
    assert not any(getattr(p, "_no_weight_decay", False) for n, p in m.named_parameters() if n not in ("A_log", "D"))


def test_constant_dt_init_and_floor() -> None:
    m = Mamba(32, dt_init="constant", dt_scale=2.0, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    assert torch.allclose(m.dt_proj.weight, torch.full_like(m.dt_proj.weight, 2.0 * m.dt_rank**-0.5))
    torch.testing.assert_close(F.softplus(m.dt_proj.bias), torch.full((m.d_inner,), 1e-3))  # floor wins
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(32, dt_init="bogus")


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init so that a mix-up between two of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def mamba_simple_slow_path(m: Mamba, hidden_states: torch.Tensor) -> torch.Tensor:
    """mamba_simple.Mamba.forward without causal_conv1d / fused kernels, written out with plain tensor ops
    and the sequential reference scan (float64). Same float32 casts of A, D and the dt bias as mamba_simple."""
    batch, seqlen, d_model = hidden_states.shape
    d_inner, n, rank = m.d_inner, m.d_state, m.dt_rank
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    xz = (p["in_proj.weight"] @ hidden_states.reshape(-1, d_model).T).reshape(2 * d_inner, batch, seqlen)
    xz = xz.permute(1, 0, 2)
    if "in_proj.bias" in p:
        xz = xz + p["in_proj.bias"][:, None]
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    x = F.pad(x, (m.d_conv - 1, 0))  # causal: each output sees itself and the d_conv - 1 before it
    x = sum(p["conv1d.weight"][:, 0, k, None] * x[:, :, k : k + seqlen] for k in range(m.d_conv))
    if "conv1d.bias" in p:
        x = x + p["conv1d.bias"][:, None]
    x = x * torch.sigmoid(x)
    x_dbl = x.permute(0, 2, 1).reshape(batch * seqlen, d_inner) @ p["x_proj.weight"].T
    dt, B, C = x_dbl[:, :rank], x_dbl[:, rank : rank + n], x_dbl[:, rank + n :]
    dt = (p["dt_proj.weight"] @ dt.T).reshape(d_inner, batch, seqlen).permute(1, 0, 2)
    B = B.reshape(batch, seqlen, n).permute(0, 2, 1)
    C = C.reshape(batch, seqlen, n).permute(0, 2, 1)
    A = -torch.exp(m.A_log.detach().float())
    y = selective_scan_ref(
        x, dt, A, B, C, m.D.detach().float(), z=z, delta_bias=m.dt_proj.bias.detach().float(), delta_softplus=True,
    )
    out = y.permute(0, 2, 1) @ p["out_proj.weight"].T
    return out + p["out_proj.bias"] if "out_proj.bias" in p else out


@pytest.mark.parametrize("kwargs", [{}, {"d_state": 8, "d_conv": 3, "expand": 1, "dt_rank": 5, "bias": True}])
def test_forward_matches_mamba_simple_maths(kwargs: dict) -> None:
    torch.manual_seed(1)
    m = randomize(Mamba(24, **kwargs))
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    ref = mamba_simple_slow_path(m, x)
    out64 = m.double()(x)
    assert (out64 - ref).abs().max().item() <= 1e-10
    out32 = m.float()(x.float())
    assert ((out32.double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_state_dict_round_trip_strict() -> None:
    torch.manual_seed(2)
    a = randomize(Mamba(32, d_state=8))
    b = Mamba(32, d_state=8)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 20, 32)
    assert torch.equal(a(x), b(x))


def test_residual_unit() -> None:
    """x + Mamba(LayerNorm(x)), the residual stream in float32 whatever the input dtype."""
    torch.manual_seed(3)
    unit = randomize(ResidualMamba(16, d_state=4))
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), x + unit.mixer(F.layer_norm(x, (16,), unit.norm.weight, unit.norm.bias)))
        assert unit(x.bfloat16()).dtype == torch.float32


@pytest.mark.gpu
def test_mamba_ssm_state_dict_loads_and_matches() -> None:
    """A mamba-ssm Mamba's state_dict loads into evim3's strictly, and both give the same output
    (mamba-ssm's fused CUDA path vs evim3 on CUDA and on the CPU). Tolerance: 1e-4 relative L2 (float32,
    different kernels and summation orders)."""
    mamba_simple = pytest.importorskip("mamba_ssm.modules.mamba_simple", reason="mamba-ssm ([cuda] extra) not installed")
    if not torch.cuda.is_available():
        pytest.skip("mamba-ssm needs CUDA")
    torch.manual_seed(4)
    theirs = randomize(mamba_simple.Mamba(64, d_state=16, layer_idx=0)).cuda()
    ours = Mamba(64, d_state=16).cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 300, 64, device="cuda")
    with torch.no_grad():
        expected = theirs(x)
        for got in (ours(x), ours.cpu()(x.cpu()).cuda()):
            assert ((got - expected).norm() / expected.norm()).item() <= 1e-4
    back = mamba_simple.Mamba(64, d_state=16).cuda()
    back.load_state_dict(ours.state_dict(), strict=True)  # and the other way round
