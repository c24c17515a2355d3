"""The E-ViM3 model: the Mamba-3D block against explicit permutes, global tokens and positional embeddings in
place, parameter counts of the paper's code, initialisation, input checks, batch independence, heads, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import typer
from evim3.cli.info import info
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from evim3.config import AGGREGATES, PRESETS, ModelConfig, get_preset
from evim3.models.evim3 import (
    EViM3,
    EViM3Encoder,
    GlobalTokenHead,
    Mamba3DBlock,
    count_parameters,
    model_flops,
    no_weight_decay_names,
)
from evim3.models.layout import intersection_positions, real_positions
from evim3.modules.mamba import Mamba, ResidualMamba, init_residual_stack
from evim3.ops.selective_scan_cpu import cpu_kernel

# A few hundred tokens, L != H so that an axis mix-up shows: grid (4, 3, 3), padded (7, 6, 6).
SMALL = ModelConfig(frames=8, time_patch=2, img_size=48, patch=16, dim=16, depth=2, d_state=4, final_dim=32)


def clip_for(cfg: ModelConfig, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size, generator=g)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter off its init (zero global tokens, ones in LayerNorm...) so that a mix-up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def block_by_permutes(block: Mamba3DBlock, volume: torch.Tensor) -> torch.Tensor:
    """The Mamba-3D block written with permute / flatten / reshape of the (N, L, H, W, D) volume."""
    N, L, H, W, D = volume.shape

    def both_ways(name: str, seq: torch.Tensor) -> torch.Tensor:
        seq = getattr(block, name)(seq)
        return getattr(block, f"{name}_r")(seq.flip(1)).flip(1)

    x = both_ways("hwl", volume.permute(0, 2, 3, 1, 4).reshape(N, H * W * L, D)).reshape(N, H, W, L, D)
    x = both_ways("lwh", x.permute(0, 3, 2, 1, 4).reshape(N, L * W * H, D)).reshape(N, L, W, H, D)
    x = both_ways("lhw", x.permute(0, 1, 3, 2, 4).reshape(N, L * H * W, D))
    return x.reshape(N, L, H, W, D)


def test_block_gathers_equal_explicit_permutes() -> None:
    torch.manual_seed(0)
    encoder = randomize(EViM3Encoder(SMALL))
    block = encoder.blocks[0]
    volume = torch.randn(2, *SMALL.padded_grid, SMALL.dim)
    with torch.no_grad():
        by_gathers = block(volume.flatten(1, 3), encoder.full_orders).reshape(volume.shape)
        expected = block_by_permutes(block, volume)
    torch.testing.assert_close(by_gathers, expected, rtol=1e-6, atol=1e-6)


def test_positional_embedding_is_factorised() -> None:
    torch.manual_seed(1)
    encoder = randomize(EViM3Encoder(SMALL))
    l, h, w = (p.detach()[0].squeeze() for p in (encoder.l_pos_embed, encoder.h_pos_embed, encoder.w_pos_embed))
    expected = l[:, None, None] + h[None, :, None] + w[None, None, :]  # (Lp, Hp, Wp, D)
    with torch.no_grad():
        torch.testing.assert_close(encoder.pos_embed().reshape(expected.shape), expected)
        assert encoder.l_pos_embed.shape == (1, SMALL.padded_grid[0], 1, 1, SMALL.dim)


def test_real_tokens_come_from_patch_embedding_in_order() -> None:
    """With zero global tokens and positions, the real positions hold the Conv3d patches in LHW order."""
    encoder = EViM3Encoder(SMALL)
    with torch.no_grad():
        for pos in (encoder.l_pos_embed, encoder.h_pos_embed, encoder.w_pos_embed):
            pos.zero_()
        clip = clip_for(SMALL)
        patches = encoder.patch_embed.proj(clip)  # (1, D, L, H, W)
        volume = encoder.assemble(encoder.patch_embed(clip).flatten(1, 3))
    expected = patches.flatten(2).transpose(1, 2)  # (1, L*H*W, D), last axis fastest
    assert torch.equal(volume[:, torch.as_tensor(real_positions(SMALL))], expected)


@pytest.mark.parametrize("preset,expected", [("evim3", 40_703_873), ("evim3-p4", 12_279_617)])
def test_parameter_count_matches_paper_code(preset: str, expected: int) -> None:
    assert count_parameters(EViM3(get_preset(preset))) == expected


def test_initialisation() -> None:
    torch.manual_seed(2)
    model = EViM3(SMALL, ef_mean=57.25)
    units = 6 * SMALL.depth
    output_layer = model.head.mlp[-1]
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is not None and not name.endswith("dt_proj") and m is not output_layer:
            assert torch.count_nonzero(m.bias) == 0, name
        if isinstance(m, Mamba):
            # kaiming_uniform(a=sqrt(5)) bound = 1 / sqrt(fan_in), then the GPT-2 rescale by sqrt(#units)
            bound = 1 / math.sqrt(m.d_inner) / math.sqrt(units)
            w = m.out_proj.weight.abs().max().item()
            assert 0.9 * bound < w <= bound, name
            dt = nn.functional.softplus(m.dt_proj.bias)
            assert 0.001 * (1 - 1e-5) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-5)
    for p in (model.encoder.global_faces_token, model.encoder.global_edges_token,
              model.encoder.global_corners_token, model.encoder.global_reg_token):
        assert torch.count_nonzero(p) == 0
    pos = torch.cat([p.flatten() for p in (model.encoder.l_pos_embed, model.encoder.h_pos_embed,
                                            model.encoder.w_pos_embed)])
    assert 0.015 < pos.std().item() < 0.025
    assert output_layer.bias.tolist() == [57.25]


def test_residual_stack_init_zeroes_every_linear_bias_but_dt_proj() -> None:
    """With bias=True Mamba units (evim3's default has none in in_proj / out_proj), the stack init zeroes
    those biases and keeps dt_proj's inverse-softplus bias."""
    stack = nn.Sequential(*(ResidualMamba(16, d_state=4, bias=True) for _ in range(3)))
    dt_bias = [unit.mixer.dt_proj.bias.clone() for unit in stack]
    init_residual_stack(stack, num_units=3)
    for unit, before in zip(stack, dt_bias):
        assert torch.count_nonzero(unit.mixer.in_proj.bias) == 0
        assert torch.count_nonzero(unit.mixer.out_proj.bias) == 0
        assert torch.equal(unit.mixer.dt_proj.bias, before)


def test_no_weight_decay_names_cover_A_log_and_D() -> None:
    model = EViM3(SMALL)
    names = no_weight_decay_names(model)
    mamba_params = [n for n, _ in model.named_parameters() if n.endswith((".A_log", ".D"))]
    assert len(mamba_params) == 2 * 6 * SMALL.depth
    assert set(mamba_params) <= names
    assert not any(n.endswith(("in_proj.weight", "out_proj.weight", "x_proj.weight")) for n in names)


@pytest.mark.parametrize(
    "shape,what",
    [((1, 1, 6, 48, 48), "frames"), ((1, 1, 8, 32, 32), "size"), ((1, 3, 8, 48, 48), "channels"),
     ((1, 8, 48, 48), "dims")],
)
def test_clip_that_does_not_fit_is_a_value_error(shape: tuple[int, ...], what: str) -> None:
    model = EViM3(SMALL)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(shape))
    message = str(info.value)
    assert str(tuple(shape)) in message  # what was given
    assert "1, 8, 48, 48" in message  # what the model expects: (channels, frames, height, width)
    assert "\n" not in message


