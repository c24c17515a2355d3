"""Acceptance run for LV segmentation (issue 17): evim3-tiny fine-tuned for segmentation on the built-in
synthetic dataset on the CPU should reach overall Dice >= 0.85 on TEST (EchoNet-Dynamic's DeepLabV3: 0.92 on
real data), its ONNX export should give PyTorch's masks (Dice >= 0.999 in fp32), and the beat-to-beat EF the
edge runtime reads from the exported model's masks should be within 6 EF points of the labels (MAE).

    python -m benchmarks seg                                     # the real thing (1,500 steps)
    EVIM3_BENCH_SEG_STEPS=5 python -m benchmarks seg --no-record  # a smoke run
    EVIM3_BENCH_SEG_OUT=runs/seg-bench python -m benchmarks seg   # keep the checkpoint and the ONNX file

Steps: fine-tune from scratch (Dice + CE on the traced ED/ES frames), `evim3 eval` on TEST (ED, ES and
overall Dice with bootstrap 95 % intervals), the Dice of every frame of each TEST video's first clip against
the generator's own LV (Masks/, when the dataset has it: the frames the tracings never judge), export to
ONNX (fp32) and `evim3 check`'s comparison of ONNX Runtime's masks with PyTorch's on its clips and 4 TEST
videos; then every TEST video through the edge pipeline (`evim3 infer --model seg.onnx`: clips stitched into
per-frame masks, beats, area-length EF per beat) and the mean EF of its beats against the video's label, with a
bootstrap 95 % interval and the mean predictor (the TRAIN mean EF) beside it.

Environment: EVIM3_BENCH_SEG_STEPS (optimizer steps, default 1500), EVIM3_BENCH_SEG_OUT (a folder to keep
best.safetensors and seg.onnx in, e.g. for beat-to-beat EF at the edge; default: a temporary folder),
EVIM3_BENCH_SEG_FROM (a kept run folder stopped before its end: judge its best checkpoint, no training),
EVIM3_BENCH_TRAIN_DATA / EVIM3_BENCH_TRAIN_VIDEOS (the dataset, as for `python -m benchmarks train`).
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evim3.export.onnx import export_checkpoint
from evim3.export.parity import make_golden
from evim3.runtime.backends import open_backend
from evim3.runtime.echonet_layout import MASKS_DIR
from evim3.runtime.infer import InferencePipeline
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.outputs import lv_masks
from evim3.runtime.parity_check import check_files, dataset_videos
from evim3.runtime.preprocess import (
    normalise,
    resample_indices,
    sample_clip_indices,
    square_resize,
    ultrasound_region,
)
from evim3.runtime.video import read_video

from benchmarks.bench_train import SEED, dataset_folder
from evim3.checkpoint import load_model
from evim3.data.echonet import EchoNetDataset
from evim3.data.synth import read_truth_masks
from evim3.train.evaluate import evaluate_checkpoint
from evim3.train.loop import train
from evim3.train.metrics import mae, overlap_counts, pooled_dice, regression_report
from evim3.train.recipe import TrainConfig

DEFAULT_STEPS = 1500
# The tiny CPU recipe of bench_train (lr 1e-3 at batch 8, cached videos, no loader workers, EMA every step),
# with 16-frame clips at the paper's period 2: 0.62 s at 50 fps, which holds the traced ED and ES frames of
# the synthetic hearts (at most 0.38 s apart), so every clip is judged on both.
RECIPE = {"task": "seg", "preset": "evim3-tiny", "frames": 16, "period": 2, "batch": 8, "accum": 1, "lr": 4e-3,
          "pad": 0, "warmup_steps": 50, "ema_start": 50, "ema_every": 1, "workers": 0, "cache_videos": True,
          "device": "cpu", "log_every": 25, "stats_videos": 32}


def seconds_per_step(steps_csv: Path) -> float | None:
    """Optimizer-step time from the run's log: elapsed time between its first and last rows per step (the
    epoch ends between them included, as a share); None with fewer than two rows."""
    if not steps_csv.is_file():
        return None
    with open(steps_csv, newline="") as f:
        rows = [(int(row["step"]), float(row["elapsed_s"])) for row in csv.DictReader(f)]
    if len(rows) < 2:
        return None
    (first_step, first_s), (last_step, last_s) = rows[0], rows[-1]
    return (last_s - first_s) / (last_step - first_step)


def every_frame_dice(checkpoint: Path, data: Path) -> float | None:
    """Pooled Dice, against the generator's LV truth, of every frame of the first clip of each TEST video
    (the truth carried through the same crop, resize and resampling as the pixels); None without Masks/."""
    if not (data / MASKS_DIR).is_dir():
        return None
    model, meta = load_model(checkpoint)
    spec = meta.preprocess
    dataset = EchoNetDataset(data, "TEST", spec, clips="first")
    counts = []
    for index, (path, name) in enumerate(zip(dataset.paths, dataset.files)):
        video = read_video(path)
        y0, y1, x0, x1 = ultrasound_region(video)
        frames = dataset.decode(index)
        clip = sample_clip_indices(len(frames), spec, 0)
        with torch.no_grad():
            predicted = lv_masks(model(torch.from_numpy(normalise(frames[clip], spec))[None, None]).numpy())[0]
        source = resample_indices(len(video.frames), video.fps, spec.fps)[clip]
        truth = read_truth_masks(data, name)[source, y0:y1, x0:x1]
        true = square_resize(truth * np.uint8(255), spec.size) >= 128
        counts.append(overlap_counts(predicted, true))
    return pooled_dice(np.stack(counts))


def beat_to_beat_ef(onnx_path: Path, data: Path) -> dict[str, Any]:
    """Every TEST video through the edge pipeline with the exported seg model: the mean EF of the beats it
    finds against the label. Videos with no beat found count as misses (reported, not scored)."""
    test = EchoNetDataset(data, "TEST", PreprocessSpec(), clips="first")
    pipeline = InferencePipeline(open_backend(onnx_path, provider="cpu"))
    true, predicted, beats, sds, missed = [], [], [], [], []
    for path, label in zip(test.paths, test.ef):
        lv = pipeline.run_file(str(path)).lv
        if lv is None or lv.ef_mean is None:
            missed.append(os.path.basename(path))
            continue
        true.append(float(label))
        predicted.append(lv.ef_mean)
        beats.append(len(lv.beats))
        if lv.ef_sd is not None:
            sds.append(lv.ef_sd)
    if not true:
        return {"videos_scored": 0, "videos_without_beats": len(missed)}
    report = regression_report(np.array(true), np.array(predicted), resamples=1000, seed=SEED)
    return {"videos_scored": len(true), "videos_without_beats": len(missed), "beats_per_video": float(np.mean(beats)),
            "mae": report["mae"], "mae_95ci": f"{report['mae_lo']:.2f} to {report['mae_hi']:.2f}", "r2": report["r2"],
            "mean_predictor_mae": mae(np.array(true), np.full(len(true), test.ef_mean)),
            "pred_std": report["pred_std"], "true_std": report["true_std"],
            "median_beat_to_beat_sd": float(np.median(sds)) if sds else None, "missed": missed[:10]}


def stopped_run(out: Path) -> tuple[dict[str, Any], float]:
    """The summary and training seconds of a kept run stopped before its end (EVIM3_BENCH_SEG_FROM), from its
    logs: the last validated step and the best validation Dice."""
    with open(out / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    with open(out / "steps.csv", newline="") as f:
        elapsed = float(list(csv.DictReader(f))[-1]["elapsed_s"])
    best = max(epochs, key=lambda row: float(row["val_dice"]))
    return {"step": int(epochs[-1]["step"]), "train_videos": None, "best": {"val_dice": float(best["val_dice"])}}, elapsed


def run() -> dict[str, Any]:
    steps = int(os.environ.get("EVIM3_BENCH_SEG_STEPS", str(DEFAULT_STEPS)))
    data = dataset_folder(int(os.environ.get("EVIM3_BENCH_TRAIN_VIDEOS", "400")))
    keep = os.environ.get("EVIM3_BENCH_SEG_OUT")
    stopped = os.environ.get("EVIM3_BENCH_SEG_FROM")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(stopped or keep or Path(tmp) / "seg")
        if stopped:  # judge a kept run that was stopped early (its best checkpoint), without training
            summary, train_s = stopped_run(out)
        else:
            cfg = TrainConfig(stage="finetune", data=str(data), out=str(out), seed=SEED, max_steps=steps,
                              epochs=10_000, **RECIPE)
            started = time.perf_counter()
            summary = train(cfg)
            train_s = time.perf_counter() - started
        step_s = seconds_per_step(out / "steps.csv")
        report = evaluate_checkpoint(out, data=str(data), split="TEST", workers=0, device="cpu", resamples=1000)
        checkpoint = out / "best.safetensors"
        all_frames = every_frame_dice(checkpoint, data)

        onnx_path = out / "seg.onnx"
        export = export_checkpoint(checkpoint, onnx_path)
        golden = make_golden(checkpoint, clips=4, seed=SEED, videos=dataset_videos(data))
        parity = check_files(golden, onnx=str(onnx_path))[0]
        beat_ef = beat_to_beat_ef(onnx_path, data)

    row = {
        "steps": summary["step"], "train_videos": summary["train_videos"], "train_min": train_s / 60,
        "s_per_step": step_s,
        # Includes the epoch ends (validation, checkpoints) and the start (statistics, video cache).
        "s_per_step_all_in": train_s / max(1, summary["step"]),
        "best_val_dice": summary["best"].get("val_dice"),
        "test_dice": report["dice"], "test_dice_95ci": f"{report['dice_lo']:.3f} to {report['dice_hi']:.3f}",
        "test_dice_ed": report["dice_ed"], "test_dice_es": report["dice_es"],
        "test_every_frame_dice": all_frames if all_frames is not None else "n/a (no Masks/)",
        "onnx_vs_torch_mask_dice_fp32": parity.dice, "onnx_vs_torch_max_logit_diff": parity.max_abs,
        "onnx_parity": "pass" if parity.passed else "FAIL",
        "beat_ef_mae": beat_ef.get("mae"), "beat_ef_mae_95ci": beat_ef.get("mae_95ci"),
        "beat_ef_mean_predictor_mae": beat_ef.get("mean_predictor_mae"),
    }
    return {
        "rows": [row],
        "dataset": str(data),
        "recipe": RECIPE,
        "export_s": export.seconds,
        "kept": str(out) if keep or stopped else None,
        "stopped_run_judged": bool(stopped),
        "acceptance_test_dice_ge_0.85": bool(report["dice"] >= 0.85),
        "acceptance_onnx_mask_dice_ge_0.999": bool(parity.dice is not None and parity.dice >= 0.999),
        "beat_to_beat_ef (edge pipeline, ONNX, TEST)": beat_ef,
        "acceptance_beat_ef_mae_le_6": bool(beat_ef.get("mae") is not None and beat_ef["mae"] <= 6),
        "note": "timings on a shared machine; the lead re-records in a quiet run",
    }
