"""The R(2+1)D-18 anchor has torchvision's architecture: its parameter count, and the shapes it maps."""

from __future__ import annotations

import torch

from evim3.models.r2plus1d import R2Plus1D18, R2Plus1D18EF


def test_parameter_count_is_torchvisions() -> None:
    """torchvision documents r2plus1d_18 (3 channels, 400 Kinetics classes) at 31,505,325 parameters; a
    wrong mid-channel rule, stem or downsample changes it."""
    assert sum(p.numel() for p in R2Plus1D18(3, 400).parameters()) == 31_505_325
    widths = [m.out_channels for m in R2Plus1D18(3, 400).modules() if isinstance(m, torch.nn.Conv3d)]
    assert widths[:2] == [45, 64] and widths.count(512) == 5  # stem; stage 4: 2 blocks x 2 + downsample


def test_ef_model_starts_at_the_mean_and_responds_to_its_input() -> None:
    torch.manual_seed(0)
    model = R2Plus1D18EF(ef_mean=55.0, ef_std=12.0).eval()
    clips = torch.randn(3, 1, 8, 32, 32)
    with torch.no_grad():
        ef = model(clips)[:, 0]
    assert ef.shape == (3,) and torch.allclose(ef, torch.full((3,), 55.0), atol=1.0)  # fc weights ~N(0, 0.01)
    assert ef.std() > 1e-4  # a function of the clip, not a constant
    model.train()
    model(clips).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
