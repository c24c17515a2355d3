"""evim3 checkpoints: one ``.safetensors`` file holding the weights and, in its header, the model's
metadata JSON (evim3.runtime.meta.ModelMeta): everything export and inference need. A readable copy of
the JSON is written beside it (``X.json``); loaders read only the safetensors file.

Writes are atomic (temp file, then rename). Nothing here unpickles: safetensors only.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from evim3 import __version__
from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3
from evim3.runtime.atomic import atomic_path, write_atomic
from evim3.runtime.errors import CheckpointError
from evim3.runtime.meta import META_KEY, ModelMeta


def checkpoint_file(path: str | os.PathLike) -> str:
    """Accept 'X.safetensors', 'X' (with the suffix added), or a run folder holding best.safetensors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(path, "folder holds no best/last/model.safetensors checkpoint")
    if not os.path.exists(path) and os.path.exists(path + ".safetensors"):
        return path + ".safetensors"
    if not os.path.exists(path):
        raise CheckpointError(path, "checkpoint not found")
    return path


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: ModelMeta) -> None:
    path = os.fspath(path)
    meta.version = meta.version or __version__
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={META_KEY: meta.to_json()})
    write_atomic(os.path.splitext(path)[0] + ".json", json.dumps(json.loads(meta.to_json()), indent=2) + "\n")


def read_meta(path: str | os.PathLike) -> ModelMeta:
    path = checkpoint_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors checkpoint ({e})") from None
    if META_KEY not in header:
        raise CheckpointError(path, "safetensors file carries no evim3 metadata (not an evim3 checkpoint)")
    try:
        return ModelMeta.from_json(header[META_KEY])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, f"evim3 metadata is invalid ({e})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    meta = read_meta(path)
    path = checkpoint_file(path)
    try:
        return load_file(path), meta
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"weights cannot be read ({e})") from None


def build_model(meta: ModelMeta) -> EViM3:
    cfg = ModelConfig.from_dict(meta.model)
    return EViM3(cfg, task=meta.task, num_classes=len(meta.class_names), ef_mean=meta.ef_mean or 0.0,
                 ef_std=meta.ef_std)


def load_model(
    path: str | os.PathLike, preset: str | None = None, device: str | torch.device = "cpu"
) -> tuple[EViM3, ModelMeta]:
    """The model in eval mode and its metadata; `preset` (when given) must match the checkpoint's."""
    state, meta = load_checkpoint(path)
    if preset is not None and meta.preset != preset:
        raise CheckpointError(path, f"checkpoint is preset {meta.preset!r}, not {preset!r} as asked")
    try:
        model = build_model(meta)
    except (ValueError, TypeError) as e:  # unknown keys, wrong types or geometry in the stored config
        raise CheckpointError(path, f"model config in the evim3 metadata is invalid ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(path, f"weights do not fit preset {meta.preset!r}: {first}") from None
    return model.to(device).eval(), meta
