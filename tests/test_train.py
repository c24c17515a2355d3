"""`evim3 train`: the recipe (schedule, optimizer groups, EMA) and real fine-tuning / pre-training runs of
a shrunk evim3-tiny on the synthetic dataset, through the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from evim3.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from evim3.checkpoint import load_model, read_meta
from evim3.data.echonet import EchoNetDataset
from evim3.data.stats import compute_mean_std
from evim3.models.evim3 import EViM3
from evim3.tasks.ef import batch_correlation, ef_loss
from evim3.train.recipe import TrainConfig, build_ema, build_optimizer, build_scheduler, ema_decay, lr_factor
from evim3.train.tasks import load_encoder_weights

# evim3-tiny shrunk to tens of milliseconds a step: 8 frames of 32 x 32, width 16, one Mamba-3D block.
TINY_ARGS = ["--preset", "evim3-tiny", "--frames", "8", "--model-set", "img_size=32", "--model-set", "dim=16",
             "--model-set", "depth=1", "--model-set", "d_state=4", "--model-set", "final_dim=32", "--model-set", "decoder_depth=1"]
# 8 TRAIN videos, batch 2 x accum 2: 2 optimizer steps per epoch. EMA from step 2, so best != raw weights.
FAST_ARGS = ["--batch", "2", "--accum", "2", "--workers", "0", "--ema-start", "2", "--device", "cpu", "--log-every", "1"]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def finetune(data: Path, out: Path, *extra: str):
    return run_cli("train", "finetune", "--data", data, "--out", out, *TINY_ARGS, *FAST_ARGS, *extra)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- recipe ---------------------------------------------------------------------------------------

def test_schedule_warms_up_from_one_percent_then_cosine_to_one_percent() -> None:
    warmup, total = 10, 110
    factors = [lr_factor(step, warmup, total, 0.01) for step in range(total + 1)]
    assert factors[0] == pytest.approx(0.01) and factors[warmup] == pytest.approx(1.0)
    assert factors[total] == pytest.approx(0.01)
    assert factors[warmup + 50] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert all(a < b for a, b in itertools.pairwise(factors[: warmup + 1]))
    assert all(a > b for a, b in itertools.pairwise(factors[warmup:]))

    model = torch.nn.Linear(3, 3)
    optimizer = build_optimizer(model, lr=2e-3, cfg=TrainConfig(stage="finetune", out="unused"))
    scheduler = build_scheduler(optimizer, warmup, total, 0.01, 1.0)
    for _ in range(warmup + 50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * factors[warmup + 50])


def test_schedule_holds_the_peak_lr_before_a_shorter_cosine() -> None:
    warmup, total = 10, 110  # 100 steps after the warm-up; the last 40 take the cosine
    factors = [lr_factor(step, warmup, total, 0.01, decay_fraction=0.4) for step in range(total + 1)]
    assert factors[:warmup + 1] == [lr_factor(step, warmup, total, 0.01) for step in range(warmup + 1)]
    assert factors[warmup:71] == [1.0] * 61
    assert factors[90] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the 40-step cosine
    assert factors[total] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(factors[70:]))
    with pytest.raises(ValueError, match="decay_fraction"):
        TrainConfig(stage="finetune", out="unused", decay_fraction=0.0)


def test_paper_defaults_and_lr_scaling() -> None:
    finetune_cfg = TrainConfig(stage="finetune", out="unused")
    pretrain_cfg = TrainConfig(stage="pretrain", out="unused")
    assert (finetune_cfg.lr, finetune_cfg.clip_grad, finetune_cfg.epochs, finetune_cfg.warmup_epochs) == (1e-4, 1.0, 50, 1)
    assert (pretrain_cfg.lr, pretrain_cfg.clip_grad, pretrain_cfg.epochs, pretrain_cfg.warmup_epochs) == (1e-3, 0.1, 100, 5)
    assert finetune_cfg.model_config().frames == 64 and finetune_cfg.preprocess_spec().period == 2
    # 4 clips x 4 accumulated x 2 processes = 32 -> the configured lr; 1 process -> half.
    assert finetune_cfg.scaled_lr(2) == pytest.approx(1e-4) and finetune_cfg.scaled_lr(1) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(stage="finetune", out="unused", preset="nope")


def test_batch_correlation_is_pearsons_r_and_zero_where_undefined() -> None:
    g = torch.Generator().manual_seed(0)
    predicted, true = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([predicted, true]))[0, 1]
    assert float(batch_correlation(predicted, true)) == pytest.approx(float(expected), rel=1e-6)
    assert float(batch_correlation(3 * predicted + 1, true)) == pytest.approx(float(expected), rel=1e-6)  # scale-free
    assert float(batch_correlation(predicted[:2], true[:2])) == 0.0  # fewer than 3 clips
    assert float(batch_correlation(predicted, torch.full((8,), 50.0))) == 0.0  # all true EF equal


def test_correlation_term_pulls_a_flat_output_towards_the_truth() -> None:
    """At a near-constant output (the collapse), MSE's gradient is the residual, ~ef_std^-2 small per clip; the
    correlation term's is large, and a small step against it raises the correlation with the truth."""
    true = torch.tensor([20.0, 35.0, 50.0, 65.0, 80.0, 55.0])
    predicted = torch.full_like(true, true.mean().item()) + 1e-3 * torch.randn(6, generator=torch.Generator().manual_seed(1))
    predicted.requires_grad_(True)
    ef_loss(predicted, true, ef_std=12.0, kind="mse").backward()
    mse_grad = predicted.grad.clone()
    predicted.grad = None
    ef_loss(predicted, true, ef_std=12.0, kind="mse+corr").backward()
    corr_grad = predicted.grad - mse_grad
    assert corr_grad.abs().max() > 10 * mse_grad.abs().max()
    with torch.no_grad():
        step = 1e-4 * corr_grad / corr_grad.norm()  # a tenth of the output's own spread
        assert batch_correlation(predicted - step, true) > batch_correlation(predicted, true) + 0.05
    with pytest.raises(ValueError, match="unknown EF loss"):
        TrainConfig(stage="finetune", out="x", ef_loss="l1")


