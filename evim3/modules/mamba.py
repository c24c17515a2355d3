"""The Mamba-1 block with mamba-ssm's exact parameters, and the pre-norm residual unit the paper stacks.

``Mamba`` has the constructor arguments, parameter names, shapes and initialisation of
``mamba_ssm.modules.mamba_simple.Mamba``: a state_dict saved from one loads into the other with
``strict=True`` and gives the same output.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evim3.ops import scan_name, selective_scan
from evim3.ops.causal_conv1d import causal_conv1d
from evim3.ops.mamba_inner_cpu import mamba_inner_cpu
from evim3.ops.selective_scan_chunked import tracing
from evim3.ops.selective_scan_cpu import cpu_kernel


@functools.cache
def _mamba_inner_fn():
    """mamba-ssm's fully fused block (conv + projections + scan), or None without the [cuda] extra."""
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: F401  (mamba_inner_fn needs it)
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:  # noqa: BLE001 -- ImportError, or a CUDA build that fails to load: fall back
        return None
    return mamba_inner_fn


def _fused_inner(xz: Tensor, scan: str | None):
    """The whole-block function (mamba_inner_fn's signature) for xz when the scan this unit runs allows one:
    mamba-ssm's on CUDA (scan "mamba"), evim3's on CPU (scan "cpu", float32/float64, outside tracing); else None."""
    if tracing():
        return None
    name = scan if scan is not None else scan_name(xz.device.type)
    if xz.is_cuda and name == "mamba":
        return _mamba_inner_fn()
    if xz.device.type == "cpu" and name == "cpu" and xz.dtype in (torch.float32, torch.float64):
        return mamba_inner_cpu if cpu_kernel() is not None else None
    return None


class _ChannelHalves(torch.autograd.Function):
    """xz (batch, 2d, L) -> its two channel halves as views. Its backward writes both halves' gradients into one
    (batch, L, 2d) buffer: the layout in_proj's backward reads, where chunk's backward would cat them along the
    channels in (batch, 2d, L) order and the matmul would then copy that once more."""

    @staticmethod
    def forward(ctx, xz: Tensor) -> tuple[Tensor, Tensor]:
        ctx.d = xz.shape[1] // 2
        return xz[:, : ctx.d], xz[:, ctx.d :]

    @staticmethod
    def backward(ctx, grad_x: Tensor | None, grad_z: Tensor | None) -> Tensor:
        like = grad_x if grad_x is not None else grad_z
        grad = like.new_empty(like.shape[0], like.shape[2], 2 * ctx.d)
        for half, g in ((grad[..., : ctx.d], grad_x), (grad[..., ctx.d :], grad_z)):
            if g is None:
                half.zero_()
            else:
                half.copy_(g.transpose(1, 2))
        return grad.transpose(1, 2)


def channel_halves(xz: Tensor) -> tuple[Tensor, Tensor]:
    """xz.chunk(2, dim=1), with the one-buffer backward outside tracing (export sees plain slicing)."""
    return tuple(xz.chunk(2, dim=1)) if tracing() else _ChannelHalves.apply(xz)  # type: ignore[return-value]


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        # The selective scan this unit runs (evim3.ops.SCANS), None: the dispatcher's choice for the device.
        # evim3.ops.use_scan sets it for a block (export traces "exportable").
        self.scan: str | None = None
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
            padding=d_conv - 1, bias=conv_bias, **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weights keep the variance of dt at init; the bias is the inverse softplus of a
        # log-uniform dt in [dt_min, dt_max], so softplus(bias) starts there.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(
            torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # model-level init zeroes every other Linear bias

        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, kept in float32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, L)
        A = -torch.exp(self.A_log.float())

        # the whole-block kernel of the scan this unit runs (its own choice, else EVIM3_SCAN's, else the device's)
        fused = _fused_inner(xz, self.scan) if self.use_fast_path else None
        if fused is not None:
            out = fused(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )
            return out

        # x, z and everything below are (batch, d, L) views of (batch, L, d) memory: the CPU kernels read them
        # channel-last, and the projections then take them with no transpose copied.
        x, z = channel_halves(xz)
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, impl=self.scan,
        )
        return self.out_proj(y.transpose(1, 2))


class ResidualMamba(nn.Module):
    """``x + Mamba(LayerNorm(x))`` with the residual stream kept in float32 (the paper's residual_in_fp32)."""

    def __init__(self, d_model: int, **mamba_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = Mamba(d_model, **mamba_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        # At least float32 (float64 stays float64, so float64 models can be checked against references).
        residual = x.to(torch.promote_types(x.dtype, torch.float32))
        return residual + self.mixer(self.norm(residual)).to(residual.dtype)


def init_residual_stack(module: nn.Module, num_units: int) -> None:
    """The paper's init over a stack of ``num_units`` residual Mamba units: zero Linear biases (except
    dt_proj's) and GPT-2 residual rescaling -- every out_proj re-drawn kaiming-uniform, divided by sqrt(num_units)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
            nn.init.zeros_(m.bias)
        if isinstance(m, Mamba):
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(num_units)
