"""Which patches a masked-autoencoder step hides: Spatial-Temporal Chained (STC), random and tube masks.

Every strategy is one rule: pick a fixed number of cells of a coarse grid without replacement, then
nearest-upsample the coarse grid to the patch grid (L, H, W) with ``F.interpolate`` -- exactly the paper's
RandomPatchMaskMaker. STC cells span ``time_chain`` x ``chain`` x ``chain`` patches; "random" is STC with
1 x 1 x 1 cells; "tube" is STC with L x 1 x 1 cells (one spatial mask for every time step).

Masks are True where a patch is hidden. Each sample gets its own mask with the same number of hidden
patches (what lets the token-skipping encoder batch the visible tokens); ``shared=True`` draws one mask
for the whole batch, as the paper does for STC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from evim3.config import ModelConfig, get_preset

STRATEGIES = ("stc", "random", "tube")

# The paper's STC cells cover about 4 frames x 16 x 16 pixels: 4 x 1 x 1 patches for `evim3` (1 x 16 x 16
# patches) and 2 x 4 x 4 for `evim3-p4` (2 x 4 x 4 patches) -- configs/pretrain_echo_mamba_3d*.yaml.
_STC_CELL_FRAMES = 4
_STC_CELL_PIXELS = 16


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def default_mask_chains(model: str | ModelConfig) -> tuple[int, int]:
    """(time_chain, chain) of the STC mask for a preset name or config: cells of about 4 frames x 16 x 16
    pixels, each chain the largest that divides the patch grid. Gives the paper's 4/1 (`evim3`) and
    2/4 (`evim3-p4`)."""
    cfg = get_preset(model) if isinstance(model, str) else model
    L, H, _ = cfg.grid
    time_chain = _largest_divisor_at_most(L, _STC_CELL_FRAMES // cfg.time_patch)
    chain = _largest_divisor_at_most(H, _STC_CELL_PIXELS // cfg.patch)
    return time_chain, chain


def _cell_grid(grid: tuple[int, int, int], strategy: str, time_chain: int, chain: int) -> tuple[int, int, int]:
    L, H, W = grid
    if strategy == "random":
        return grid
    if strategy == "tube":
        return (1, H, W)
    return (math.ceil(L / time_chain), math.ceil(H / chain), math.ceil(W / chain))


def _upsample(cells: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(N, l, h, w) bool -> (N, L, H, W): the paper's F.interpolate(mode='nearest')."""
    if tuple(cells.shape[1:]) == tuple(grid):
        return cells
    return F.interpolate(cells.float()[:, None], size=grid, mode="nearest")[:, 0].bool()


def _patches_per_cell(size: int, cells: int) -> Tensor:
    """How many patches of one axis each coarse cell covers under nearest upsampling."""
    index = F.interpolate(torch.arange(cells, dtype=torch.float32)[None, None], size=size, mode="nearest")
    return torch.bincount(index.long().flatten(), minlength=cells)


def check_mask_options(
    grid: tuple[int, int, int], ratio: float, strategy: str, time_chain: int = 1, chain: int = 1,
    shared: bool = False,
) -> None:
    """Raise ValueError for options make_mask cannot honour: an unknown strategy, a ratio outside [0, 1],
    chains for a strategy without any, or STC cells of unequal size with per-sample masks (when a chain
    does not split the grid evenly, samples would hide different numbers of patches)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    if time_chain < 1 or chain < 1:
        raise ValueError(f"mask chains must be >= 1, got time_chain={time_chain}, chain={chain}")
    if strategy != "stc" and (time_chain, chain) != (1, 1):
        raise ValueError(f"time_chain/chain apply to the 'stc' strategy only, not {strategy!r}")
    if strategy == "stc" and not shared:
        cells = _cell_grid(grid, strategy, time_chain, chain)
        for size, count in zip(grid, cells):
            if len(set(_patches_per_cell(size, count).tolist())) > 1:
                raise ValueError(
                    f"time_chain={time_chain}, chain={chain} split the patch grid {tuple(grid)} into unequal "
                    "cells, so per-sample masks would hide different numbers of patches; choose chains "
                    "that divide the grid or use a shared mask"
                )


def make_mask(
    batch: int,
    grid: tuple[int, int, int],
    ratio: float,
    strategy: str = "stc",
    time_chain: int = 1,
    chain: int = 1,
    shared: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(batch, L, H, W) bool, True = masked: int(ratio * cells) cells hidden per sample (see module doc).

    Draws from `generator` (on its device) or torch's global RNG, and returns the mask on `device`.
    """
    check_mask_options(grid, ratio, strategy, time_chain, chain, shared)
    cells = _cell_grid(grid, strategy, time_chain, chain)
    num_cells = math.prod(cells)
    rows = 1 if shared else batch
    draw_device = generator.device if generator is not None else device
    # A uniform random subset of fixed size per row: the first `count` cells of a random permutation.
    noise = torch.rand(rows, num_cells, generator=generator, device=draw_device)
    chosen = noise.argsort(dim=1)[:, : int(ratio * num_cells)]
    hidden = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, chosen, True)
    mask = _upsample(hidden.view(rows, *cells), grid)
    return mask.expand(batch, -1, -1, -1).contiguous().to(device)
