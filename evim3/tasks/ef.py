"""Task "ef", EF regression, its torch half: the global-token head with its output started at the training
EF mean, the EF loss (MSE, or MSE + 1 - batch correlation), validation MAE, and `evim3 eval`'s predictions,
bootstrap intervals, scatter and Bland-Altman plots. One clip per video ("first") or several averaged (k
evenly spaced, or "all" = the sliding clips `evim3 infer` runs)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3, GlobalTokenHead
from evim3.runtime.atomic import write_atomic
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.tasks import task_spec
from evim3.tasks.base import Datasets, EvalJob, Task, model_outputs, register
from evim3.tasks.common import (
    METRICS_JSON,
    PREDICTIONS_CSV,
    clip_rows,
    csv_text,
    data_folder,
    echonet_datasets,
    gather_validation,
    save_figure,
)
from evim3.train.distributed import DistContext
from evim3.train.metrics import regression_report

SCATTER_PNG = "scatter.png"
BLAND_ALTMAN_PNG = "bland_altman.png"


def batch_correlation(predicted: Tensor, true: Tensor) -> Tensor:
    """Pearson correlation over the batch; 0 where it is undefined (fewer than 3 clips, or all true EF equal)."""
    predicted, true = predicted.float() - predicted.float().mean(), true.float() - true.float().mean()
    if len(true) < 3 or float(true.norm()) == 0:
        return predicted.sum() * 0  # no signal, but keeps the graph (DDP expects every parameter used)
    # The epsilon only guards a constant output, where the correlation is 0 whatever it is.
    return (predicted * true).sum() / (predicted.norm() * true.norm() + 1e-8)


def ef_loss(predicted: Tensor, true: Tensor, ef_std: float, kind: str) -> Tensor:
    """The EF fine-tuning loss (recipe.EF_LOSSES): MSE in the network's output unit (standardised EF: with
    gradient clipping at 1.0, a loss in raw EF^2, ~ef_std^2 larger, had every step clipped), plus 1 - r for
    "mse+corr"."""
    loss = F.mse_loss(predicted, true) / ef_std**2
    if kind == "mse+corr":
        loss = loss + 1 - batch_correlation(predicted, true)
    return loss


@register
class EFTask(Task):
    name = "ef"
    monitor = "val_mae"
    higher_is_better = False

    @staticmethod
    def head(cfg: ModelConfig, num_classes: int, ef_mean: float, ef_std: float) -> nn.Module:
        return GlobalTokenHead(cfg, task_spec("ef").output_width(), output_bias=ef_mean, output_scale=ef_std)

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        data = echonet_datasets(self.cfg, spec, drop_untraced=True)
        self.info["ef_mean"], self.info["ef_std"] = data.train.ef_mean, data.train.ef_std
        return data

    def build_model(self) -> nn.Module:
        return EViM3(self.cfg.model_config(), task="ef", ef_mean=self.info["ef_mean"], ef_std=self.info["ef_std"])

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        predicted = model_outputs(model, batch["x"], device)[:, 0]
        return ef_loss(predicted, batch["ef"].to(device), self.info["ef_std"], self.cfg.ef_loss)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        true, outputs = gather_validation(model, loader, ctx, "ef")
        report = regression_report(true, outputs[:, 0], resamples=0)
        val_loss = float(np.mean((outputs[:, 0] - true) ** 2)) / self.info["ef_std"] ** 2  # the MSE of `loss`
        return {"val_loss": val_loss, "val_mae": report["mae"], "val_rmse": report["rmse"], "val_r2": report["r2"],
                "val_pred_std": report["pred_std"], "val_true_std": report["true_std"]}

    @staticmethod
    def evaluate(job: EvalJob) -> dict[str, Any]:
        """MAE, RMSE, R^2 (and the mean predictor's MAE) of the clips' mean EF per video; scatter and
        Bland-Altman plots."""
        from evim3.data.echonet import EchoNetDataset

        data = data_folder(job.data, "an EF checkpoint is evaluated on an EchoNet-layout folder: give --data")
        dataset = EchoNetDataset(data, job.split, job.meta.preprocess, clips=job.clips, max_videos=job.max_videos)
        rows = clip_rows(job, dataset)
        true = np.array([row["target"] for row in rows])
        predicted = np.array([row["clips"][:, 0].mean() for row in rows])
        table = [[row["file"], f"{row['target']:.4f}", f"{p:.4f}", len(row["clips"]),
                  " ".join(f"{v:.4f}" for v in row["clips"][:, 0]), " ".join(map(str, row["starts"]))]
                 for row, p in zip(rows, predicted)]
        write_atomic(os.path.join(job.out, PREDICTIONS_CSV),
                     csv_text(["file", "true", "predicted", "clips", "clip_predictions", "clip_starts"], table))
        report = regression_report(true, predicted, resamples=job.resamples)
        report["mean_predictor_mae"] = float(np.mean(np.abs(true - true.mean())))
        plot_scatter(true, predicted, report, os.path.join(job.out, SCATTER_PNG))
        plot_bland_altman(true, predicted, os.path.join(job.out, BLAND_ALTMAN_PNG))
        report["files"] = [PREDICTIONS_CSV, METRICS_JSON, SCATTER_PNG, BLAND_ALTMAN_PNG]
        return report


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
    save_figure(figure, path)


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
    save_figure(figure, path)
