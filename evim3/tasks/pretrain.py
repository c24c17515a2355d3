"""Masked video modelling (`evim3 train pretrain`): the training side only. It has no head and no evaluation
of its own, and its checkpoint holds an encoder for any task, so it is not a registered task: the trainer
picks it by stage (evim3.train.tasks.make_task)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from evim3.runtime.meta import PreprocessSpec
from evim3.tasks.base import Datasets, Task, autocast
from evim3.tasks.common import csv_datasets, echonet_datasets
from evim3.train.distributed import DistContext, all_gather_rows

PRETRAIN_FILE = "pretrain.safetensors"


class PretrainTask(Task):
    """The loss is the MSE of reconstructed masked patches."""

    name = "pretrain"
    monitor = "val_loss"
    higher_is_better = False
    checkpoint_name = PRETRAIN_FILE
    file_task = "ef"  # model-file metadata names a registered task; the encoder it holds serves any

    def datasets(self, spec: PreprocessSpec) -> Datasets:
        # Labels play no part: every video with a file counts, traced or not.
        return csv_datasets(self.cfg, spec) if self.cfg.csv else echonet_datasets(self.cfg, spec, drop_untraced=False)

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
