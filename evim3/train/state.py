"""The resume file, ``last.state.pt``: everything a run needs to continue exactly, as tensors and plain
containers only (dicts, lists, tuples, numbers, strings), written atomically with torch.save and read
back with ``torch.load(..., weights_only=True)``, which unpickles nothing else.

It holds the model weights too (not only ``last.safetensors``), so one atomic rename makes a checkpoint
complete: a run killed between two files could otherwise pair weights and optimizer state of different
steps.
"""

from __future__ import annotations

import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from evim3.runtime.atomic import atomic_path
from evim3.runtime.errors import CheckpointError

STATE_FILE = "last.state.pt"
STATE_FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as plain data."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave (a round trip may turn them into lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no resume state here (a run writes it at its first checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"resume state cannot be read ({first})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(path, f"not an evim3 resume state (format {STATE_FORMAT})")
    return state
