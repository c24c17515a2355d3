"""The matmul floor of `python -m benchmarks export` times the model's own GEMMs: every linear layer call and
the patch Conv3d, with the shapes of a real forward pass (checked against the parameter-shape arithmetic)."""

from __future__ import annotations

import torch

from benchmarks.bench_export import linear_shapes
from evim3.config import get_preset
from evim3.models.evim3 import EViM3

CFG = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)


def test_linear_shapes_are_the_models_gemms() -> None:
    torch.manual_seed(0)
    model = EViM3(CFG, ef_mean=55.0).eval()
    shapes = linear_shapes(model, torch.randn(1, 1, CFG.frames, CFG.img_size, CFG.img_size))
    units = 6 * CFG.depth
    head = 1 + CFG.head_layers  # Linear + SiLU, then the MLP
    assert len(shapes) == 4 * units + head + 1, shapes
    S, D, Di, r, n = CFG.num_tokens, CFG.dim, CFG.d_inner, CFG.dt_rank, CFG.d_state
    mamba = {(S, D, 2 * Di), (S, Di, r + 2 * n), (S, r, Di), (S, Di, D)}  # in, x, dt, out projections
    assert sum(s in mamba for s in shapes) == 4 * units
    patch = CFG.in_channels * CFG.time_patch * CFG.patch ** 2
    assert (CFG.num_real_tokens, patch, D) in shapes  # the patch Conv3d as a GEMM
    assert shapes[-1] == (1, CFG.final_dim, 1)  # the EF output layer
