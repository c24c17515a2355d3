"""Where every token sits: scan orders (Psi) against explicit permute + flatten, and the Enclosure Global Token
layout against an independent construction that follows the paper's slicing semantics. All exact (integers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evim3.config import PRESETS, ModelConfig
from evim3.models.evim3 import EViM3Encoder
from evim3.models.layout import (
    BLOCK_ORDER,
    direction_order,
    enclosure_layout,
    intersection_positions,
    permute_tokens,
    real_positions,
    scan_orders,
)

SHAPES = [(2, 3, 4), (5, 1, 3), (4, 4, 4), (7, 5, 6), PRESETS["evim3"].padded_grid]

# Flatten order of each direction written as a permute of an (L, H, W) volume, last axis fastest.
PERMUTE = {"hwl": (1, 2, 0), "lwh": (0, 2, 1), "lhw": (0, 1, 2)}


def volume_in_order(shape: tuple[int, int, int], direction: str) -> torch.Tensor:
    """Flat LHW positions listed in the order permute + flatten visits them (independent of layout.py)."""
    return torch.arange(int(np.prod(shape))).reshape(shape).permute(PERMUTE[direction]).flatten()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_direction_order_is_permute_flatten(shape: tuple[int, int, int]) -> None:
    for direction in BLOCK_ORDER:
        assert torch.equal(torch.as_tensor(direction_order(shape, direction)), volume_in_order(shape, direction))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_each_gather_and_its_inverse_restore_the_tokens(shape: tuple[int, int, int]) -> None:
    S = int(np.prod(shape))
    x = torch.arange(S * 2, dtype=torch.float64).reshape(1, S, 2)  # (N, S, D): every value distinct
    for direction in BLOCK_ORDER:
        order = torch.as_tensor(direction_order(shape, direction))
        inverse = torch.argsort(order)
        assert torch.equal(permute_tokens(permute_tokens(x, order), inverse), x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_psi_visits_hwl_lwh_then_back_to_lhw(shape: tuple[int, int, int]) -> None:
    """Applied in series, the three Psi gathers turn an LHW sequence into HWL, then LWH, then LHW again."""
    S = int(np.prod(shape))
    x = torch.arange(S)[None, :, None]  # token = its LHW position
    expected = [volume_in_order(shape, d) for d in ("hwl", "lwh", "lhw")]
    for index, order in zip(scan_orders(shape), expected):
        assert index.shape == (S,)
        x = permute_tokens(x, index)
        assert torch.equal(x[0, :, 0], order)


def test_psi_with_kept_tokens_per_sample() -> None:
    """Token skipping: each sample keeps its own subset; the gathers visit that sample's kept tokens in every
    direction's order and end in LHW order."""
    shape = (3, 4, 5)
    S = 60
    g = torch.Generator().manual_seed(0)
    keep = torch.zeros(3, S, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(S, generator=g)[:25]] = True  # the same count per row, different positions
    seq = torch.stack([torch.nonzero(row)[:, 0] for row in keep])[..., None]  # (N, 25, 1) kept, LHW order
    x = seq
    for index, direction in zip(scan_orders(shape, keep), ("hwl", "lwh", "lhw")):
        assert index.shape == (3, 25)
        x = permute_tokens(x, index)
        for n in range(3):
            full = volume_in_order(shape, direction)
            assert torch.equal(x[n, :, 0], full[keep[n][full]])
    assert torch.equal(x, seq)


# The paper's _add_enclosure_tokens, as data: which slice of each axis a global token fills, in the paper's
# row order. F = first plane [:1], E = last plane [-1:], I = the inside [1:-1]. Axes L, H, W.
FACE_SLICES = ["FII", "EII", "IFI", "IEI", "IIF", "IIE"]
EDGE_SLICES = ["FFI", "EFI", "FEI", "EEI", "FIF", "EIF", "FIE", "EIE", "IFF", "IEF", "IFE", "IEE"]
CORNER_SLICES = ["FFF", "EFF", "FEF", "EEF", "FFE", "EFE", "FEE", "EEE"]
SLICE = {"F": slice(None, 1), "E": slice(-1, None), "I": slice(1, -1)}

CONFIGS = [
    PRESETS["evim3"], PRESETS["evim3-p4"], PRESETS["evim3-small"], PRESETS["evim3-tiny"],
    ModelConfig(frames=6, img_size=32, patch=16, time_patch=2, dim=8, reg=0),
    ModelConfig(frames=9, img_size=48, patch=8, time_patch=1, dim=8, reg=2),
]


