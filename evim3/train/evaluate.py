"""`evim3 eval`: run a checkpoint over one split, then write per-video predictions, metrics with bootstrap
95 % intervals, and plots. What is predicted, measured and drawn is the task's (`evaluate` of its module in
evim3.tasks: ef.py, classification.py, seg.py); this module loads the checkpoint, names the output folder
and writes metrics.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from evim3.checkpoint import checkpoint_file, load_model
from evim3.runtime.atomic import write_atomic
from evim3.runtime.errors import CheckpointError
from evim3.tasks import task_class
from evim3.tasks.base import EvalJob
from evim3.tasks.common import METRICS_JSON
from evim3.train.distributed import resolve_device


def parse_clips(text: str) -> str | int:
    """'first', 'all' or a positive count k, as the --clips option takes them."""
    if text in ("first", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--clips must be first, all or a positive number, got {text!r}")


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
    task = task_class(meta.task)
    clips = task.eval_clips or clips
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), f"eval_{split.lower()}_{clips}")
    job = EvalJob(model, meta, torch_device, data, csv_path, split, clips, out, batch, workers, resamples,
                  max_videos)
    report = task.evaluate(job)
    report.update({"checkpoint": os.path.abspath(path), "split": split.upper(), "clips": clips,
                   "out": os.path.abspath(out)})
    write_atomic(os.path.join(out, METRICS_JSON), json.dumps(report, indent=2) + "\n")
    return report


def load_model_for_eval(path: str, device: torch.device):
    from evim3.checkpoint import read_meta

    if read_meta(path).data.get("stage") == "pretrain":
        raise CheckpointError(path, "is a pre-training (masked autoencoder) checkpoint: fine-tune it first "
                                    "(evim3 train finetune --init ...)")
    return load_model(path, device=device)