def test_optimizer_skips_decay_for_norms_biases_tokens_and_ssm_parameters() -> None:
    cfg = TrainConfig(stage="finetune", out="unused", preset="evim3-tiny", model_overrides={"depth": 1})
    model = EViM3(cfg.model_config())
    optimizer = build_optimizer(model, 1e-4, cfg)
    decayed, undecayed = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0 and optimizer.defaults["eps"] == 1e-15
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert any(name.endswith("A_log") for name in undecayed_names) and any("pos_embed" in n for n in undecayed_names)
    assert any("global_faces_token" in n for n in undecayed_names)
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))


def test_ema_copies_then_follows_the_warmed_up_decay() -> None:
    cfg = TrainConfig(stage="finetune", out="unused", ema_every=5)
    model = torch.nn.Linear(4, 2)
    ema = build_ema(model, cfg)
    ema.update_parameters(model)  # first update: a copy
    assert torch.equal(ema.module.weight, model.weight)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    decay = ema_decay(1, cfg.ema_beta, cfg.ema_power, cfg.ema_every)
    assert decay == pytest.approx(1 - 5**-0.75)
    # Tolerance: float32 lerp vs the same formula in float32.
    torch.testing.assert_close(ema.module.weight, decay * before + (1 - decay) * model.weight, rtol=0, atol=1e-6)
    assert ema_decay(10**9, 0.9999, 0.75, 5) == 0.9999
    assert ema_decay(3, 0.9, 0.0, 5) == 0.9


# --- real runs --------------------------------------------------------------------------------------

