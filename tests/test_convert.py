"""`evim3 convert`: official E-ViM3 checkpoints (github.com/HenryZhou19/E-ViM3) into evim3 checkpoints.

The official model cannot run here (mamba-ssm CUDA kernels, Triton layer norm), so its side is written out in
this file from its source: the parameter names and shapes its modules create (`official_shapes`) and the
forward of its models over those names (`official_encode`, `official_head`, `official_decode`).
scripts/verify_convert_official.py runs the real thing on a GPU machine.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evim3.cli.main import app
from evim3.runtime.errors import CheckpointError
from typer.testing import CliRunner

from evim3.checkpoint import load_model
from evim3.config import ModelConfig, get_preset
from evim3.convert import (
    OFFICIAL_EF_MEAN,
    OFFICIAL_MEAN,
    OFFICIAL_STD,
    RULES,
    _template_regex,
    build_target,
    convert_state_dict,
    read_official,
    rename,
    to_official,
)
from evim3.models.evim3 import EViM3
from evim3.models.pretrain import EViM3MAE
from evim3.modules.mamba import Mamba

# Small enough to run in well under a second per forward on a shared 2-core CPU.
SMALL = ModelConfig(frames=8, img_size=32, time_patch=2, patch=8, dim=32, depth=2, final_dim=48)
DIRECTIONS = ("hwl", "lwh", "lhw")


# --- the official side, from its source -----------------------------------------------------------------
def _unit_shapes(prefix: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One official Mamba wrapper (n_mamba_per_block=1, final_norm=False): MambaLayer(norm, MambaBlock)."""
    D, Di, n, r = cfg.dim, cfg.d_inner, cfg.d_state, cfg.dt_rank
    layer = f"{prefix}.mamba_layers.0"
    block = {
        "in_proj.weight": (2 * Di, D), "conv1d.weight": (Di, 1, cfg.d_conv), "conv1d.bias": (Di,),
        "x_proj.weight": (r + 2 * n, Di), "dt_proj.weight": (Di, r), "dt_proj.bias": (Di,),
        "A_log": (Di, n), "D": (Di,), "out_proj.weight": (D, Di),
    }
    return {f"{layer}.norm.weight": (D,), f"{layer}.norm.bias": (D,),
            **{f"{layer}.mamba_block.{k}": s for k, s in block.items()}}


