"""A two-class model through the whole product: `evim3 train` (one step) -> `evim3 export` -> `evim3 infer`
-> `evim3 check`. The network has one output (the logit of the second class); every reader of it must say
two probabilities, the same ones PyTorch's sigmoid gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evim3.cli.main import app
from evim3.runtime.preprocess import sample_clip_indices, sliding_clip_starts, video_to_input
from evim3.runtime.video import read_video
from test_train import FAST_ARGS, TINY_ARGS, read_rows
from typer.testing import CliRunner

from evim3.checkpoint import load_model, save_checkpoint

CLASSES = ["normal", "reduced"]
LOGIT_SCALE = 3000.0  # the reference then spreads ~0.7 logit over the golden clips: above the flat bound


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def binary_run(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("binary")
    table = root / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for row in read_rows(synth_dataset / "FileList.csv"):
            label = CLASSES[float(row["EF"]) < 55]
            writer.writerow([synth_dataset / "Videos" / f"{row['FileName']}.avi", label, row["Split"]])
    out = root / "run"
    trained = run_cli("train", "finetune", "--task", "classification", "--csv", table, "--out", out,
                      "--max-steps", "1", *TINY_ARGS, *FAST_ARGS)
    assert trained.exit_code == 0, trained.output
    # One step leaves the logit near 0 for every clip (measured 1.2e-3..1.5e-3), where a sigmoid or parity
    # check could not tell a right answer from a wrong one: scale the logit so it varies by whole units.
    model, meta = load_model(out / "last.safetensors")
    with torch.no_grad():
        model.head.mlp[-1].weight.mul_(LOGIT_SCALE)
        model.head.mlp[-1].bias.mul_(LOGIT_SCALE)
    checkpoint = root / "binary.safetensors"
    save_checkpoint(checkpoint, model.state_dict(), meta)
    onnx_path = root / "binary.onnx"
    exported = run_cli("export", checkpoint, "-o", onnx_path)
    assert exported.exit_code == 0, exported.output
    return {"root": root, "checkpoint": checkpoint, "onnx": onnx_path, "data": synth_dataset}


def test_binary_model_has_one_output_and_infer_reports_its_sigmoid(binary_run: dict) -> None:
    model, meta = load_model(binary_run["checkpoint"])
    assert meta.class_names == CLASSES and model.head.mlp[-1].out_features == 1
    video = min((binary_run["data"] / "Videos").glob("*.avi"))
    out = binary_run["root"] / "infer.json"
    result = run_cli("infer", video, "--model", binary_run["onnx"], "--stride", "4", "--json", out)
    assert result.exit_code == 0, result.output
    assert "p(normal)" in result.stdout  # (the terminal is too narrow for the last column)
    source = json.loads(out.read_text())["sources"][0]

    frames = video_to_input(read_video(video), meta.preprocess)
    starts = sliding_clip_starts(len(frames), meta.preprocess, 4)
    clips = np.stack([frames[sample_clip_indices(len(frames), meta.preprocess, s)] for s in starts])
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(clips[:, None]))[:, 0]).double().numpy()
    assert len(source["clips"]) == len(starts)
    reported = np.array([[c["probabilities"][n] for n in CLASSES] for c in source["clips"]])
    # ONNX Runtime vs PyTorch float32 logits (parity <= 1e-4), through the sigmoid (slope <= 1/4).
    np.testing.assert_allclose(reported, np.stack([1 - p, p], 1), atol=3e-5)
    assert source["prediction"] == CLASSES[int(np.mean(p) > 0.5)]


def test_binary_model_passes_check(binary_run: dict) -> None:
    # Real content (dataset videos) joins the golden clips, as users are told to check.
    result = run_cli("check", binary_run["checkpoint"], "--onnx", binary_run["onnx"], "--clips", "2",
                     "--data", binary_run["data"])
    assert result.exit_code == 0, result.output
    assert "mean |dprob|" in result.output and "parity: pass" in result.output
