"""The model file formats, one table: each format's suffix, the engine that runs it, the pip extras that engine
needs, the function that writes it (evim3.export) and the one that opens it as a Backend (evim3.runtime).
`evim3 export`, `open_backend` and `evim3 check` all read it. Pure Python: functions are named
("module:function") and imported when used, so reading the table imports no engine and no torch.

A new format: a backend module with an ``open_...(path, provider, threads, spinning, scan) -> Backend``
function, then ``register_format(ModelFormat(...))``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evim3.runtime.errors import ModelFileError


@dataclass(frozen=True)
class ModelFormat:
    name: str  # `evim3 export --format NAME`
    suffix: str  # of the file, lower case with its dot
    engine: str  # what runs it, for the user
    extras: tuple[str, ...]  # pip extras that install the engine (any one of them)
    export: str  # "module:function" writing the file (evim3.export; torch)
    opener: str  # "module:function" opening it: (path, provider, threads, spinning, scan) -> Backend

    def open(self) -> Callable[..., Any]:
        return _named(self.opener)

    def exporter(self) -> Callable[..., Any]:
        return _named(self.export)


FORMATS: dict[str, ModelFormat] = {}  # by suffix


def register_format(fmt: ModelFormat) -> ModelFormat:
    FORMATS[fmt.suffix] = fmt
    return fmt


def format_of(path: str | os.PathLike) -> ModelFormat:
    """The format of a model file by its suffix; ModelFileError naming the known suffixes."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        hint = " (a training checkpoint: export it first, `evim3 export`)" if suffix == ".safetensors" else ""
        raise ModelFileError(path, f"unknown model file type{hint}; expected {' or '.join(FORMATS)}")
    return FORMATS[suffix]


def _named(reference: str) -> Callable[..., Any]:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


register_format(ModelFormat("onnx", ".onnx", "ONNX Runtime", ("cpu", "fast-cpu", "gpu"),
                            "evim3.export.onnx:export_checkpoint", "evim3.runtime.backend_ort:open_onnx"))
register_format(ModelFormat("engine", ".engine", "TensorRT", ("gpu",), "evim3.export.tensorrt:build_engine",
                            "evim3.runtime.backend_trt:open_engine"))