def _mamba3d_shapes(prefix: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for d in DIRECTIONS:
        shapes |= _unit_shapes(f"{prefix}.{d}_mamba", cfg) | _unit_shapes(f"{prefix}.r_{d}_mamba", cfg)
    return shapes


def official_shapes(cfg: ModelConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official EchoDynamicVideoMamba3DModel ('finetune'),
    EchoDynamicVideoMamba3DSegModel ('seg') or PretrainVideoMamba3DEfficientModel ('pretrain') with config
    `cfg`, by name."""
    D = cfg.dim
    L, H, W = cfg.grid
    r = cfg.reg
    shapes = {
        "net.patch_embed.proj.weight": (D, cfg.in_channels, cfg.time_patch, cfg.patch, cfg.patch),
        "net.patch_embed.proj.bias": (D,),
        "net.global_faces_token": (6, 1, 1, 1, 1, D),
        "net.global_edges_token": (12, 1, 1, 1, 1, D),
        "net.global_corners_token": (8, 1, 1, 1, 1, D),
        "net.global_reg_token": (1, 1, 1, 1, D),
        "net.l_pos_embed": (1, 2 + r + L, 1, 1, D),
        "net.h_pos_embed": (1, 1, 2 + r + H, 1, D),
        "net.w_pos_embed": (1, 1, 1, 2 + r + W, D),
    }
    for i in range(cfg.depth):
        shapes |= _mamba3d_shapes(f"net.encoder.{i}", cfg)
    if kind == "pretrain":
        pixels = cfg.in_channels * cfg.time_patch * cfg.patch**2
        shapes |= {f"pretrain_decoder_{a}_pos_embed": shapes[f"net.{a}_pos_embed"] for a in "lhw"}
        for i in range(cfg.decoder_depth):
            shapes |= _mamba3d_shapes(f"pretrain_decoder.decoder_blocks.{i}", cfg)
        return shapes | {
            "pretrain_decoder.final_norm.weight": (D,), "pretrain_decoder.final_norm.bias": (D,),
            "pretrain_decoder.patch_reconstruct.weight": (pixels, D), "pretrain_decoder.patch_reconstruct.bias": (pixels,),
            "encoder_random_patch_mask_maker.mask_token": (1, D), "decoder_random_patch_mask_maker.mask_token": (1, D),
        }
    if kind == "seg":  # VideoMamba3DSegFinal(out_channels=2)
        logits = 2 * cfg.time_patch * cfg.patch**2
        return shapes | {"final.final_norm.weight": (D,), "final.final_norm.bias": (D,),
                         "final.patch_reconstruct.weight": (logits, D), "final.patch_reconstruct.bias": (logits,)}
    F_ = cfg.final_dim
    shapes |= {"final.final_norm.weight": (D,), "final.final_norm.bias": (D,),
               "final.final_linear.mlp.0.weight": (F_, (2 + r) ** 3 * D), "final.final_linear.mlp.0.bias": (F_,)}
    widths = [F_] * cfg.head_layers + [1]  # MLP(final_dim, [final_dim] * (head_layers - 1) + [1], SiLU)
    for k in range(cfg.head_layers):
        shapes |= {f"ef_head.net.mlp.{2 * k}.weight": (widths[k + 1], widths[k]),
                   f"ef_head.net.mlp.{2 * k}.bias": (widths[k + 1],)}
    return shapes


# Which boundary planes each Enclosure Global Token fills, in the official token order
# (VideoMamba3D._add_enclosure_tokens): 'L0' = first L plane, 'H1' = last H plane; unnamed axes span 1:-1.
FACES = ["L0", "L1", "H0", "H1", "W0", "W1"]
EDGES = ["L0H0", "L1H0", "L0H1", "L1H1", "L0W0", "L1W0", "L0W1", "L1W1", "H0W0", "H1W0", "H0W1", "H1W1"]
CORNERS = ["L0H0W0", "L1H0W0", "L0H1W0", "L1H1W0", "L0H0W1", "L1H0W1", "L0H1W1", "L1H1W1"]


def _region(spec: str) -> tuple[slice, ...]:
    index = [slice(1, -1)] * 3
    for axis, side in zip(spec[::2], spec[1::2]):
        index["LHW".index(axis)] = slice(0, 1) if side == "0" else slice(-1, None)
    return (slice(None), *index)


def _global_planes(cfg: ModelConfig) -> list[list[int]]:
    return [np.linspace(0, s - 1, 2 + cfg.reg, dtype=np.int64).tolist() for s in cfg.padded_grid]


def _real_mask(cfg: ModelConfig) -> torch.Tensor:
    """(Lp, Hp, Wp): True off every global plane (get_real_tokens_mask)."""
    planes = _global_planes(cfg)
    real = torch.ones(cfg.padded_grid, dtype=torch.bool)
    real[planes[0]] = False
    real[:, planes[1]] = False
    real[:, :, planes[2]] = False
    return real


def _unit(sd: dict[str, torch.Tensor], cfg: ModelConfig, seq: torch.Tensor, prefix: str) -> torch.Tensor:
    """An official Mamba wrapper, n_layer 1: fused add+LayerNorm (prenorm, residual in fp32), MambaBlock,
    then hidden + residual. The MambaBlock is evim3's mamba-ssm-compatible Mamba."""
    layer = f"{prefix}.mamba_layers.0"
    mixer = Mamba(cfg.dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand)
    inner = f"{layer}.mamba_block."
    mixer.load_state_dict({k[len(inner):]: v for k, v in sd.items() if k.startswith(inner)})
    normed = F.layer_norm(seq, (cfg.dim,), sd[f"{layer}.norm.weight"], sd[f"{layer}.norm.bias"], eps=1e-5)
    return seq + mixer(normed)


def _mamba3d(sd: dict[str, torch.Tensor], cfg: ModelConfig, x: torch.Tensor, prefix: str) -> torch.Tensor:
    """Mamba3D.forward (serial) on (N, L, H, W, D): HWL, LWH, LHW, each forward then reversed."""
    for direction, axes in (("hwl", (0, 2, 3, 1, 4)), ("lwh", (0, 3, 2, 1, 4)), ("lhw", (0, 1, 3, 2, 4))):
        x = x.permute(axes)  # from the previous direction's layout (the first from L, H, W)
        seq = _unit(sd, cfg, x.flatten(1, 3), f"{prefix}.{direction}_mamba")
        seq = _unit(sd, cfg, seq.flip(1), f"{prefix}.r_{direction}_mamba").flip(1)
        x = seq.reshape(x.shape)
    return x


def official_encode(sd: dict[str, torch.Tensor], cfg: ModelConfig, clip: torch.Tensor) -> torch.Tensor:
    """The official encoder (video_mamba_3d_new.py: VideoMamba3D) in float32 eval, over its own parameter
    names: (N, C, T, H, W) -> (N, Lp, Hp, Wp, D). It follows the official tensor layout (slices, boolean
    fills, permutes), not evim3's index tables."""
    D = cfg.dim
    kernel = (cfg.time_patch, cfg.patch, cfg.patch)
    x = F.conv3d(clip, sd["net.patch_embed.proj.weight"], sd["net.patch_embed.proj.bias"], stride=kernel)
    x = x.permute(0, 2, 3, 4, 1)  # (N, L, H, W, D)
    N = x.shape[0]
    volume = sd["net.global_reg_token"].reshape(D).expand(N, *cfg.padded_grid, D).clone()
    for family, specs in (("faces", FACES), ("edges", EDGES), ("corners", CORNERS)):
        for k, spec in enumerate(specs):
            volume[_region(spec)] = sd[f"net.global_{family}_token"][k].reshape(D)
    volume[_real_mask(cfg).expand(N, -1, -1, -1)] = x.flatten(0, 3)  # row-major, as the boolean fill
    x = volume + sd["net.l_pos_embed"] + sd["net.h_pos_embed"] + sd["net.w_pos_embed"]
    for i in range(cfg.depth):
        x = _mamba3d(sd, cfg, x, f"net.encoder.{i}")
    return x


def official_decode(sd: dict[str, torch.Tensor], cfg: ModelConfig, volume: torch.Tensor, hidden: torch.Tensor
                    ) -> torch.Tensor:
    """PretrainVideoMamba3DEfficientModel after its encoder: hidden real positions of the encoded volume
    become the decoder mask token, + the decoder's positional embeddings, VideoMamba3DDecoderForPretraining.
    volume (N, Lp, Hp, Wp, D), hidden (N, L, H, W) -> pixels (N, L, H, W, C*t*p*p)."""
    N, D = volume.shape[0], cfg.dim
    real = _real_mask(cfg).expand(N, -1, -1, -1)
    patches = volume[real].reshape(N, *cfg.grid, D)
    patches[hidden] = sd["decoder_random_patch_mask_maker.mask_token"]
    x = volume.clone()
    x[real] = patches.flatten(0, 3)
    x = x + sd["pretrain_decoder_l_pos_embed"] + sd["pretrain_decoder_h_pos_embed"] + sd["pretrain_decoder_w_pos_embed"]
    for i in range(cfg.decoder_depth):
        x = _mamba3d(sd, cfg, x, f"pretrain_decoder.decoder_blocks.{i}")
    x = F.layer_norm(x, (D,), sd["pretrain_decoder.final_norm.weight"], sd["pretrain_decoder.final_norm.bias"])
    x = x[real].reshape(N, *cfg.grid, D)
    return F.linear(x, sd["pretrain_decoder.patch_reconstruct.weight"], sd["pretrain_decoder.patch_reconstruct.bias"])


def official_head(sd: dict[str, torch.Tensor], cfg: ModelConfig, volume: torch.Tensor) -> torch.Tensor:
    """VideoMamba3DFinal ('all_concat') and EchoDynamicEFHead: encoded volume -> (N, 1) EF."""
    D = cfg.dim
    planes = _global_planes(cfg)
    x = volume[:, planes[0]][:, :, planes[1]][:, :, :, planes[2]].flatten(1, 3)  # L-major, then H, then W
    x = F.layer_norm(x, (D,), sd["final.final_norm.weight"], sd["final.final_norm.bias"]).flatten(1)
    x = F.silu(F.linear(x, sd["final.final_linear.mlp.0.weight"], sd["final.final_linear.mlp.0.bias"]))
    for k in range(cfg.head_layers):
        x = F.linear(x, sd[f"ef_head.net.mlp.{2 * k}.weight"], sd[f"ef_head.net.mlp.{2 * k}.bias"])
        if k < cfg.head_layers - 1:
            x = F.silu(x)
    return x


def official_seg_head(sd: dict[str, torch.Tensor], cfg: ModelConfig, volume: torch.Tensor) -> torch.Tensor:
    """VideoMamba3DSegFinal: LayerNorm over the whole volume, the real tokens by the boolean mask, the Linear,
    then _restore_3d_structure's reshape and permute: (N, Lp, Hp, Wp, D) -> (N, 2, T, H, W)."""
    N, D = volume.shape[0], cfg.dim
    x = F.layer_norm(volume, (D,), sd["final.final_norm.weight"], sd["final.final_norm.bias"])
    x = x[_real_mask(cfg).expand(N, -1, -1, -1)].reshape(N, *cfg.grid, D)
    x = F.linear(x, sd["final.patch_reconstruct.weight"], sd["final.patch_reconstruct.bias"])
    L, H, W = cfg.grid
    x = x.reshape(N, L, H, W, 2, cfg.time_patch, cfg.patch, cfg.patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(N, 2, cfg.frames, cfg.img_size, cfg.img_size)


# --- helpers ----------------------------------------------------------------------------------------------
def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: zero-initialised tokens and biases would hide a swapped mapping, and keeping
    the init's structure (LayerNorm ~1, A_log, dt bias) keeps every unit's contribution visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _official_meta(cfg: ModelConfig, kind: str) -> dict[str, torch.Tensor]:
    """An official-shaped state dict without memory: meta tensors (for the full-size presets)."""
    return {k: torch.empty(s, device="meta") for k, s in official_shapes(cfg, kind).items()}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny, so per-op overhead dominates: on the shared 2-core machine two intra-op threads
    made one SMALL forward take 10.8 s against 0.3 s with one (measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_model() -> EViM3:
    torch.manual_seed(0)
    return _trained_like(EViM3(SMALL))


@pytest.fixture(scope="module")
def small_mae() -> EViM3MAE:
    torch.manual_seed(0)
    return _trained_like(EViM3MAE(SMALL))


@pytest.fixture(scope="module")
def small_seg() -> EViM3:
    torch.manual_seed(0)
    return _trained_like(EViM3(SMALL, task="seg"))


def _official_pretrain(mae: EViM3MAE) -> dict[str, torch.Tensor]:
    """The official pre-training state dict of `mae`, with the encoder mask token it also saves."""
    return to_official(mae.state_dict(), "pretrain") | {
        "encoder_random_patch_mask_maker.mask_token": torch.randn(1, mae.cfg.dim)}


def _run_cli(*args: str):
    return CliRunner().invoke(app, ["convert", *args])


# --- the name table -----------------------------------------------------------------------------------------
def _small(kind: str, small_model, small_mae, small_seg) -> torch.nn.Module:
    return {"finetune": small_model, "seg": small_seg, "pretrain": small_mae}[kind]


@pytest.mark.parametrize("kind", ["finetune", "seg", "pretrain"])
def test_table_produces_exactly_the_official_names_and_shapes(kind, small_model, small_mae, small_seg):
    model = _small(kind, small_model, small_mae, small_seg)
    official = _official_pretrain(small_mae) if kind == "pretrain" else to_official(model.state_dict(), kind)
    expected = official_shapes(SMALL, kind)
    assert sorted(official) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in official.items()} == expected


@pytest.mark.parametrize("kind", ["finetune", "seg", "pretrain"])
def test_every_key_is_claimed_by_exactly_one_rule(kind, small_model, small_mae, small_seg):
    ours = _small(kind, small_model, small_mae, small_seg).state_dict()
    for keys, side in ((to_official(ours, kind), 0), (ours, 1)):
        for key in keys:
            claims = [rule for rule in RULES[kind] if _template_regex(rule[side]).fullmatch(key)]
            assert len(claims) == 1, (key, claims)


def _convert_back(official: dict[str, torch.Tensor], original: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Convert `official` (made from `original`) and check it is `original`'s state, bit for bit, in order;
    returns a fresh evim3 model holding it."""
    found, state = convert_state_dict(official, SMALL)
    assert found == kind
    expected = original.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    converted = build_target(SMALL, kind)
    converted.load_state_dict(state, strict=True)
    return converted.eval()


def test_round_trip_is_bitwise_and_outputs_equal(small_model):
    converted = _convert_back(to_official(small_model.state_dict(), "finetune"), small_model, "finetune")
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size)
    with torch.no_grad():
        assert torch.equal(converted(clip), small_model(clip))


def test_pretrain_round_trip_is_bitwise_and_predictions_equal(small_mae):
    converted = _convert_back(_official_pretrain(small_mae), small_mae, "pretrain")
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size)
    mask = small_mae.sample_mask(2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = converted(clip, mask), small_mae(clip, mask)
    assert torch.equal(ours["pred"], theirs["pred"]) and torch.equal(ours["loss"], theirs["loss"])


# The converted model's EF agrees with the official forward within EF_TOLERANCE points: absolute, because
# EF is what is compared; the two float32 paths run the same arithmetic in a different memory layout
# (measured: 0 to 4e-6, about one float32 step at EF ~55, depending on the thread count). A converter that
# swaps a unit or token moves EF by far more (measured 0.12-0.78 over SWAPS): test_a_swap_is_caught.
EF_TOLERANCE = 1e-4


def test_converted_model_matches_the_official_forward(small_model):
    """The argument for output equality with the paper's model: its forward, written from its source over
    the official names, against evim3's converted model -- encoded volume (LHW-flattened, 1e-5 relative and
    absolute) and EF (EF_TOLERANCE)."""
    official = to_official(small_model.state_dict(), "finetune")
    converted = _convert_back(official, small_model, "finetune")
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = converted.encoder(clip)
        official_features = official_encode(official, SMALL, clip)
        ours, theirs = converted.head(features), official_head(official, SMALL, official_features)
    torch.testing.assert_close(features, official_features.flatten(1, 3), rtol=1e-5, atol=1e-5)
    assert ours.shape == theirs.shape == (2, 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=EF_TOLERANCE)


# The seg head's logits against the official forward: absolute, in logits (measured ~1e-6 as for EF).
SEG_TOLERANCE = 1e-4


def test_seg_round_trip_and_official_forward(small_seg):
    """An official seg state dict converts to the evim3 seg model bit for bit, and the converted model's
    logits are the official forward's (encoder and VideoMamba3DSegFinal written from the source)."""
    official = to_official(small_seg.state_dict(), "seg")
    converted = _convert_back(official, small_seg, "seg")
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = converted(clip)
        theirs = official_seg_head(official, SMALL, official_encode(official, SMALL, clip))
        assert torch.equal(ours, small_seg(clip))
    assert ours.shape == theirs.shape == (2, 2, SMALL.frames, SMALL.img_size, SMALL.img_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=SEG_TOLERANCE)
    # A converter that read the Linear's outputs in another order (rows and columns of a patch exchanged)
    # would be caught: the same weights with the patch transposed move the logits far past the tolerance.
    p = SMALL.patch
    rows = torch.arange(2 * SMALL.time_patch * p * p).reshape(2, SMALL.time_patch, p, p).transpose(2, 3).flatten()
    transposed = dict(official, **{k: official[k][rows] for k in ("final.patch_reconstruct.weight",
                                                                   "final.patch_reconstruct.bias")})
    with torch.no_grad():
        moved = official_seg_head(transposed, SMALL, official_encode(official, SMALL, clip)) - ours
    assert moved.abs().max() > 100 * SEG_TOLERANCE


# Mistakes a converter could make: two units of a block, or two tokens of a kind, exchanged.
SWAPS = [*((f"net.encoder.{i}.{d}_mamba", f"net.encoder.{i}.r_{d}_mamba") for i in range(SMALL.depth) for d in DIRECTIONS),
         *((f"net.encoder.{i}.hwl_mamba", f"net.encoder.{i}.lwh_mamba") for i in range(SMALL.depth)),
         *((f"net.global_{kind}_token", "0<->1") for kind in ("faces", "edges", "corners"))]


@pytest.mark.parametrize(("first", "second"), SWAPS)
def test_a_swap_is_caught(small_model, first, second):
    """Each swap in SWAPS, converted, moves EF from the official forward by over 100x EF_TOLERANCE, so the
    comparison above would catch a converter that made it."""
    official = to_official(small_model.state_dict(), "finetune")
    swapped = dict(official)
    if second == "0<->1":  # two tokens of one kind
        swapped[first] = official[first][[1, 0, *range(2, len(official[first]))]]
    else:  # two units: every tensor of one under the other's name
        for key in official:
            if key.startswith(first + "."):
                partner = second + key[len(first):]
                swapped[key], swapped[partner] = official[partner], official[key]
    _, state = convert_state_dict(swapped, SMALL)
    converted = build_target(SMALL, "finetune")
    converted.load_state_dict(state, strict=True)
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moved = (converted.eval()(clip) - official_head(official, SMALL, official_encode(official, SMALL, clip))).abs()
    assert moved.max() > 100 * EF_TOLERANCE


@pytest.mark.parametrize("kind", ["finetune", "seg", "pretrain"])
@pytest.mark.parametrize("preset", ["evim3", "evim3-p4"])
def test_full_size_presets_are_complete(preset, kind):
    """The paper's two geometries: every official parameter maps onto the evim3 model with the same shape
    (official side as meta tensors: checks names and shapes without allocating the weights)."""
    cfg = get_preset(preset)
    found, state = convert_state_dict(_official_meta(cfg, kind), cfg, preset)
    template = build_target(cfg, kind).state_dict()
    assert found == kind
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in template.items()}


# --- refusals -----------------------------------------------------------------------------------------------
def test_converted_mae_matches_the_official_decoder(small_mae):
    """The pre-training mapping, checked the same way: the official decoder (over the official names) fed
    the converted MAE's encoder output for a mask, against the converted MAE's predictions of the hidden
    patches. Same tolerance as above."""
    official = _official_pretrain(small_mae)
    mae = _convert_back(official, small_mae, "pretrain")
    g = torch.Generator().manual_seed(4)
    clip = torch.randn(2, 1, SMALL.frames, SMALL.img_size, SMALL.img_size, generator=g)
    hidden = mae.sample_mask(2, generator=g)
    with torch.no_grad():
        ours = mae(clip, hidden)["pred"]
        tokens, kept = mae.encode_visible(clip, hidden)
        volume = torch.zeros(2, SMALL.num_tokens, SMALL.dim).scatter(1, kept[..., None].expand_as(tokens), tokens)
        theirs = official_decode(official, SMALL, volume.reshape(2, *SMALL.padded_grid, SMALL.dim), hidden)
    torch.testing.assert_close(ours, theirs[hidden], rtol=1e-5, atol=1e-5)


def test_wrong_preset_is_refused_naming_both():
    official = _official_meta(get_preset("evim3-p4"), "finetune")
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(official, get_preset("evim3"), "evim3", path="ckpt.pth")
    message = str(e.value)
    assert message.startswith("ckpt.pth: ")
    assert "'evim3-p4' model (D=192, patch 2x4x4" in message
    assert "not preset 'evim3' (D=384, patch 1x16x16" in message
    assert "--preset evim3-p4" in message


def test_geometry_of_no_preset_is_described():
    official = _official_meta(get_preset("evim3").replace(dim=256), "finetune")
    with pytest.raises(CheckpointError, match="D=256, patch 1x16x16.*matches no evim3 preset; preset 'evim3' is D=384"):
        convert_state_dict(official, get_preset("evim3"), "evim3")


def test_unknown_and_missing_keys_are_listed(small_model):
    official = to_official(small_model.state_dict(), "finetune")
    extra = {f"net.extra_{k}": torch.zeros(1) for k in range(12)}
    del official["net.encoder.1.r_lhw_mamba.mamba_layers.0.mamba_block.A_log"]
    del official["ef_head.net.mlp.4.bias"]
    official["net.encoder.2.hwl_mamba.mamba_layers.0.norm.weight"] = torch.zeros(SMALL.dim)  # depth is 2
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(official | extra, SMALL)
    message = str(e.value)
    assert "13 unknown key(s)" in message and "net.encoder.2.hwl_mamba.mamba_layers.0.norm.weight" in message
    assert "net.extra_0" in message and "(+3 more)" in message  # first 10 shown
    assert ("2 missing key(s): net.encoder.1.r_lhw_mamba.mamba_layers.0.mamba_block.A_log, "
            "ef_head.net.mlp.4.bias") in message


def test_wrong_shape_or_type_is_listed(small_model):
    official = to_official(small_model.state_dict(), "finetune")
    official["final.final_norm.weight"] = torch.zeros(SMALL.dim + 1)
    official["final.final_norm.bias"] = torch.zeros(SMALL.dim, dtype=torch.int64)
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(official, SMALL)
    assert ("2 tensor(s) of the wrong shape or type: final.final_norm.weight (33,) float32 (expected (32,) "
            "float), final.final_norm.bias (32,) int64 (expected (32,) float)") in str(e.value)


def test_neither_head_nor_decoder_is_refused(small_model):
    encoder_only = {k: v for k, v in to_official(small_model.state_dict(), "finetune").items()
                    if k.startswith("net.")}
    with pytest.raises(CheckpointError, match="neither an EF or segmentation head .* nor a pre-training decoder"):
        convert_state_dict(encoder_only, SMALL)


# --- reading official files ---------------------------------------------------------------------------------
UNPICKLED = []


class RecordsUnpickling:
    """Unpickling this object would append to UNPICKLED: proof that evim3 never unpickles it."""

    def __setstate__(self, state):
        UNPICKLED.append(state)


@pytest.mark.parametrize("payload", [argparse.Namespace(lr=1e-4), RecordsUnpickling()])
def test_pickled_objects_are_refused_unread(tmp_path, small_model, payload):
    path = tmp_path / "checkpoint_last_epoch_50.pth"
    torch.save({"model": small_model.state_dict(), "cfg": payload}, path)
    with pytest.raises(CheckpointError) as e:
        read_official(path)
    message = str(e.value)
    assert "\n" not in message
    assert "pickles Python objects" in message and "will not unpickle" in message
    assert type(payload).__name__ in message  # names what it refused
    assert "weights_only=False" in message and "checkpoint_last_epoch_50.weights.pth" in message
    assert UNPICKLED == []


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"certainly not a zip archive")
    with pytest.raises(CheckpointError, match="bad.pth: not a readable PyTorch checkpoint: not a complete torch.save archive"):
        read_official(bad)
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    (tmp_path / "cut.pth").write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable PyTorch checkpoint: not a complete"):
        read_official(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="file is empty"):
        read_official(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="file not found"):
        read_official(tmp_path / "missing.pth")


def _official_file(tmp_path, model: torch.nn.Module, ema_model: torch.nn.Module | None, name="official.pth"):
    """What the official trainer's _save_best_only_model_checkpoint writes (EMA via ema_pytorch.EMA)."""
    ema = None
    if ema_model is not None:
        ema = {"initted": torch.tensor(True), "step": torch.tensor(1000)}
        ema |= {f"ema_model.{k}": v for k, v in to_official(ema_model.state_dict(), "finetune").items()}
    path = tmp_path / name
    torch.save({"model": to_official(model.state_dict(), "finetune"), "ema_container": ema,
                "best_val_metrics": {"ema_L1_loss": 4.1}, "epoch": 37}, path)
    return path


def test_model_and_ema_weights_are_read(tmp_path, small_model):
    ema_model = _trained_like(EViM3(SMALL), seed=7)
    path = _official_file(tmp_path, small_model, ema_model)
    raw, ema = read_official(path), read_official(path, ema=True)
    for weights, model in ((raw, small_model), (ema, ema_model)):
        _, state = convert_state_dict(weights, SMALL)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_missing_or_foreign_ema_is_a_clear_error(tmp_path, small_model):
    path = _official_file(tmp_path, small_model, None)
    with pytest.raises(CheckpointError, match="has no EMA weights .* convert without --ema"):
        read_official(path, ema=True)
    torch.save({"model": {}, "ema_container": {"shadow.w": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not an ema_pytorch EMA state dict \(keys: shadow.w\)"):
        read_official(tmp_path / "other.pth", ema=True)


def test_ddp_prefix_and_bare_state_dicts(tmp_path, small_model):
    official = to_official(small_model.state_dict(), "finetune")
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}}, tmp_path / "ddp.pth")
    torch.save(official, tmp_path / "bare.pth")
    assert read_official(tmp_path / "ddp.pth").keys() == official.keys()
    assert read_official(tmp_path / "bare.pth").keys() == official.keys()
    with pytest.raises(CheckpointError, match="bare state dict with no EMA weights"):
        read_official(tmp_path / "bare.pth", ema=True)


# --- the command --------------------------------------------------------------------------------------------
def test_cli_converts_the_ema_weights(tmp_path):
    cfg = get_preset("evim3-tiny")
    model, ema_model = _trained_like(EViM3(cfg), seed=1), _trained_like(EViM3(cfg), seed=2)
    path = _official_file(tmp_path, model, ema_model)
    result = _run_cli(str(path), "--preset", "evim3-tiny", "--out", str(tmp_path / "converted"), "--ema")
    assert result.exit_code == 0, result.output
    assert "fine-tuned EF model, EMA weights, preset evim3-tiny" in result.output
    loaded, meta = load_model(tmp_path / "converted.safetensors", preset="evim3-tiny")
    assert (meta.preprocess.mean, meta.preprocess.std) == (OFFICIAL_MEAN, OFFICIAL_STD)
    assert (meta.preprocess.frames, meta.preprocess.period, meta.preprocess.fps) == (cfg.frames, 2, 50.0)
    assert meta.ef_mean == OFFICIAL_EF_MEAN and meta.task == "ef" and meta.data["weights"] == "ema"
    # Bitwise-equal weights in the same architecture: the same outputs (test_round_trip runs them).
    expected = ema_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_cli_converts_a_seg_model_and_back(tmp_path):
    """An official seg checkpoint becomes an evim3 checkpoint of task 'seg' with the same weights, and its
    state dict under the official names is the file's again (both ways, one to one)."""
    cfg = get_preset("evim3-tiny")
    model = _trained_like(EViM3(cfg, task="seg"), seed=3)
    official = to_official(model.state_dict(), "seg")
    path = tmp_path / "seg.pth"
    torch.save({"model": official, "ema_container": None, "epoch": 49}, path)
    result = _run_cli(str(path), "--preset", "evim3-tiny", "--out", str(tmp_path / "seg"))
    assert result.exit_code == 0, result.output
    assert "official LV segmentation model, raw weights" in result.output
    loaded, meta = load_model(tmp_path / "seg.safetensors", preset="evim3-tiny")
    assert meta.task == "seg" and meta.ef_mean is None and meta.data["stage"] == "finetune"
    back = to_official(loaded.state_dict(), "seg")
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


def test_cli_converted_pretraining_initialises_finetuning(tmp_path):
    """A converted MAE is what `evim3 train finetune --init` reads (evim3.train.tasks.load_encoder_weights)."""
    from evim3.train.tasks import load_encoder_weights

    cfg = get_preset("evim3-tiny")
    mae = _trained_like(EViM3MAE(cfg))
    path = tmp_path / "pretrain.pth"
    torch.save({"model": _official_pretrain(mae), "ema_container": None, "epoch": 99}, path)
    result = _run_cli(str(path), "--preset", "evim3-tiny", "--out", str(tmp_path / "mae.safetensors"))
    assert result.exit_code == 0, result.output
    assert "official pre-training model, raw weights" in result.output
    assert "not imported (never used by the official model's outputs): encoder_random_patch_mask_maker" in result.output
    finetune = EViM3(cfg)
    meta = load_encoder_weights(finetune, str(tmp_path / "mae.safetensors"))
    assert meta.data["stage"] == "pretrain" and meta.ef_mean is None
    assert all(torch.equal(v, mae.encoder.state_dict()[k]) for k, v in finetune.encoder.state_dict().items())


def test_cli_wrong_preset_is_one_line_and_writes_nothing(tmp_path, small_model):
    path = _official_file(tmp_path, _trained_like(EViM3(get_preset("evim3-tiny"))), None)
    result = _run_cli(str(path), "--preset", "evim3-small", "--out", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'evim3-tiny' model" in lines[0] and "Traceback" not in result.output
    assert not list(tmp_path.glob("out*"))


def test_cli_mean_std_override(tmp_path):
    path = _official_file(tmp_path, _trained_like(EViM3(get_preset("evim3-tiny"))), None)
    result = _run_cli(str(path), "--preset", "evim3-tiny", "--out", str(tmp_path / "c.safetensors"),
                      "--mean", "30", "--std", "45.5")
    assert result.exit_code == 0, result.output
    _, meta = load_model(tmp_path / "c.safetensors")
    assert (meta.preprocess.mean, meta.preprocess.std) == (30.0, 45.5)
    bad = _run_cli(str(path), "--preset", "evim3-tiny", "--out", str(tmp_path / "d"), "--std", "0")
    assert bad.exit_code == 1 and "--std must be positive" in bad.output


def test_renaming_is_its_own_inverse():
    key = "net.encoder.5.r_lwh_mamba.mamba_layers.0.mamba_block.dt_proj.bias"
    ours = rename(key, "finetune")
    assert ours == "encoder.blocks.5.lwh_r.mixer.dt_proj.bias"
    assert rename(ours, "finetune", to_evim3=False) == key
