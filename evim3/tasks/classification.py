"""Task "classification", its torch half: the global-token head with one logit for two classes (BCE, as the
paper's classification head) or one per class (cross-entropy), validation AUC, and `evim3 eval`'s per-video
probabilities from the clips' mean logits. Videos and labels come from a CSV (path,label,split)."""

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
from evim3.runtime.errors import DatasetError
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.outputs import class_probabilities
from evim3.runtime.tasks import task_spec
from evim3.tasks.base import Datasets, EvalJob, Task, model_outputs, register
from evim3.tasks.common import (
    METRICS_JSON,
    PREDICTIONS_CSV,
    clip_rows,
    csv_datasets,
    csv_text,
    gather_validation,
)
from evim3.train.distributed import DistContext
from evim3.train.metrics import classification_report


@register
class ClassificationTask(Task):
    name = "classification"
    monitor = "val_auc"
    higher_is_better = True

    @staticmethod
    def head(cfg: ModelConfig, num_classes: int, ef_mean: float, ef_std: float) -> nn.Module:
        return GlobalTokenHead(cfg, task_spec("classification").output_width(num_classes))

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        if not self.cfg.csv:
            raise DatasetError(None, "classification needs --csv (a CSV with columns path,label,split)")
        data = csv_datasets(self.cfg, spec)
        self.info["class_names"] = data.train.class_names
        if len(data.train.class_names) < 2:
            raise DatasetError(self.cfg.csv, f"needs at least 2 classes, has {data.train.class_names}")
        return data

    def build_model(self) -> nn.Module:
        return EViM3(self.cfg.model_config(), task="classification", num_classes=len(self.info["class_names"]))

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        logits = model_outputs(model, batch["x"], device)
        labels = batch["label"].to(device)
        if logits.shape[1] == 1:  # binary: one logit, as the paper's classification head
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        labels, logits = gather_validation(model, loader, ctx, "label")
        labels = labels.astype(np.int64)
        if logits.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits[:, 0]), torch.from_numpy(labels).double())
        else:
            loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
        report = classification_report(labels, logits)
        return {"val_loss": float(loss), "val_auc": report["auc"], "val_accuracy": report["accuracy"]}

    @staticmethod
    def evaluate(job: EvalJob) -> dict[str, Any]:
        """AUC and accuracy. A video's logits are the mean of its clips' logits; its probabilities and
        prediction follow from them by evim3.runtime.outputs, the rule `evim3 infer` uses."""
        from evim3.data.classification import VideoClassificationDataset

        if not job.csv_path:
            raise DatasetError(None, "a classification checkpoint is evaluated on a CSV: give --csv")
        class_names = job.meta.class_names
        dataset = VideoClassificationDataset(job.csv_path, job.split, job.meta.preprocess, clips=job.clips,
                                             max_videos=job.max_videos)
        if dataset.class_names != class_names:
            raise DatasetError(job.csv_path, f"classes {dataset.class_names} differ from the checkpoint's "
                                             f"{class_names}")
        rows = clip_rows(job, dataset)
        labels = np.array([int(row["target"]) for row in rows])
        logits = np.stack([row["clips"].mean(0) for row in rows])
        report: dict[str, Any] = classification_report(labels, logits)
        probabilities = class_probabilities(logits)
        table = [[row["file"], class_names[label], class_names[int(p.argmax())], len(row["clips"]),
                  " ".join(f"{v:.4f}" for v in logit), *(f"{v:.6f}" for v in p)]
                 for row, label, p, logit in zip(rows, labels, probabilities, logits)]
        header = ["file", "true", "predicted", "clips", "mean_logits", *(f"p_{n}" for n in class_names)]
        write_atomic(os.path.join(job.out, PREDICTIONS_CSV), csv_text(header, table))
        report["files"] = [PREDICTIONS_CSV, METRICS_JSON]
        return report
