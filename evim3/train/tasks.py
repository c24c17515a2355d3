"""The trainer's side of the tasks: which Task a run trains (the registered task of its --task, or
pre-training; evim3.tasks holds one module per task), and the encoder weights it starts from (--init).
The loop (evim3.train.loop) is shared.
"""

from __future__ import annotations

import os

from torch import nn

from evim3.checkpoint import checkpoint_file, load_checkpoint
from evim3.runtime.errors import CheckpointError
from evim3.runtime.meta import ModelMeta
from evim3.tasks import Task, task_class
from evim3.tasks.pretrain import PRETRAIN_FILE, PretrainTask
from evim3.train.recipe import TrainConfig


def make_task(cfg: TrainConfig) -> Task:
    if cfg.stage == "pretrain":
        return PretrainTask(cfg)
    return task_class(cfg.task)(cfg)


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