def test_finetune_ef_writes_checkpoints_logs_and_metadata(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = finetune(synth_dataset, out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "finished" in result.output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 4
    assert summary["steps_per_epoch"] == 2 and summary["world_size"] == 1

    meta = read_meta(out / "best.safetensors")
    train_set = EchoNetDataset(synth_dataset, "TRAIN", meta.preprocess)
    assert meta.preset == "evim3-tiny" and meta.task == "ef"
    assert meta.model["frames"] == 8 and meta.model["dim"] == 16 and meta.preprocess.frames == 8
    assert (meta.preprocess.fps, meta.preprocess.period, meta.preprocess.size) == (50.0, 2, 32)
    assert meta.ef_mean == pytest.approx(train_set.ef_mean)
    # Normalisation measured on the training videos it lists.
    mean, std = compute_mean_std(train_set.paths, meta.preprocess)
    assert (meta.preprocess.mean, meta.preprocess.std) == pytest.approx((mean, std))
    assert meta.data["stage"] == "finetune" and meta.data["weights"] == "ema" and meta.data["train_videos"] == 8

    # best.safetensors holds the EMA weights that scored the recorded validation MAE: recompute it.
    model, _ = load_model(out / "best.safetensors")
    val_set = EchoNetDataset(synth_dataset, "VAL", meta.preprocess, clips="first")
    with torch.no_grad():
        errors = [abs(model(item["x"][None])[0, 0].item() - item["ef"].item()) for item in val_set]
    assert sum(errors) / len(errors) == pytest.approx(meta.data["validation"]["val_mae"], abs=1e-4)
    assert summary["best"]["val_mae"] == pytest.approx(meta.data["validation"]["val_mae"])

    last, _ = load_model(out / "last.safetensors")
    differs = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))
    assert differs, "EMA weights (best) should differ from the raw weights (last) once the EMA has started"

    steps = read_rows(out / "steps.csv")
    epochs = read_rows(out / "epochs.csv")
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4] and all(math.isfinite(float(r["loss"])) for r in steps)
    assert float(steps[0]["lr"]) == pytest.approx(summary["lr"] * 0.01)  # warm-up starts at 1 % of lr
    assert [int(r["epoch"]) for r in epochs] == [1, 2] and {"val_mae", "val_rmse", "val_r2", "val_pred_std", "val_true_std"} <= set(epochs[0])


def test_pretrain_then_finetune_from_its_encoder(synth_dataset: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    result = run_cli("train", "pretrain", "--data", synth_dataset, "--out", pre, "--max-steps", "2",
                     *TINY_ARGS, *FAST_ARGS)
    assert result.exit_code == 0, result.output
    weights = load_file(pre / "pretrain.safetensors")
    meta = read_meta(pre / "pretrain.safetensors")
    assert meta.data["stage"] == "pretrain" and any(k.startswith("decoder") for k in weights)

    # Its encoder.* weights fit the fine-tuning model exactly.
    cfg = TrainConfig(stage="finetune", out="unused", **_tiny_config())
    model = EViM3(cfg.model_config())
    load_encoder_weights(model, str(pre))
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, weights[f"encoder.{name}"]), name

    fine = tmp_path / "fine"
    result = finetune(synth_dataset, fine, "--max-steps", "1", "--init", pre)
    assert result.exit_code == 0, result.output
    fine_meta = read_meta(fine / "last.safetensors")
    assert fine_meta.data["init"] == str(pre)
    # The encoder learnt under the pre-training normalisation: the fine-tuned model keeps it.
    assert (fine_meta.preprocess.mean, fine_meta.preprocess.std) == (meta.preprocess.mean, meta.preprocess.std)


def _tiny_config() -> dict:
    overrides = {"img_size": 32, "dim": 16, "depth": 1, "d_state": 4, "final_dim": 32, "decoder_depth": 1}
    return {"preset": "evim3-tiny", "frames": 8, "model_overrides": overrides}


