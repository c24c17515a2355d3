"""What several tasks share: their datasets, validation over a distributed split, and the files `evim3 eval`
writes (predictions CSV, figures)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from evim3.runtime.atomic import atomic_path
from evim3.runtime.errors import DatasetError
from evim3.runtime.meta import PreprocessSpec
from evim3.tasks.base import Datasets, EvalJob, model_outputs
from evim3.train.distributed import DistContext, all_gather_rows
from evim3.train.recipe import TrainConfig

PREDICTIONS_CSV = "predictions.csv"
METRICS_JSON = "metrics.json"


def data_folder(data: str | None, missing: str) -> str:
    """`data`, an existing folder (the EchoNet-Dynamic layout); DatasetError `missing` when none was given."""
    if not data:
        raise DatasetError(None, missing)
    if not os.path.isdir(data):
        raise DatasetError(data, "not a folder (expected an EchoNet-Dynamic-layout dataset)")
    return data


def echonet_datasets(cfg: TrainConfig, spec: PreprocessSpec, drop_untraced: bool) -> Datasets:
    from evim3.data.echonet import EchoNetDataset

    data = data_folder(cfg.data, "no --data folder given (an EchoNet-Dynamic-layout folder)")
    common = {"keep_ratio": cfg.keep_ratio, "drop_untraced": drop_untraced, "max_videos": cfg.max_videos,
              "cache": cfg.cache_videos, "substitute_unreadable": True}
    train = EchoNetDataset(data, "TRAIN", spec, clips="random", pad=cfg.pad, **common)
    val = EchoNetDataset(data, "VAL", spec, clips="first", **{**common, "keep_ratio": 1.0})
    return Datasets(train, val, os.path.abspath(data))


def csv_datasets(cfg: TrainConfig, spec: PreprocessSpec) -> Datasets:
    from evim3.data.classification import VideoClassificationDataset

    common = {"max_videos": cfg.max_videos, "cache": cfg.cache_videos, "substitute_unreadable": True}
    train = VideoClassificationDataset(cfg.csv, "TRAIN", spec, clips="random", pad=cfg.pad,
                                       keep_ratio=cfg.keep_ratio, **common)
    val = VideoClassificationDataset(cfg.csv, "VAL", spec, clips="first", **common)
    return Datasets(train, val, os.path.abspath(cfg.csv))


def gather_validation(model: nn.Module, loader: Iterable[dict], ctx: DistContext, target_key: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(targets, outputs (N, K)) over the whole validation split, on every rank: each rank predicts its
    shard, rows are gathered and the padding DistributedSampler added (repeated indices) is dropped, as
    are the stand-ins for videos that could not be decoded (index -1: they repeat another video)."""
    rows = []
    for batch in loader:
        outputs = model_outputs(model, batch["x"], ctx.device)
        stand_in = torch.tensor([bool(error) for error in batch["unreadable"]])
        index = torch.where(stand_in, -1, batch["index"])
        rows.append(torch.cat([index[:, None].double(), batch[target_key][:, None].double(),
                               outputs.double().cpu()], 1))
    gathered = all_gather_rows(torch.cat(rows), ctx).numpy()
    gathered = gathered[gathered[:, 0] >= 0]
    _, first = np.unique(gathered[:, 0], return_index=True)
    gathered = gathered[first]
    return gathered[:, 1], gathered[:, 2:]


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> list[dict[str, Any]]:
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


def clip_rows(job: EvalJob, dataset: Any) -> list[dict[str, Any]]:
    """Every video's clip outputs; "all" gives each video its own clip count: one video per batch."""
    rows = predict(job.model, job.loader(dataset, 1 if job.clips == "all" else None), job.device)
    os.makedirs(job.out, exist_ok=True)
    return rows


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def save_figure(figure: Any, path: str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