def test_batch_members_are_independent() -> None:
    torch.manual_seed(3)
    model = randomize(EViM3(SMALL)).eval()
    clips = clip_for(SMALL, batch=3)
    with torch.no_grad():
        batched = model(clips)
        solo = torch.cat([model(clips[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 1)
    torch.testing.assert_close(batched, solo, rtol=1e-5, atol=1e-5)
    assert batched.std() > 0  # different clips, different outputs


@pytest.mark.parametrize("num_classes,outputs", [(2, 1), (3, 3), (7, 7)])
def test_classification_head_shapes(num_classes: int, outputs: int) -> None:
    model = EViM3(SMALL, task="classification", num_classes=num_classes).eval()
    with torch.no_grad():
        assert model(clip_for(SMALL, batch=2)).shape == (2, outputs)  # binary: one logit (BCE)


def test_bad_task_arguments() -> None:
    with pytest.raises(ValueError, match="task"):
        EViM3(SMALL, task="segmentation")
    with pytest.raises(ValueError, match="2 classes"):
        EViM3(SMALL, task="classification", num_classes=1)


def test_tiny_preset_forward() -> None:
    cfg = PRESETS["evim3-tiny"]
    model = EViM3(cfg, ef_mean=55.0).eval()
    with torch.no_grad():
        out = model(clip_for(cfg))
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_model_flops_counts_the_layers() -> None:
    """model_flops against torch's FLOP counter on the Linear and Conv layers (mm, addmm, convolution): the
    difference must be the scan's 9 * d_inner * d_state per token and unit, which the counter sees only in
    part (the readout einsum, as bmm), so bmm is left out, and, where the fused CPU conv1d ran (not an aten op,
    so not counted), the depthwise conv's 2 * d_inner * d_conv. Tolerance 1 % (the conv counts its padding)."""
    model = EViM3(SMALL).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(clip_for(SMALL))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    layers = sum(counts.get(f"aten.{op}", 0) for op in ("mm", "addmm", "convolution"))
    per_unit_token = 9 * SMALL.d_inner * SMALL.d_state + (2 * SMALL.d_inner * SMALL.d_conv if cpu_kernel() else 0)
    unseen = 6 * SMALL.depth * SMALL.num_tokens * per_unit_token
    assert model_flops(SMALL) - unseen == pytest.approx(layers, rel=0.01)


def test_info_command_prints_every_preset() -> None:
    """`evim3 info` (the command function, in its own Typer app): the paper presets' parameter counts and
    token counts, one preset with --preset, and a one-line error for an unknown name."""
    app = typer.Typer()
    app.command()(info)
    runner = CliRunner()
    result = runner.invoke(app, [], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for text in ("40,703,873", "12,279,617", "6,700", "33,635", "0,4,9", "485.2"):
        assert text in result.output
    for name in PRESETS:
        assert name in result.output
    assert "scan on CUDA tensors: " in result.output and "scan on CPU tensors: " in result.output
    forced = runner.invoke(app, ["--preset", "evim3-tiny"], env={"COLUMNS": "120", "EVIM3_SCAN": "chunked"})
    assert "scan on CPU tensors: the chunked scan (PyTorch ops) (forced by EVIM3_SCAN)" in forced.output
    one = runner.invoke(app, ["--preset", "evim3-tiny"], env={"COLUMNS": "120"})
    assert one.exit_code == 0 and "evim3-tiny" in one.output and "evim3-p4" not in one.output
    assert f"{count_parameters(EViM3(PRESETS['evim3-tiny'])):,}" in one.output
    bad = runner.invoke(app, ["--preset", "evim4"])
    assert bad.exit_code == 1 and "unknown preset 'evim4'" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_head_aggregates_read_the_global_tokens(aggregate: str) -> None:
    """all_concat: the crossing tokens, normalised and concatenated; all_enclosure_mean: every global token
    normalised, then averaged. Checked against the definition on a random encoded volume."""
    cfg = SMALL.replace(aggregate=aggregate)
    head = GlobalTokenHead(cfg).eval()
    tokens = torch.randn(2, cfg.num_tokens, cfg.dim)
    is_global = torch.ones(cfg.num_tokens, dtype=torch.bool)
    is_global[torch.as_tensor(real_positions(cfg))] = False
    if aggregate == "all_concat":
        features = head.norm(tokens[:, torch.as_tensor(intersection_positions(cfg))]).flatten(1)
    else:
        features = head.norm(tokens[:, is_global]).mean(1)
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), head.mlp(head.proj(features)))


def test_unknown_aggregate_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregate 'cls'"):
        SMALL.replace(aggregate="cls")


def test_ef_output_is_in_units_of_the_training_spread() -> None:
    """EF = ef_std * network output, starting at ef_mean: the network itself regresses standardised EF."""
    torch.manual_seed(3)
    model = EViM3(SMALL, ef_mean=57.25, ef_std=12.5).eval()
    assert model.head.mlp[-1].bias.item() == pytest.approx(57.25 / 12.5)
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size)
    with torch.no_grad():
        ef = model(clip)
        tokens = model.encoder(clip)
        unscaled = model.head.mlp(model.head.proj(model.head.norm(tokens[:, model.head.positions]).flatten(1)))
    torch.testing.assert_close(ef, 12.5 * unscaled)
    assert (ef - 57.25).abs().max().item() < 1.0  # near the mean at initialisation
