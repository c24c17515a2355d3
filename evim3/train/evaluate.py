"""`evim3 eval`: run a checkpoint over one split, then write per-video predictions, metrics with bootstrap
95 % intervals, and plots.

EF: one clip per video ("first") or several averaged (k evenly spaced, or "all" = the sliding clips
`evim3 infer` runs); MAE, RMSE, R^2; predicted-vs-true scatter and Bland-Altman plots.
Classification: logits averaged over the clips; AUC and accuracy.
LV segmentation: the traced clip of each video (evim3.data.segmentation); ED, ES and overall Dice with
bootstrap intervals over videos, and overlay PNGs (the traced frames with the true and predicted LV
outlines) of the worst and best videos.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from evim3.checkpoint import checkpoint_file, load_model
from evim3.runtime.atomic import atomic_path, write_atomic
from evim3.runtime.errors import CheckpointError, DatasetError
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.outputs import class_probabilities, lv_masks
from evim3.train.distributed import resolve_device
from evim3.train.metrics import (
    SEG_FRAMES,
    classification_report,
    overlap_counts,
    pooled_dice,
    regression_report,
    segmentation_report,
)
from evim3.train.tasks import model_outputs, traced_frame_logits

PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "metrics.json"
SCATTER_PNG = "scatter.png"
BLAND_ALTMAN_PNG = "bland_altman.png"
OVERLAYS = 3  # worst and best videos drawn by a seg evaluation, each
SEG_CLIPS = "traced"  # what a seg evaluation reports as its clips: one clip holding ED and ES per video


def parse_clips(text: str) -> str | int:
    """'first', 'all' or a positive count k, as the --clips option takes them."""
    if text in ("first", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--clips must be first, all or a positive number, got {text!r}")


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> list[dict[str, Any]]:
    """Per video: file, target, per-clip outputs (clips, K) and clip starts."""
    rows = []
    for batch in loader:
        outputs = model_outputs(model, batch["x"], device).cpu()
        if outputs.dim() == 2:  # one clip per video
            outputs = outputs[:, None]
        target = batch["ef"] if "ef" in batch else batch["label"]
        for i in range(len(outputs)):
            rows.append({"file": batch["file"][i], "target": target[i].item(), "clips": outputs[i].numpy(),
                         "starts": batch["starts"][i].tolist()})
    return rows


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | None = None,
    csv_path: str | None = None,
    split: str = "TEST",
    clips: str | int = "first",
    out: str | None = None,
    batch: int = 4,
    workers: int = 2,
    device: str = "auto",
    resamples: int = 1000,
    max_videos: int | None = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split` of an EchoNet-layout folder (EF, seg) or a classification CSV; write
    predictions.csv, metrics.json (and for EF scatter.png, bland_altman.png) into `out`. Returns the
    metrics with the file paths."""
    path = checkpoint_file(checkpoint)
    torch_device = resolve_device(device)
    model, meta = load_model_for_eval(path, torch_device)
    if meta.task not in EVALUATORS:
        raise CheckpointError(path, f"task {meta.task!r} has no evaluation (evim3.train.evaluate.EVALUATORS)")
    evaluator = EVALUATORS[meta.task]
    clips = evaluator.clips or clips
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), f"eval_{split.lower()}_{clips}")
    job = EvalJob(model, meta, torch_device, data, csv_path, split, clips, out, batch, workers, resamples,
                  max_videos)
    report = evaluator.run(job)
    report.update({"checkpoint": os.path.abspath(path), "split": split.upper(), "clips": clips,
                   "out": os.path.abspath(out)})
    write_atomic(os.path.join(out, METRICS_JSON), json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class EvalJob:
    """What one evaluation runs on and where it writes."""

    model: torch.nn.Module
    meta: ModelMeta
    device: torch.device
    data: str | None
    csv_path: str | None
    split: str
    clips: str | int
    out: str
    batch: int
    workers: int
    resamples: int
    max_videos: int | None

    def loader(self, dataset: Any, batch: int | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch or self.batch, num_workers=self.workers)


@dataclass(frozen=True)
class Evaluator:
    """A task's evaluation: `run` writes predictions and plots into job.out and returns the metrics;
    `clips` overrides --clips when the task evaluates fixed clips."""

    run: Callable[[EvalJob], dict[str, Any]]
    clips: str | None = None


def _evaluate_ef(job: EvalJob) -> dict[str, Any]:
    from evim3.data.echonet import EchoNetDataset

    _check_data_folder(job.data, "an EF")
    dataset = EchoNetDataset(job.data, job.split, job.meta.preprocess, clips=job.clips, max_videos=job.max_videos)
    rows = _clip_rows(job, dataset)
    return _ef_outputs(rows, job.out, job.resamples)


def _evaluate_classification(job: EvalJob) -> dict[str, Any]:
    from evim3.data.classification import VideoClassificationDataset

    if not job.csv_path:
        raise DatasetError(None, "a classification checkpoint is evaluated on a CSV: give --csv")
    dataset = VideoClassificationDataset(job.csv_path, job.split, job.meta.preprocess, clips=job.clips,
                                         max_videos=job.max_videos)
    if dataset.class_names != job.meta.class_names:
        raise DatasetError(job.csv_path, f"classes {dataset.class_names} differ from the checkpoint's "
                                         f"{job.meta.class_names}")
    rows = _clip_rows(job, dataset)
    return _classification_outputs(rows, job.meta.class_names, job.out)


def _clip_rows(job: EvalJob, dataset: Any) -> list[dict[str, Any]]:
    """Every video's clip outputs; "all" gives each video its own clip count: one video per batch."""
    rows = predict(job.model, job.loader(dataset, 1 if job.clips == "all" else None), job.device)
    os.makedirs(job.out, exist_ok=True)
    return rows


def _evaluate_seg(job: EvalJob) -> dict[str, Any]:
    from evim3.data.segmentation import EchoNetSegDataset

    _check_data_folder(job.data, "a seg")
    dataset = EchoNetSegDataset(job.data, job.split, job.meta.preprocess, clips="first", max_videos=job.max_videos)
    os.makedirs(job.out, exist_ok=True)
    return _seg_outputs(job.model, dataset, job.loader(dataset), job.device, job.meta.preprocess, job.out,
                        job.resamples)


# The evaluation of each task, by its name (evim3.runtime.tasks): the one place a task's `evim3 eval` is found.
EVALUATORS: dict[str, Evaluator] = {
    "ef": Evaluator(_evaluate_ef),
    "classification": Evaluator(_evaluate_classification),
    "seg": Evaluator(_evaluate_seg, clips=SEG_CLIPS),
}


def _check_data_folder(data: str | None, what: str) -> None:
    if not data:
        raise DatasetError(None, f"{what} checkpoint is evaluated on an EchoNet-layout folder: give --data")
    if not os.path.isdir(data):
        raise DatasetError(data, "not a folder (expected an EchoNet-Dynamic-layout dataset)")


def load_model_for_eval(path: str, device: torch.device):
    from evim3.checkpoint import read_meta

    if read_meta(path).data.get("stage") == "pretrain":
        raise CheckpointError(path, "is a pre-training (masked autoencoder) checkpoint: fine-tune it first "
                                    "(evim3 train finetune --init ...)")
    return load_model(path, device=device)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _ef_outputs(rows: list[dict[str, Any]], out: str, resamples: int) -> dict[str, Any]:
    true = np.array([row["target"] for row in rows])
    predicted = np.array([row["clips"][:, 0].mean() for row in rows])
    table = [[row["file"], f"{row['target']:.4f}", f"{p:.4f}", len(row["clips"]),
              " ".join(f"{v:.4f}" for v in row["clips"][:, 0]), " ".join(map(str, row["starts"]))]
             for row, p in zip(rows, predicted)]
    write_atomic(os.path.join(out, PREDICTIONS_CSV),
                 _csv_text(["file", "true", "predicted", "clips", "clip_predictions", "clip_starts"], table))
    report = regression_report(true, predicted, resamples=resamples)
    report["mean_predictor_mae"] = float(np.mean(np.abs(true - true.mean())))
    plot_scatter(true, predicted, report, os.path.join(out, SCATTER_PNG))
    plot_bland_altman(true, predicted, os.path.join(out, BLAND_ALTMAN_PNG))
    report["files"] = [PREDICTIONS_CSV, METRICS_JSON, SCATTER_PNG, BLAND_ALTMAN_PNG]
    return report


def _classification_outputs(rows: list[dict[str, Any]], class_names: list[str], out: str) -> dict[str, Any]:
    """A video's logits are the mean of its clips' logits; its probabilities and prediction follow from
    them by evim3.runtime.outputs, the rule `evim3 infer` uses."""
    labels = np.array([int(row["target"]) for row in rows])
    logits = np.stack([row["clips"].mean(0) for row in rows])
    report: dict[str, Any] = classification_report(labels, logits)
    probabilities = class_probabilities(logits)
    table = [[row["file"], class_names[label], class_names[int(p.argmax())], len(row["clips"]),
              " ".join(f"{v:.4f}" for v in logit), *(f"{v:.6f}" for v in p)]
             for row, label, p, logit in zip(rows, labels, probabilities, logits)]
    write_atomic(os.path.join(out, PREDICTIONS_CSV),
                 _csv_text(["file", "true", "predicted", "clips", "mean_logits", *(f"p_{n}" for n in class_names)],
                           table))
    report["files"] = [PREDICTIONS_CSV, METRICS_JSON]
    return report


@torch.no_grad()
def _seg_masks(model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[np.ndarray, ...]:
    """(predicted (M, H, W) bool, true (M, H, W) bool, row (M,), which (M,)) for the traced frames of a batch;
    the prediction by the edge's rule (evim3.runtime.outputs.lv_masks)."""
    logits = model_outputs(model, batch["x"], device).cpu()
    frame_logits, targets, row, which = traced_frame_logits(logits, batch["positions"], batch["masks"])
    return (lv_masks(frame_logits[:, :, None].numpy())[:, 0], targets.numpy().astype(bool), row.numpy(),
            which.numpy())


def _seg_outputs(model: torch.nn.Module, dataset, loader: DataLoader, device: torch.device, spec: PreprocessSpec,
                 out: str, resamples: int) -> dict[str, Any]:
    """Per-video overlap counts of the traced frames -> Dice report, predictions.csv, overlay PNGs."""
    counts = np.zeros((len(dataset), 2, 3), np.int64)  # videos x (ED, ES) x (TP, FP, FN)
    judged = np.zeros((len(dataset), 2), bool)
    files: list[str] = []
    for batch in loader:
        predicted, true, row, which = _seg_masks(model, batch, device)
        first = len(files)
        counts[first + row, which] = overlap_counts(predicted, true)
        judged[first + row, which] = True
        files += batch["file"]
    video_dice = np.array([pooled_dice(c) for c in counts])
    table = [[name, *(f"{pooled_dice(c[k]):.4f}" if judged[i, k] else "" for k in SEG_FRAMES.values()),
              f"{video_dice[i]:.4f}", *(int(c[k, 0] + c[k, 2]) for k in SEG_FRAMES.values()),
              *(int(c[k, 0] + c[k, 1]) for k in SEG_FRAMES.values())]
             for i, (name, c) in enumerate(zip(files, counts))]
    write_atomic(os.path.join(out, PREDICTIONS_CSV), _csv_text(
        ["file", "dice_ed", "dice_es", "dice", "lv_px_true_ed", "lv_px_true_es", "lv_px_pred_ed", "lv_px_pred_es"],
        table))
    report: dict[str, Any] = segmentation_report(counts, resamples=resamples)
    report["frames_judged"] = int(judged.sum())
    overlays = []
    ranked = [int(i) for i in np.argsort(video_dice, kind="stable") if np.isfinite(video_dice[i])]
    shown = max(1, min(OVERLAYS, len(ranked) // 2)) if ranked else 0
    for label, picks in (("worst", ranked[:shown]), ("best", ranked[::-1][:shown])):
        for rank, index in enumerate(picks, start=1):
            name = f"overlay_{label}_{rank}.png"
            plot_overlay(model, dataset, index, device, spec, os.path.join(out, name),
                         f"{label} {rank}: {files[index]}  Dice {video_dice[index]:.3f}")
            overlays.append(name)
    report["overlays"] = overlays
    report["files"] = [PREDICTIONS_CSV, METRICS_JSON, *overlays]
    return report


def plot_overlay(model: torch.nn.Module, dataset, index: int, device: torch.device, spec: PreprocessSpec,
                 path: str, title: str) -> None:
    """The traced frames of video `index`, as the model saw them, with the true LV outline (green) and the
    predicted one (red)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from evim3.data.segmentation import TRACED

    item = dataset[index]
    batch = {"x": item["x"][None], "positions": item["positions"][None], "masks": item["masks"][None]}
    predicted, true, _, which = _seg_masks(model, batch, device)
    pixels = (item["x"][0].numpy() * spec.std + spec.mean).clip(0, 255)
    figure = Figure(figsize=(3.2 * len(which), 3.6))
    axes = np.atleast_1d(figure.subplots(1, len(which)))
    for ax, k, p, t in zip(axes, which, predicted, true):
        frame = int(item["positions"][k])
        ax.imshow(pixels[frame], cmap="gray", vmin=0, vmax=255)
        for mask, colour in ((t, "lime"), (p, "red")):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"{TRACED[k]} (clip frame {frame})  Dice {pooled_dice(overlap_counts(p, t)):.3f}", fontsize=8)
        ax.set_axis_off()
    figure.legend([Line2D([], [], color="lime"), Line2D([], [], color="red")], ["true LV", "predicted LV"],
                  loc="lower center", ncol=2, fontsize=8)
    figure.suptitle(title, fontsize=9)
    _save_figure(figure, path)


def _save_figure(figure, path: str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")


def plot_scatter(true: np.ndarray, predicted: np.ndarray, report: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    low, high = min(true.min(), predicted.min()) - 2, max(true.max(), predicted.max()) + 2
    ax.plot([low, high], [low, high], color="grey", linewidth=1, label="identity")
    ax.scatter(true, predicted, s=12, alpha=0.7)
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="true EF (%)", ylabel="predicted EF (%)",
           title=f"MAE {report['mae']:.2f}  RMSE {report['rmse']:.2f}  R² {report['r2']:.3f}  (n={len(true)})")
    ax.legend(loc="upper left")
    _save_figure(figure, path)


def plot_bland_altman(true: np.ndarray, predicted: np.ndarray, path: str) -> None:
    from matplotlib.figure import Figure

    mean, difference = (true + predicted) / 2, predicted - true
    bias, spread = difference.mean(), 1.96 * difference.std(ddof=1) if len(true) > 1 else 0.0
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    ax.scatter(mean, difference, s=12, alpha=0.7)
    ax.axhline(bias, color="black", linewidth=1, label=f"bias {bias:+.2f}")
    for limit in (bias - spread, bias + spread):
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="mean of true and predicted EF (%)", ylabel="predicted - true EF (%)",
           title=f"Bland-Altman: limits of agreement {bias - spread:+.2f} to {bias + spread:+.2f}")
    ax.legend(loc="upper right")
    _save_figure(figure, path)
