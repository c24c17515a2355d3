"""What differs between pre-training, EF regression, classification and LV segmentation: the datasets, the
model, the loss, the validation metrics and which of them picks the best checkpoint. The loop
(evim3.train.loop) is shared.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evim3.checkpoint import checkpoint_file, load_checkpoint
from evim3.models.evim3 import EViM3
from evim3.runtime.errors import CheckpointError, DatasetError
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.outputs import lv_masks
from evim3.runtime.tasks import task_names
from evim3.train.distributed import DistContext, all_gather_rows
from evim3.train.metrics import classification_report, overlap_counts, regression_report, segmentation_report
from evim3.train.recipe import TrainConfig

PRETRAIN_FILE = "pretrain.safetensors"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the paper's amp mode); float32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_outputs(model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Float32 outputs for a batch of single clips (N, C, T, H, W) -> (N, K), or of several clips per
    video (N, k, C, T, H, W) -> (N, k, K)."""
    x = x.to(device, non_blocking=True)
    with autocast(device):
        if x.dim() == 6:
            return model(x.flatten(0, 1)).float().unflatten(0, x.shape[:2])
        return model(x).float()


@dataclass
class Datasets:
    train: Any
    val: Any
    source: str  # the folder or CSV they come from


class Task:
    """Base of the three tasks. `monitor` is the validation metric that picks the best checkpoint."""

    name: str
    monitor: str
    higher_is_better: bool
    checkpoint_name = "best.safetensors"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info: dict[str, Any] = {}  # label facts the model and metadata need (ef_mean, class_names)

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        raise NotImplementedError

    def meta(self, spec: PreprocessSpec, data: dict[str, Any]) -> ModelMeta:
        return ModelMeta(
            preset=self.cfg.preset, model=self.cfg.model_config().to_dict(), preprocess=spec,
            task=self.name if self.name in task_names() else "ef",  # pre-training checkpoints carry "ef"
            ef_mean=self.info.get("ef_mean"), ef_std=self.info.get("ef_std", 1.0),
            class_names=self.info.get("class_names", []),
            data={"stage": self.cfg.stage, **data},
        )

    def improved(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best`. An undefined metric (AUC of a one-class split) still gives the
        run a first best checkpoint, which any defined value then replaces."""
        if not np.isfinite(value):
            return best is None
        if best is None or not np.isfinite(best):
            return True
        return value > best if self.higher_is_better else value < best


def _echonet_datasets(cfg: TrainConfig, spec: PreprocessSpec, drop_untraced: bool) -> Datasets:
    from evim3.data.echonet import EchoNetDataset

    if not cfg.data:
        raise DatasetError(None, "no --data folder given (an EchoNet-Dynamic-layout folder)")
    if not os.path.isdir(cfg.data):
        raise DatasetError(cfg.data, "not a folder (expected an EchoNet-Dynamic-layout dataset)")
    common = {"keep_ratio": cfg.keep_ratio, "drop_untraced": drop_untraced, "max_videos": cfg.max_videos,
              "cache": cfg.cache_videos, "substitute_unreadable": True}
    train = EchoNetDataset(cfg.data, "TRAIN", spec, clips="random", pad=cfg.pad, **common)
    val = EchoNetDataset(cfg.data, "VAL", spec, clips="first", **{**common, "keep_ratio": 1.0})
    return Datasets(train, val, os.path.abspath(cfg.data))


def _csv_datasets(cfg: TrainConfig, spec: PreprocessSpec) -> Datasets:
    from evim3.data.classification import VideoClassificationDataset

    common = {"max_videos": cfg.max_videos, "cache": cfg.cache_videos, "substitute_unreadable": True}
    train = VideoClassificationDataset(cfg.csv, "TRAIN", spec, clips="random", pad=cfg.pad,
                                       keep_ratio=cfg.keep_ratio, **common)
    val = VideoClassificationDataset(cfg.csv, "VAL", spec, clips="first", **common)
    return Datasets(train, val, os.path.abspath(cfg.csv))


def _gather_validation(model: nn.Module, loader: Iterable[dict], ctx: DistContext, target_key: str
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


class EFTask(Task):
    name = "ef"
    monitor = "val_mae"
    higher_is_better = False

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        data = _echonet_datasets(self.cfg, spec, drop_untraced=True)
        self.info["ef_mean"], self.info["ef_std"] = data.train.ef_mean, data.train.ef_std
        return data

    def build_model(self) -> nn.Module:
        return EViM3(self.cfg.model_config(), task="ef", ef_mean=self.info["ef_mean"], ef_std=self.info["ef_std"])

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        predicted = model_outputs(model, batch["x"], device)[:, 0]
        return ef_loss(predicted, batch["ef"].to(device), self.info["ef_std"], self.cfg.ef_loss)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        true, outputs = _gather_validation(model, loader, ctx, "ef")
        report = regression_report(true, outputs[:, 0], resamples=0)
        val_loss = float(np.mean((outputs[:, 0] - true) ** 2)) / self.info["ef_std"] ** 2  # the MSE of `loss`
        return {"val_loss": val_loss, "val_mae": report["mae"], "val_rmse": report["rmse"], "val_r2": report["r2"],
                "val_pred_std": report["pred_std"], "val_true_std": report["true_std"]}


class ClassificationTask(Task):
    name = "classification"
    monitor = "val_auc"
    higher_is_better = True

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        if not self.cfg.csv:
            raise DatasetError(None, "classification needs --csv (a CSV with columns path,label,split)")
        data = _csv_datasets(self.cfg, spec)
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
        labels, logits = _gather_validation(model, loader, ctx, "label")
        labels = labels.astype(np.int64)
        if logits.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits[:, 0]), torch.from_numpy(labels).double())
        else:
            loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
        report = classification_report(labels, logits)
        return {"val_loss": float(loss), "val_auc": report["auc"], "val_accuracy": report["accuracy"]}


def traced_frame_logits(logits: Tensor, positions: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The traced frames of a seg batch: logits (N, 2, T, H, W), positions (N, 2) (clip frame of ED, ES; -1
    absent), masks (N, 2, H, W) -> (frame logits (M, 2, H, W), targets (M, H, W) long, video row (M,),
    which (M,): 0 ED, 1 ES), for the M traced frames in the clips."""
    row, which = torch.nonzero(positions >= 0, as_tuple=True)
    return logits[row, :, positions[row, which]], masks[row, which].long(), row, which


SEG_SMOOTH = 1e-5  # the paper's soft Dice smoothing (nnU-Net's SoftDiceLoss, smooth=1e-5)


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


class SegTask(Task):
    """LV segmentation: Dice + cross-entropy on the traced ED and ES frames of each clip (the others have no
    truth), as the paper. The paper sums the ED and ES terms; here the loss is their mean over the batch's
    traced frames (half the paper's scale, the same direction), so a clip that misses a frame weighs less."""

    name = "seg"
    monitor = "val_dice"
    higher_is_better = True

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        from evim3.data.segmentation import EchoNetSegDataset

        cfg = self.cfg
        if not cfg.data:
            raise DatasetError(None, "segmentation needs --data (an EchoNet-Dynamic-layout folder with "
                                     "VolumeTracings.csv)")
        if not os.path.isdir(cfg.data):
            raise DatasetError(cfg.data, "not a folder (expected an EchoNet-Dynamic-layout dataset)")
        common = {"max_videos": cfg.max_videos, "cache": cfg.cache_videos, "substitute_unreadable": True}
        train = EchoNetSegDataset(cfg.data, "TRAIN", spec, clips="random", pad=cfg.pad, keep_ratio=cfg.keep_ratio,
                                  **common)
        val = EchoNetSegDataset(cfg.data, "VAL", spec, clips="first", **common)
        return Datasets(train, val, os.path.abspath(cfg.data))

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


class PretrainTask(Task):
    """Masked video modelling: the loss is the MSE of reconstructed masked patches."""

    name = "pretrain"
    monitor = "val_loss"
    higher_is_better = False
    checkpoint_name = PRETRAIN_FILE

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        # Labels play no part: every video with a file counts, traced or not.
        return _csv_datasets(self.cfg, spec) if self.cfg.csv else _echonet_datasets(self.cfg, spec, drop_untraced=False)

    def build_model(self) -> nn.Module:
        from evim3.models.pretrain import EViM3MAE

        cfg = self.cfg
        return EViM3MAE(cfg.model_config(), mask_ratio=cfg.mask_ratio, strategy=cfg.mask_strategy,
                        time_chain=cfg.time_chain, chain=cfg.chain, shared_mask=cfg.shared_mask,
                        norm_pix_loss=cfg.norm_pix_loss)

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> Tensor:
        with autocast(device):
            return model(batch["x"].to(device, non_blocking=True))["loss"].float()

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[dict], ctx: DistContext) -> dict[str, float]:
        """Mean loss over the validation clips under the same masks every time (a fixed seed, the
        caller's random streams untouched), so epochs compare. Stand-ins for undecodable videos are left out."""
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        total = torch.zeros(2, dtype=torch.float64)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + ctx.rank)
            for batch in loader:
                x = batch["x"][torch.tensor([not error for error in batch["unreadable"]])]
                if len(x):
                    total += torch.tensor([self.loss(model, {"x": x}, ctx.device).item() * len(x), len(x)])
        total = all_gather_rows(total[None], ctx).sum(0)
        return {"val_loss": float(total[0] / total[1])}


# The training of each fine-tuning task, by its name (evim3.runtime.tasks registers its edge half).
TRAIN_TASKS: dict[str, type[Task]] = {"ef": EFTask, "classification": ClassificationTask, "seg": SegTask}


def make_task(cfg: TrainConfig) -> Task:
    if cfg.stage == "pretrain":
        return PretrainTask(cfg)
    if cfg.task not in TRAIN_TASKS:
        raise ValueError(f"task {cfg.task!r} has no training (evim3.train.tasks.TRAIN_TASKS)")
    return TRAIN_TASKS[cfg.task](cfg)


def init_checkpoint_file(path: str) -> str:
    """A checkpoint file from `path`: a file, or a run folder (pre-training or fine-tuning)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, PRETRAIN_FILE)):
        return os.path.join(path, PRETRAIN_FILE)
    return checkpoint_file(path)


def load_encoder_weights(model: nn.Module, path: str) -> ModelMeta:
    """Copy the `encoder.*` weights of checkpoint `path` (pre-trained MAE or fine-tuned) into
    `model.encoder`; every encoder weight must be present with its shape. Returns the checkpoint's meta."""
    path = init_checkpoint_file(path)
    state, meta = load_checkpoint(path)
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise CheckpointError(path, "holds no encoder.* weights to initialise from")
    try:
        model.encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as e:
        # The first line only names the module; the second names the first missing or misfit weight.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        problem = lines[min(1, len(lines) - 1)][:300]
        raise CheckpointError(path, f"encoder weights do not fit this model (preset {meta.preset!r}): {problem}") from None
    return meta
