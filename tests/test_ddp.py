"""A real two-process data-parallel run on the CPU (torchrun, gloo) through `evim3 train --nproc 2`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evim3.train.evaluate import evaluate_checkpoint


def test_two_processes_train_identical_weights_and_reduce_metrics(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # 8 TRAIN videos over 2 ranks x batch 2 x accum 2: one optimizer step per epoch; the first micro-batch
    # of each step runs under no_sync, so a wrong accumulation would leave the ranks apart.
    command = [sys.executable, "-m", "evim3.cli.main", "train", "finetune", "--nproc", "2", "--device", "cpu",
               "--data", str(synth_dataset), "--out", str(out), "--preset", "evim3-tiny", "--frames", "8",
               "--model-set", "img_size=32", "--model-set", "dim=16", "--model-set", "depth=1", "--model-set", "d_state=4", "--model-set", "final_dim=32",
               "--batch", "2", "--accum", "2", "--epochs", "3", "--workers", "0", "--ema-start", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == summary["total_steps"] == 3
    assert summary["lr"] == pytest.approx(1e-4 * (2 * 2 * 2) / 32)  # scaled by the total batch over both ranks
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests

    # Each rank validated its half of VAL; the gathered metric is the whole split's: a single-process
    # evaluation of the same weights agrees (tolerance: float32 forward passes, batch size differs).
    report = evaluate_checkpoint(out, data=str(synth_dataset), split="val", clips="first", workers=0, device="cpu",
                                 resamples=0, out=str(tmp_path / "eval"))
    assert report["n"] == 2
    assert report["mae"] == pytest.approx(summary["best"]["val_mae"], abs=1e-3)
