"""evim3.runtime: the edge runtime. numpy, PyAV, pydicom, onnxruntime or TensorRT — never torch.

The public API is ``evim3.runtime.load`` (runtime/api.py): ``load("m.onnx").predict("a4c.dcm")``. It is
imported on first use, so that ``import evim3.runtime`` (and ``evim3 --help``) stays fast; submodules import
directly (``from evim3.runtime.video import read_video``).
"""

from __future__ import annotations

from typing import Any

_API = ("load", "Model", "Result", "BeatResult")


def __getattr__(name: str) -> Any:
    if name in _API:
        from evim3.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'evim3.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
