"""Metrics (MAE, RMSE, R^2, bootstrap intervals, AUC, accuracy) and `evim3 eval` on real checkpoints."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evim3.cli.main import app
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from PIL import Image
from typer.testing import CliRunner

from evim3.checkpoint import save_checkpoint
from evim3.config import get_preset
from evim3.data.echonet import EchoNetDataset
from evim3.models.evim3 import EViM3
from evim3.train.metrics import (
    binary_auc,
    bootstrap_ci,
    classification_report,
    is_collapsed,
    mae,
    r2,
    regression_report,
    rmse,
)

CFG = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
SPEC = PreprocessSpec(size=32, fps=50.0, frames=8, period=2, mean=40.0, std=50.0)


# --- metrics ----------------------------------------------------------------------------------------

def test_regression_metrics_by_hand() -> None:
    true, predicted = np.array([50.0, 60.0, 70.0]), np.array([52.0, 57.0, 70.0])
    assert mae(true, predicted) == pytest.approx(5 / 3)
    assert rmse(true, predicted) == pytest.approx(np.sqrt(13 / 3))
    assert r2(true, predicted) == pytest.approx(1 - 13 / 200)
    assert r2(true, np.full(3, 60.0)) == pytest.approx(0.0)  # the mean predictor explains nothing
    assert np.isnan(r2(np.full(3, 5.0), predicted))


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)
    intervals = {}
    for n in (30, 3000):
        true = rng.uniform(20, 80, n)
        predicted = true + rng.normal(0, 5, n)
        low, high = bootstrap_ci(mae, true, predicted, resamples=500, seed=1)
        assert low < mae(true, predicted) < high
        assert (low, high) == bootstrap_ci(mae, true, predicted, resamples=500, seed=1)  # seeded: repeatable
        intervals[n] = high - low
    assert intervals[3000] < intervals[30] / 4
    report = regression_report(true, predicted, resamples=200)
    assert report["r2_lo"] < report["r2"] < report["r2_hi"] and report["n"] == 3000


def test_regression_report_shows_a_collapsed_model() -> None:
    """A model answering ~the mean for every video can have a fair MAE; its prediction spread gives it away."""
    rng = np.random.default_rng(4)
    true = rng.uniform(20, 80, 60)
    flat = np.full_like(true, true.mean()) + rng.normal(0, 0.01, 60)
    responsive = true + rng.normal(0, 5, 60)
    flat_report, responsive_report = regression_report(true, flat, resamples=0), regression_report(true, responsive, resamples=0)
    assert flat_report["true_std"] == pytest.approx(np.std(true)) == responsive_report["true_std"]
    assert flat_report["pred_std"] < 0.02 and responsive_report["pred_std"] == pytest.approx(np.std(responsive))
    assert is_collapsed(flat_report) and not is_collapsed(responsive_report)


def test_auc_matches_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40).astype(bool)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert binary_auc(labels, scores) == pytest.approx(expected)
    assert binary_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert np.isnan(binary_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_classification_report_binary_and_multiclass() -> None:
    binary = classification_report(np.array([0, 1, 1, 0]), np.array([[-1.0], [2.0], [-0.5], [-3.0]]))
    assert binary["accuracy"] == 0.75 and binary["auc"] == 1.0
    logits = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    multi = classification_report(np.array([0, 1, 2, 1]), logits)
    assert multi["accuracy"] == 0.75 and 0 < multi["auc"] <= 1


# --- evim3 eval ---------------------------------------------------------------------------------------

def ef_checkpoint(path: Path, stage: str = "finetune") -> EViM3:
    torch.manual_seed(0)
    model = EViM3(CFG, ef_mean=55.0).eval()
    meta = ModelMeta(preset="evim3-tiny", model=CFG.to_dict(), preprocess=SPEC, ef_mean=55.0, data={"stage": stage})
    save_checkpoint(path, model.state_dict(), meta)
    return model


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("clips", ["first", "all", "3"])
def test_eval_writes_predictions_metrics_and_plots(synth_dataset: Path, tmp_path: Path, clips: str) -> None:
    model = ef_checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model.safetensors"), "--data", str(synth_dataset),
                                      "--split", "test", "--clips", clips, "--out", str(out), "--workers", "0",
                                      "--device", "cpu", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "MAE" in result.output and "95% CI" in result.output

    dataset = EchoNetDataset(synth_dataset, "TEST", SPEC, clips="first" if clips == "first" else
                             ("all" if clips == "all" else int(clips)))
    rows = read_rows(out / "predictions.csv")
    assert [row["file"] for row in rows] == dataset.files
    for row, item in zip(rows, dataset):
        clip_values = [float(v) for v in row["clip_predictions"].split()]
        x = item["x"] if item["x"].dim() == 5 else item["x"][None]
        with torch.no_grad():
            direct = model(x)[:, 0].numpy()
        # Tolerance: the CSV keeps 4 decimals.
        np.testing.assert_allclose(clip_values, direct, atol=1e-4)
        assert float(row["predicted"]) == pytest.approx(np.mean(clip_values), abs=1e-4)
        assert float(row["true"]) == pytest.approx(item["ef"].item(), abs=1e-4)
        assert int(row["clips"]) == len(clip_values) == len(row["clip_starts"].split())

    metrics = json.loads((out / "metrics.json").read_text())
    true, predicted = (np.array([float(r[k]) for r in rows]) for k in ("true", "predicted"))
    assert metrics["mae"] == pytest.approx(mae(true, predicted), abs=1e-3)
    assert metrics["mae_lo"] <= metrics["mae"] <= metrics["mae_hi"]
    for name in ("scatter.png", "bland_altman.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200


def test_eval_classification(synth_dataset: Path, tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for row in read_rows(synth_dataset / "FileList.csv"):
            label = "reduced" if float(row["EF"]) < 55 else "normal"
            writer.writerow([f"{synth_dataset}/Videos/{row['FileName']}.avi", label, row["Split"]])
    model = EViM3(CFG, task="classification", num_classes=2)
    meta = ModelMeta(preset="evim3-tiny", model=CFG.to_dict(), preprocess=SPEC, task="classification",
                     class_names=["normal", "reduced"])
    save_checkpoint(tmp_path / "cls.safetensors", model.state_dict(), meta)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "cls.safetensors"), "--csv", str(table), "--split", "all",
                                      "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_rows(out / "predictions.csv")
    assert metrics["n"] == len(rows) == 12 and 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["auc"] <= 1
    assert {row["true"] for row in rows} <= {"normal", "reduced"}


def test_eval_rejects_pretraining_checkpoints_and_missing_data(synth_dataset: Path, tmp_path: Path) -> None:
    ef_checkpoint(tmp_path / "pre.safetensors", stage="pretrain")
    runner = CliRunner()
    pre = runner.invoke(app, ["eval", str(tmp_path / "pre.safetensors"), "--data", str(synth_dataset)])
    assert pre.exit_code == 1 and "pre-training" in pre.output and "Traceback" not in pre.output

    ef_checkpoint(tmp_path / "model.safetensors")
    no_data = runner.invoke(app, ["eval", str(tmp_path / "model.safetensors")])
    assert no_data.exit_code == 1 and "--data" in no_data.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "model.safetensors"), "--data", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "not a folder" in missing.output
    bad_clips = runner.invoke(app, ["eval", str(tmp_path / "model.safetensors"), "--data", str(synth_dataset),
                                    "--clips", "some"])
    assert bad_clips.exit_code == 1 and "--clips" in bad_clips.output
