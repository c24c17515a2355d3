"""The PyTorch side of `evim3 check`: the reference outputs (the "golden" set) from a checkpoint.

The comparison itself lives in evim3.runtime.parity_check, torch-free, so that a machine without torch
can check its engine against a golden file written here.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from evim3.runtime.parity_check import Golden, parity_inputs

from evim3.checkpoint import load_model
from evim3.models.evim3 import EViM3


def torch_outputs(model: EViM3, clips: np.ndarray) -> np.ndarray:
    """(N, K) float32 outputs of the fp32 model on CPU, one clip at a time (bounded memory for big presets)."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(clip[None])).float().numpy() for clip in clips])


def make_golden(checkpoint: str | os.PathLike, *, preset: str | None = None, clips: int = 4,
                seed: int = 0, videos: list[str] = ()) -> Golden:
    """`clips` seeded random clips, the real echo clip and the first clip of each of `videos`, and the
    checkpoint's PyTorch outputs on them."""
    model, meta = load_model(checkpoint, preset=preset)
    inputs, names = parity_inputs(meta.preprocess, clips, seed, videos)
    return Golden(inputs, names, torch_outputs(model, inputs), meta)
