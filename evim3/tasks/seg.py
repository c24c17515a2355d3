"""Task "seg", LV segmentation, its torch half: the per-token segmentation head, Dice + cross-entropy on the
traced ED and ES frames of each clip (the others have no truth), validation Dice, and `evim3 eval` on the
traced clip of each video (evim3.data.segmentation): ED, ES and overall Dice with bootstrap intervals over
videos, and overlay PNGs (the traced frames with the true and predicted LV outlines) of the worst and best
videos."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3, SegHead
from evim3.runtime.atomic import write_atomic
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.outputs import lv_masks
from evim3.tasks.base import Datasets, EvalJob, Task, model_outputs, register
from evim3.tasks.common import METRICS_JSON, PREDICTIONS_CSV, csv_text, data_folder, save_figure
from evim3.train.distributed import DistContext, all_gather_rows
from evim3.train.metrics import SEG_FRAMES, overlap_counts, pooled_dice, segmentation_report

SEG_SMOOTH = 1e-5  # the paper's soft Dice smoothing (nnU-Net's SoftDiceLoss, smooth=1e-5)
OVERLAYS = 3  # worst and best videos drawn by an evaluation, each
SEG_CLIPS = "traced"  # what an evaluation reports as its clips: one clip holding ED and ES per video


def traced_frame_logits(logits: Tensor, positions: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The traced frames of a seg batch: logits (N, 2, T, H, W), positions (N, 2) (clip frame of ED, ES; -1
    absent), masks (N, 2, H, W) -> (frame logits (M, 2, H, W), targets (M, H, W) long, video row (M,),
    which (M,): 0 ED, 1 ES), for the M traced frames in the clips."""
    row, which = torch.nonzero(positions >= 0, as_tuple=True)
    return logits[row, :, positions[row, which]], masks[row, which].long(), row, which


def seg_frame_losses(frame_logits: Tensor, targets: Tensor) -> Tensor:
    """Per traced frame (M,): cross-entropy over its pixels + 1 - the soft Dice of the LV (softmax
    probabilities), as the paper's dc_and_ce (nnU-Net's DC_and_CE_loss with per-sample Dice, background left
    out), whose Dice term is -Dice: the 1 keeps the loss positive and changes no gradient."""
    ce = F.cross_entropy(frame_logits.float(), targets, reduction="none").mean((1, 2))
    lv = frame_logits.float().softmax(1)[:, 1]
    truth = targets.float()
    tp = (lv * truth).sum((1, 2))
    fp = (lv * (1 - truth)).sum((1, 2))
    fn = ((1 - lv) * truth).sum((1, 2))
    dice = (2 * tp + SEG_SMOOTH) / (2 * tp + fp + fn + SEG_SMOOTH)
    return ce + 1 - dice