def test_cached_videos_train_the_same_weights(synth_dataset: Path, tmp_path: Path) -> None:
    """--cache-videos with 2 forked loader workers: the same batches, so the same weights, as decoding."""
    plain = finetune(synth_dataset, tmp_path / "plain", "--epochs", "1", "--workers", "2")
    cached = finetune(synth_dataset, tmp_path / "cached", "--epochs", "1", "--workers", "2", "--cache-videos")
    assert plain.exit_code == 0 and cached.exit_code == 0, plain.output + cached.output
    assert "cached 10 videos in memory" in cached.output
    a, _ = load_model(tmp_path / "plain" / "last.safetensors")
    b, _ = load_model(tmp_path / "cached" / "last.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_classification_finetune(synth_dataset: Path, tmp_path: Path) -> None:
    rows = read_rows(synth_dataset / "FileList.csv")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for row in rows:  # the two VAL videos get one label each, so AUC is defined
            label = "reduced" if float(row["EF"]) < 55 else "normal"
            writer.writerow([str(synth_dataset / "Videos" / f"{row['FileName']}.avi"), label, row["Split"]])
    out = tmp_path / "cls"
    result = run_cli("train", "finetune", "--task", "classification", "--csv", table, "--out", out, "--epochs", "1",
                     *TINY_ARGS, *FAST_ARGS)
    assert result.exit_code == 0, result.output
    meta = read_meta(out / "last.safetensors")
    assert meta.task == "classification" and meta.class_names == ["normal", "reduced"]
    epoch = read_rows(out / "epochs.csv")[0]
    assert 0.0 <= float(epoch["val_accuracy"]) <= 1.0 and "val_auc" in epoch


def test_bad_inputs_fail_in_one_line(synth_dataset: Path, tmp_path: Path) -> None:
    missing = finetune(tmp_path / "nowhere", tmp_path / "a", "--max-steps", "1")
    assert missing.exit_code == 1 and "nowhere: not a folder" in missing.output
    assert "Traceback" not in missing.output and len(missing.output.strip().splitlines()) == 1

    not_echonet = tmp_path / "empty"
    not_echonet.mkdir()
    wrong = finetune(not_echonet, tmp_path / "b", "--max-steps", "1")
    assert wrong.exit_code == 1 and "FileList.csv" in wrong.output and len(wrong.output.strip().splitlines()) == 1

    bad_init = finetune(synth_dataset, tmp_path / "c", "--max-steps", "1", "--init", tmp_path / "missing.safetensors")
    assert bad_init.exit_code == 1 and "checkpoint not found" in bad_init.output


def test_existing_run_needs_resume(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert finetune(synth_dataset, out, "--max-steps", "1").exit_code == 0
    again = finetune(synth_dataset, out, "--max-steps", "1")
    assert again.exit_code == 1 and "--resume" in again.output
    changed = finetune(synth_dataset, out, "--max-steps", "1", "--resume", "--lr", "0.5")
    assert changed.exit_code == 1 and "cannot resume with another lr" in changed.output


# --- bad data -----------------------------------------------------------------------------------------

def broken_copy(synth_dataset: Path, target: Path, splits: tuple[str, ...]) -> list[str]:
    """A copy of the dataset whose first video of each of `splits` is cut to 300 bytes (undecodable);
    returns those videos' paths."""
    shutil.copytree(synth_dataset, target)
    rows = read_rows(target / "FileList.csv")
    broken = []
    for split in splits:
        name = next(row["FileName"] for row in rows if row["Split"] == split)
        video = target / "Videos" / f"{name}.avi"
        video.write_bytes(video.read_bytes()[:300])
        broken.append(str(video))
    return broken


def test_undecodable_videos_are_skipped_and_counted(synth_dataset: Path, tmp_path: Path) -> None:
    """One TRAIN and one VAL video that cannot be decoded, loaded in a DataLoader worker: the run finishes,
    warns once per video and counts both in the summary; validation leaves the VAL one out."""
    data = tmp_path / "data"
    broken = broken_copy(synth_dataset, data, ("TRAIN", "VAL"))
    out = tmp_path / "run"
    result = finetune(data, out, "--epochs", "1", "--workers", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 2
    assert summary["unreadable_videos"] == 2
    assert sorted(line.split(":")[0] for line in summary["unreadable"]) == sorted(broken)
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("skipped, a video that cannot be decoded" in w for w in warnings)
    assert "unreadable_videos      2" in result.output  # the end-of-run summary
    # The VAL metric covers the one decodable VAL video only: recompute it from the saved weights.
    model, meta = load_model(out / "best.safetensors")
    good = EchoNetDataset(data, "VAL", meta.preprocess, clips="first", substitute_unreadable=True)[1]
    assert not good["unreadable"] and good["file"] not in broken[1]
    with torch.no_grad():
        error = abs(model(good["x"][None])[0, 0].item() - good["ef"].item())
    assert error == pytest.approx(summary["best"]["val_mae"], abs=1e-4)


def test_strict_stops_at_an_undecodable_video_in_one_line(synth_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (broken,) = broken_copy(synth_dataset, data, ("TRAIN",))
    result = finetune(data, tmp_path / "run", "--max-steps", "1", "--strict")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {broken}: ") and "--strict" in result.output


def test_nan_ef_is_refused_at_load_naming_the_row(synth_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    rows = read_rows(data / "FileList.csv")
    rows[3]["EF"] = "nan"
    with open(data / "FileList.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    result = finetune(data, out, "--max-steps", "1")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"1 row with an unusable EF label ({rows[3]['FileName']}: EF 'nan' is not a number from 0 to 100)" \
        in result.output
    assert not (out / "steps.csv").exists()  # refused before the first step
