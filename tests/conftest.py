"""Fixtures shared across the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from evim3.data.synth import generate_dataset

# Without a GPU, Triton runs only through its interpreter, and triton.language's own @jit helpers (reductions,
# scans) are defined when triton is first imported: whichever test imports it first (the dispatcher, `evim3
# info`) must already see TRITON_INTERPRET, or the interpreted kernels of test_scan_triton.py fail to call them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SYNTH_VIDEOS = 12
SYNTH_SEED = 7
SYNTH_FRAME_RANGE = (48, 96)  # short, yet longer than one 32-frame clip at period 2 for most videos


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a small synthetic EchoNet-Dynamic-layout dataset, generated once per test session.

    12 short videos (8 TRAIN, 2 VAL, 2 TEST), mostly 112x112 at 50 fps, with one video at another size
    and one at another frame rate. Read-only: tests that need to change it copy it first.
    """
    root = tmp_path_factory.mktemp("synth") / "echonet"
    generate_dataset(root, SYNTH_VIDEOS, seed=SYNTH_SEED, frame_range=SYNTH_FRAME_RANGE)
    return root