@register
class SegTask(Task):
    """LV segmentation: Dice + cross-entropy on the traced ED and ES frames of each clip, as the paper. The
    paper sums the ED and ES terms; here the loss is their mean over the batch's traced frames (half the
    paper's scale, the same direction), so a clip that misses a frame weighs less."""

    name = "seg"
    monitor = "val_dice"
    higher_is_better = True
    eval_clips = SEG_CLIPS

    @staticmethod
    def head(cfg: ModelConfig, num_classes: int, ef_mean: float, ef_std: float) -> nn.Module:
        return SegHead(cfg)

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        from evim3.data.segmentation import EchoNetSegDataset

        cfg = self.cfg
        data = data_folder(cfg.data, "segmentation needs --data (an EchoNet-Dynamic-layout folder with "
                                     "VolumeTracings.csv)")
        common = {"max_videos": cfg.max_videos, "cache": cfg.cache_videos, "substitute_unreadable": True}
        train = EchoNetSegDataset(data, "TRAIN", spec, clips="random", pad=cfg.pad, keep_ratio=cfg.keep_ratio,
                                  **common)
        val = EchoNetSegDataset(data, "VAL", spec, clips="first", **common)
        return Datasets(train, val, os.path.abspath(data))

    def build_model(self) -> nn.Module:
        return EViM3(self.cfg.model_config(), task="seg")

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        logits = model_outputs(model, batch["x"], device)
        frame_logits, targets, _, _ = traced_frame_logits(logits, batch["positions"].to(device),
                                                          batch["masks"].to(device))
        if not len(targets):
            return logits.sum() * 0  # no traced frame in these clips; keeps the graph for DDP
        return seg_frame_losses(frame_logits, targets).mean()

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        """Pooled Dice of the ED frames, the ES frames and both (the paper's global Dice), and the loss."""
        rows = []
        for batch in loader:
            logits = model_outputs(model, batch["x"], ctx.device)
            frame_logits, targets, row, which = traced_frame_logits(logits, batch["positions"].to(ctx.device),
                                                                    batch["masks"].to(ctx.device))
            predicted = lv_masks(frame_logits[:, :, None].cpu().numpy())[:, 0]  # the edge's rule
            # One row per video: ED then ES, each (judged, TP, FP, FN, loss); a frame not in its clip is all
            # zeros. Equal rows per video keep every rank's block the same size for the gather.
            per_frame = torch.zeros(len(logits), 2, 5, dtype=torch.float64)
            per_frame[row.cpu(), which.cpu()] = torch.cat([
                torch.ones(len(row), 1, dtype=torch.float64),
                torch.from_numpy(overlap_counts(predicted, targets.cpu().numpy().astype(bool))).double(),
                seg_frame_losses(frame_logits, targets).double().cpu()[:, None]], 1)
            stand_in = torch.tensor([bool(error) for error in batch["unreadable"]])
            index = torch.where(stand_in, -1, batch["index"])
            rows.append(torch.cat([index[:, None].double(), per_frame.flatten(1)], 1))
        gathered = all_gather_rows(torch.cat(rows), ctx).numpy()
        gathered = gathered[gathered[:, 0] >= 0]
        _, first = np.unique(gathered[:, 0], return_index=True)  # DistributedSampler's repeats
        per_frame = gathered[first, 1:].reshape(-1, 2, 5)
        judged = per_frame[..., 0] > 0
        report = segmentation_report(per_frame[..., 1:4].astype(np.int64), resamples=0)
        return {"val_loss": float(per_frame[..., 4][judged].mean()), "val_dice": report["dice"],
                "val_dice_ed": report["dice_ed"], "val_dice_es": report["dice_es"]}

    @staticmethod
    def evaluate(job: EvalJob) -> dict[str, Any]:
        """Per-video overlap counts of the traced frames -> Dice report, predictions.csv, overlay PNGs."""
        from evim3.data.segmentation import EchoNetSegDataset

        data = data_folder(job.data, "a seg checkpoint is evaluated on an EchoNet-layout folder: give --data")
        dataset = EchoNetSegDataset(data, job.split, job.meta.preprocess, clips="first", max_videos=job.max_videos)
        os.makedirs(job.out, exist_ok=True)
        counts = np.zeros((len(dataset), 2, 3), np.int64)  # videos x (ED, ES) x (TP, FP, FN)
        judged = np.zeros((len(dataset), 2), bool)
        files: list[str] = []
        for batch in job.loader(dataset):
            predicted, true, row, which = _seg_masks(job.model, batch, job.device)
            first = len(files)
            counts[first + row, which] = overlap_counts(predicted, true)
            judged[first + row, which] = True
            files += batch["file"]
        video_dice = np.array([pooled_dice(c) for c in counts])
        table = [[name, *(f"{pooled_dice(c[k]):.4f}" if judged[i, k] else "" for k in SEG_FRAMES.values()),
                  f"{video_dice[i]:.4f}", *(int(c[k, 0] + c[k, 2]) for k in SEG_FRAMES.values()),
                  *(int(c[k, 0] + c[k, 1]) for k in SEG_FRAMES.values())]
                 for i, (name, c) in enumerate(zip(files, counts))]
        write_atomic(os.path.join(job.out, PREDICTIONS_CSV), csv_text(
            ["file", "dice_ed", "dice_es", "dice", "lv_px_true_ed", "lv_px_true_es", "lv_px_pred_ed",
             "lv_px_pred_es"], table))
        report: dict[str, Any] = segmentation_report(counts, resamples=job.resamples)
        report["frames_judged"] = int(judged.sum())
        overlays = []
        ranked = [int(i) for i in np.argsort(video_dice, kind="stable") if np.isfinite(video_dice[i])]
        shown = max(1, min(OVERLAYS, len(ranked) // 2)) if ranked else 0
        for label, picks in (("worst", ranked[:shown]), ("best", ranked[::-1][:shown])):
            for rank, index in enumerate(picks, start=1):
                name = f"overlay_{label}_{rank}.png"
                plot_overlay(job.model, dataset, index, job.device, job.meta.preprocess, os.path.join(job.out, name),
                             f"{label} {rank}: {files[index]}  Dice {video_dice[index]:.3f}")
                overlays.append(name)
        report["overlays"] = overlays
        report["files"] = [PREDICTIONS_CSV, METRICS_JSON, *overlays]
        return report


@torch.no_grad()
def _seg_masks(model: nn.Module, batch: dict, device: torch.device) -> tuple[np.ndarray, ...]:
    """(predicted (M, H, W) bool, true (M, H, W) bool, row (M,), which (M,)) for the traced frames of a batch;
    the prediction by the edge's rule (evim3.runtime.outputs.lv_masks)."""
    logits = model_outputs(model, batch["x"], device).cpu()
    frame_logits, targets, row, which = traced_frame_logits(logits, batch["positions"], batch["masks"])
    return (lv_masks(frame_logits[:, :, None].numpy())[:, 0], targets.numpy().astype(bool), row.numpy(),
            which.numpy())


def plot_overlay(model: nn.Module, dataset: Any, index: int, device: torch.device, spec: PreprocessSpec,
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
    save_figure(figure, path)
