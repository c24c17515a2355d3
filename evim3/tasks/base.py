"""What a task's torch half implements, and the registry the model, the trainer and `evim3 eval` read.

A task is one class (evim3/tasks/ef.py, classification.py, seg.py), registered once by name with `register`:

    head      the model's head (EViM3 builds it from the registered task of its `task`)
    datasets, build_model, loss, validate, monitor, meta
              one training run (`evim3 train finetune --task NAME`; an instance is one run)
    evaluate  predictions, metrics and plots of a checkpoint (`evim3 eval`)

Its edge half (output shape, per-clip results, report columns, exported metadata) is the TaskSpec of the same
name in evim3.runtime.tasks, which imports no torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from evim3.config import ModelConfig
from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.tasks import task_spec
from evim3.train.distributed import DistContext
from evim3.train.recipe import TrainConfig


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


@dataclass(frozen=True)
class EvalJob:
    """What one `evim3 eval` runs on and where it writes."""

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


class Task:
    """The torch half of one task. `monitor` is the validation metric that picks the best checkpoint."""

    name: ClassVar[str]
    monitor: ClassVar[str]
    higher_is_better: ClassVar[bool]
    checkpoint_name: ClassVar[str] = "best.safetensors"
    # The clips every evaluation of this task runs, overriding --clips (None: --clips decides).
    eval_clips: ClassVar[str | None] = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info: dict[str, Any] = {}  # label facts the model and metadata need (ef_mean, class_names)

    @staticmethod
    def head(cfg: ModelConfig, num_classes: int, ef_mean: float, ef_std: float) -> nn.Module:
        """The head on the encoder, from the config, the class count, and the EF mean and spread the output
        starts at (EF only)."""
        raise NotImplementedError

    @staticmethod
    def evaluate(job: EvalJob) -> dict[str, Any]:
        """`evim3 eval`: write predictions and plots into job.out; return the metrics and "files"."""
        raise NotImplementedError

    @property
    def file_task(self) -> str:
        """The `task` its checkpoints' metadata names: a task registered in evim3.runtime.tasks."""
        return self.name

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
            preset=self.cfg.preset, model=self.cfg.model_config().to_dict(), preprocess=spec, task=self.file_task,
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


TASKS: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    """Make `task` the torch half of the task of its name (a class decorator); its edge half, a TaskSpec of the
    same name, must be registered already (evim3.runtime.tasks.register_task)."""
    task_spec(task.name)
    TASKS[task.name] = task
    return task


def task_class(name: str) -> type[Task]:
    """The torch half of task `name`; ValueError naming the registered tasks, or the missing half."""
    task_spec(name)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task {name!r} has no torch half: register its Task (evim3.tasks.register)") from None