def paper_layout(cfg: ModelConfig) -> np.ndarray:
    """Padded volume of source ids (real token k -> k, global row j -> R + j), built the paper's way: fill all
    with the register token, then faces, edges, corners by slices, then the real tokens (row-major) into
    every position on no global plane -- the planes being int(linspace(0, size - 1, 2 + reg)) per axis."""
    L, H, W = cfg.grid
    R = L * H * W
    padded = (L + cfg.reg + 2, H + cfg.reg + 2, W + cfg.reg + 2)
    volume = np.full(padded, R + 26)
    for row, spec in enumerate(FACE_SLICES + EDGE_SLICES + CORNER_SLICES):
        volume[tuple(SLICE[c] for c in spec)] = R + row
    real = np.ones(padded, dtype=bool)
    for axis, size in enumerate(padded):
        planes = np.linspace(0, size - 1, 2 + cfg.reg).astype(np.int64)
        real[(slice(None),) * axis + (planes,)] = False
    volume[real] = np.arange(R)
    return volume


def test_global_planes_truncate() -> None:
    """H = 7 patches, one register plane: a padded axis of 10 with planes at 0, 4 (int(4.5)) and 9."""
    assert PRESETS["evim3"].global_planes == ([0, 33, 66], [0, 4, 9], [0, 4, 9])
    assert PRESETS["evim3-p4"].global_planes == ([0, 17, 34], [0, 15, 30], [0, 15, 30])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.grid}-reg{c.reg}")
def test_enclosure_layout_matches_paper_slicing(cfg: ModelConfig) -> None:
    layout = enclosure_layout(cfg).reshape(cfg.padded_grid)
    assert np.array_equal(layout, paper_layout(cfg))
    assert np.array_equal(real_positions(cfg), np.flatnonzero(paper_layout(cfg).reshape(-1) < cfg.num_real_tokens))


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: f"{c.grid}")
def test_token_counts(cfg: ModelConfig) -> None:
    layout = enclosure_layout(cfg)
    R = cfg.num_real_tokens
    assert len(layout) == cfg.num_tokens == np.prod([s + 3 for s in cfg.grid])
    assert np.array_equal(layout[layout < R], np.arange(R))  # real tokens, once each, in patch order
    assert set(np.unique(layout[layout >= R]) - R) == set(range(27))  # every global row is used


def test_intersection_positions_l_major() -> None:
    cfg = PRESETS["evim3"]
    _, Hp, Wp = cfg.padded_grid
    expected = [(l * Hp + h) * Wp + w for l in (0, 33, 66) for h in (0, 4, 9) for w in (0, 4, 9)]
    assert intersection_positions(cfg).tolist() == expected


def test_assemble_places_every_global_token_and_real_token() -> None:
    """The encoder's assembly: each of the 27 global parameters set to its own constant, real tokens numbered,
    positions zero -- every position of the padded volume holds what the paper's slicing puts there."""
    cfg = ModelConfig(frames=8, time_patch=2, img_size=48, patch=16, dim=4)
    encoder = EViM3Encoder(cfg)
    D, R = cfg.dim, cfg.num_real_tokens
    with torch.no_grad():
        for offset, p in zip((1000, 2000, 3000, 4000), (encoder.global_faces_token, encoder.global_edges_token,
                                                       encoder.global_corners_token, encoder.global_reg_token)):
            rows = p.reshape(-1, D).shape[0]
            p.copy_((offset + torch.arange(rows, dtype=torch.float32)).reshape(-1, *[1] * (p.dim() - 1)).expand_as(p))
        for pos in (encoder.l_pos_embed, encoder.h_pos_embed, encoder.w_pos_embed):
            pos.zero_()
        real = -1 - torch.arange(R, dtype=torch.float32)[None, :, None].expand(1, R, D)
        volume = encoder.assemble(real)[0, :, 0]
    table = torch.cat([-1 - torch.arange(R, dtype=torch.float32),
                       1000 + torch.arange(6.0), 2000 + torch.arange(12.0), 3000 + torch.arange(8.0), 4000 + torch.zeros(1)])
    assert torch.equal(volume, table[torch.as_tensor(paper_layout(cfg).reshape(-1))])
