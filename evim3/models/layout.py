"""Where every token sits: the Enclosure Global Token layout and the scan orders (Psi) as index tables.

The padded token volume (Lp, Hp, Wp) is kept flattened in LHW order (last axis fastest). Everything here
is an integer table computed once per geometry, so the model runs -- and exports -- as plain Gathers.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from evim3.config import ModelConfig

# Rows of the global token table, in this order: 6 faces, 12 edges, 8 corners, 1 register.
NUM_FACES, NUM_EDGES, NUM_CORNERS = 6, 12, 8
NUM_GLOBAL_KINDS = NUM_FACES + NUM_EDGES + NUM_CORNERS + 1
_EDGE_AXIS_PAIRS = ((0, 1), (0, 2), (1, 2))  # (L,H), (L,W), (H,W): edges 0-3, 4-7, 8-11

# Scan directions, named by flatten order (last axis fastest), as axis permutations of (L, H, W).
DIRECTIONS = {"hwl": (1, 2, 0), "lwh": (0, 2, 1), "lhw": (0, 1, 2)}
BLOCK_ORDER = ("hwl", "lwh", "lhw")  # the order a Mamba-3D block visits them


@functools.cache
def enclosure_layout(cfg: ModelConfig) -> np.ndarray:
    """For every position of the padded volume (LHW-flattened), where its token comes from.

    Values 0..R-1 are real tokens (R = number of patches, in LHW order); R + k is row k of the global
    token table. A position on a global plane of some axis is global; among those, the number of axes
    at which it sits on the outer boundary (first/last plane) makes it a face (1), edge (2) or corner
    (3), and 0 makes it a register token (interior global planes). The paper assigns ids as below.
    """
    Lp, Hp, Wp = cfg.padded_grid
    coords = np.stack(np.meshgrid(np.arange(Lp), np.arange(Hp), np.arange(Wp), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    sizes = np.array([Lp, Hp, Wp])
    planes = [np.isin(coords[:, a], cfg.global_planes[a]) for a in range(3)]
    on_global = planes[0] | planes[1] | planes[2]
    at_first = coords == 0
    at_last = coords == sizes - 1
    boundary = at_first | at_last
    n_boundary = boundary.sum(1)
    bit = at_last.astype(np.int64)  # 0 = first plane, 1 = last plane, per axis

    num_real = cfg.num_real_tokens
    source = np.full(len(coords), -1, dtype=np.int64)
    source[~on_global] = np.arange(num_real)

    face = n_boundary == 1
    axis = boundary[face].argmax(1)
    source[face] = num_real + 2 * axis + bit[face, axis]

    edge = n_boundary == 2
    edge_id = np.zeros(edge.sum(), dtype=np.int64)
    for pair_index, (a, b) in enumerate(_EDGE_AXIS_PAIRS):
        this_pair = boundary[edge, a] & boundary[edge, b]
        edge_id[this_pair] = 4 * pair_index + bit[edge, a][this_pair] + 2 * bit[edge, b][this_pair]
    source[edge] = num_real + NUM_FACES + edge_id

    corner = n_boundary == 3
    source[corner] = num_real + NUM_FACES + NUM_EDGES + bit[corner] @ np.array([1, 2, 4])

    register = on_global & (n_boundary == 0)
    source[register] = num_real + NUM_FACES + NUM_EDGES + NUM_CORNERS
    assert (source >= 0).all()
    return source


@functools.cache
def real_positions(cfg: ModelConfig) -> np.ndarray:
    """Flat LHW positions of the real tokens, in patch order."""
    return np.flatnonzero(enclosure_layout(cfg) < cfg.num_real_tokens)


@functools.cache
def global_positions(cfg: ModelConfig) -> np.ndarray:
    """Flat LHW positions of every global token (faces, edges, corners, register planes)."""
    return np.flatnonzero(enclosure_layout(cfg) >= cfg.num_real_tokens)


@functools.cache
def intersection_positions(cfg: ModelConfig) -> np.ndarray:
    """Flat positions of the (2+reg)^3 tokens where global planes of all three axes cross (L-major, H, W)."""
    _, Hp, Wp = cfg.padded_grid
    gl, gh, gw = (np.asarray(p) for p in cfg.global_planes)
    return (gl[:, None, None] * Hp * Wp + gh[None, :, None] * Wp + gw[None, None, :]).reshape(-1)


@functools.cache
def direction_order(shape: tuple[int, int, int], direction: str) -> np.ndarray:
    """Flat LHW positions listed in `direction`'s scan order (= permute + flatten of the volume)."""
    return np.arange(int(np.prod(shape))).reshape(shape).transpose(DIRECTIONS[direction]).reshape(-1)


def scan_orders(shape: tuple[int, int, int], keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Psi: the three gathers a Mamba-3D block applies, LHW -> HWL -> LWH -> LHW.

    Without `keep`, the full volume: three 1-D index tensors of length Lp*Hp*Wp (applied along dim 1).
    With `keep` (N, S) bool, the same number of True per row: the sequence holds only the kept tokens
    (in LHW order) and the gathers are (N, S') tensors over it -- the paper's token-skipping encoder.
    Computed once per batch and reused by every block.
    """
    S = int(np.prod(shape))
    device = keep.device if keep is not None else None
    squeeze = keep is None
    if keep is None:
        keep = torch.ones(1, S, dtype=torch.bool)
    # rank[n, p]: index of position p within row n's kept LHW sequence.
    rank = torch.cumsum(keep.long(), dim=1) - 1
    kept_in = {}
    for name in BLOCK_ORDER:
        order = torch.as_tensor(direction_order(shape, name), device=device)
        kept_mask = keep[:, order]
        positions = order.expand_as(kept_mask)[kept_mask].view(keep.shape[0], -1)  # kept positions, dir order
        kept_in[name] = torch.gather(rank, 1, positions)  # sequence index (in LHW-kept order) of each
    # Gather from the previous direction's sequence: prev_seq[inv(prev)[cur]] == lhw_seq[cur].
    orders, previous = [], torch.arange(kept_in["lhw"].shape[1], device=device).expand_as(kept_in["lhw"])
    for name in BLOCK_ORDER:
        inverse = torch.empty_like(previous).scatter_(1, previous, torch.arange(
            previous.shape[1], device=device).expand_as(previous).contiguous())
        orders.append(torch.gather(inverse, 1, kept_in[name]))
        previous = kept_in[name]
    if squeeze:
        return tuple(o[0] for o in orders)  # type: ignore[return-value]
    return tuple(orders)  # type: ignore[return-value]


def permute_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (N, S, D) gathered along the sequence: a shared 1-D index, or a per-sample (N, S') index."""
    if index.dim() == 1:
        return x.index_select(1, index)
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
