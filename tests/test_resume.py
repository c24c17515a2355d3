"""Resuming: an interrupted and resumed run ends with the same weights as an uninterrupted one, and a run
killed with SIGKILL continues from its last checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from evim3.train.loop import train
from evim3.train.recipe import TrainConfig
from evim3.train.state import STATE_FILE, load_state

# evim3-tiny shrunk to tens of milliseconds a step.
TINY = {"preset": "evim3-tiny", "frames": 8,
        "model_overrides": {"img_size": 32, "dim": 16, "depth": 1, "d_state": 4, "final_dim": 32}}


def config(data: Path, out: Path, **changes) -> TrainConfig:
    # 8 TRAIN videos, batch 2 x accum 2: 2 steps per epoch, 3 epochs = 6 steps; EMA from step 2, every step;
    # random crops (pad 12) and random clip starts on: the data randomness has to resume too.
    base = dict(stage="finetune", data=str(data), out=str(out), epochs=3, batch=2, accum=2, workers=0,
                ema_start=2, ema_every=1, device="cpu", log_every=1, **TINY)
    return TrainConfig(**{**base, **changes})


def test_interrupted_and_resumed_run_matches_the_straight_run(synth_dataset: Path, tmp_path: Path) -> None:
    straight = train(config(synth_dataset, tmp_path / "straight"))
    assert straight["step"] == 6

    first = train(config(synth_dataset, tmp_path / "resumed"), stop_after=3)  # mid-epoch 2
    assert first["status"] == "stopped" and first["step"] == 3
    # Resume with 2 loader processes instead of none: per-item seeds make the data identical anyway.
    second = train(config(synth_dataset, tmp_path / "resumed", resume=True, workers=2))
    assert second["resumed_from"] == 3 and second["status"] == "finished" and second["step"] == 6

    a, b = load_state(tmp_path / "straight" / STATE_FILE), load_state(tmp_path / "resumed" / STATE_FILE)
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"  # bitwise
    for index, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["optimizer"]["state"][index]["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert straight["best"] == second["best"] and straight["final"] == second["final"]
    assert straight["rank_weight_digests"] == second["rank_weight_digests"]

    assert logged_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5, 6]


def test_sigkill_loses_at_most_one_checkpoint_interval(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # 4 steps per epoch x 5 epochs; a checkpoint every 3 steps and at each epoch end.
    settings = {"epochs": 5, "accum": 1, "ckpt_every": 3, "ema_every": 5}
    command = [sys.executable, "-m", "evim3.cli.main", "train", "finetune", "--data", str(synth_dataset),
               "--out", str(out), "--preset", "evim3-tiny", "--frames", "8", "--batch", "2", "--accum", "1",
               "--epochs", "5", "--ckpt-every", "3", "--workers", "0", "--ema-start", "2", "--device", "cpu",
               "--log-every", "1"]
    for key, value in TINY["model_overrides"].items():
        command += ["--model-set", f"{key}={value}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / STATE_FILE).exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    saved_step = load_state(out / STATE_FILE)["step"]  # a complete checkpoint, whatever the kill interrupted
    assert saved_step > 0 and (saved_step % 3 == 0 or saved_step % 4 == 0)  # --ckpt-every 3, or an epoch end
    assert max(logged_steps(out)) - saved_step < 3  # at most one interval of work lost

    summary = train(config(synth_dataset, out, resume=True, **settings))
    assert summary["resumed_from"] == saved_step
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 20
    assert logged_steps(out) == list(range(1, 21))  # rows of the lost interval were dropped, then written again
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == saved_step


def logged_steps(out: Path) -> list[int]:
    with open(out / "steps.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("EVIM3_DEBUG", None)
    return env
