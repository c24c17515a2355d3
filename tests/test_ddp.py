"""A real two-process data-parallel run on the CPU (torchrun, gloo) through `evim3 train --nproc 2`, and the
sampler that shards the data between processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evim3.cli.main import app
from typer.testing import CliRunner

from evim3.checkpoint import load_model
from evim3.train.evaluate import evaluate_checkpoint
from evim3.train.sampling import EpochSampler


def test_two_processes_train_identical_weights_and_reduce_metrics(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # 8 TRAIN videos over 2 ranks x batch 2 x accum 2: one optimizer step per epoch; the first micro-batch
    # of each step runs under no_sync, so a wrong accumulation would leave the ranks apart.
    common = ["--device", "cpu", "--data", str(synth_dataset), "--preset", "evim3-tiny", "--frames", "8",
              "--model-set", "img_size=32", "--model-set", "dim=16", "--model-set", "depth=1", "--model-set", "d_state=4",
              "--model-set", "final_dim=32", "--epochs", "3", "--workers", "0", "--ema-start", "2"]
    command = [sys.executable, "-m", "evim3.cli.main", "train", "finetune", "--nproc", "2", "--out", str(out),
               "--batch", "2", "--accum", "2", *common]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env,
                            stdin=subprocess.DEVNULL)
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

    # One process with the same global batch (2 x accum 4) sees the same clips, augmented alike, so it takes
    # the same steps: equal weights up to float32 summation order. Tolerance 1e-5: the measured difference is
    # 2.5e-7; one step of Adam moves a weight by up to its lr (2.5e-5), so different data (whose gradients
    # differ in sign somewhere) would leave weights ~1e-5 to 1e-4 apart.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes (OMP_NUM_THREADS=1)
    try:
        single = CliRunner().invoke(app, ["train", "finetune", "--out", str(tmp_path / "one"), "--batch", "2",
                                          "--accum", "4", *common])
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one_summary["world_size"] == 1 and one_summary["lr"] == summary["lr"]
    assert one_summary["best"]["val_mae"] == pytest.approx(summary["best"]["val_mae"], abs=1e-4)
    two, _ = load_model(out / "last.safetensors")
    one, _ = load_model(tmp_path / "one" / "last.safetensors")
    difference = max((a - b).abs().max().item() for a, b in zip(two.state_dict().values(), one.state_dict().values()))
    assert difference <= 1e-5


@pytest.mark.parametrize("videos", [8, 9])
def test_shards_are_disjoint_and_interleave_to_the_single_process_order(videos: int) -> None:
    """Rank r of N takes positions r, r + N, ... of the one shuffled order, with the seed of that position:
    the ranks together load what one process would, each item once (9 videos: one padded repeat)."""
    single = list(EpochSampler(range(videos), 1, 0, shuffle=True, seed=3))
    shards = [list(EpochSampler(range(videos), 2, rank, shuffle=True, seed=3)) for rank in (0, 1)]
    indices = [{index for index, _ in shard} for shard in shards]
    assert indices[0] | indices[1] == set(range(videos))
    assert len(shards[0]) == len(shards[1]) == -(-videos // 2)
    assert len(indices[0] & indices[1]) == len(shards[0]) * 2 - videos  # only DistributedSampler's padding
    interleaved = [pair for pairs in zip(*shards) for pair in pairs]
    assert interleaved[:videos] == single
