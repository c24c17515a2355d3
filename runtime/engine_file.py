"""evim3 TensorRT engine files: what a serialized engine needs around it to be used safely elsewhere.

Layout::

    ENGINE_MAGIC (8 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON) | TensorRT plan

The JSON header holds the model's ModelMeta (how to preprocess, how to read the output) and what the plan
is tied to: the TensorRT version and the GPU (name, compute capability) that built it. A plan only
deserializes on the same TensorRT version and GPU type, so readers check those first and say which
differs instead of letting TensorRT fail obscurely.

Pure Python (json, struct): the edge runtime reads engine headers without numpy, torch or TensorRT.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any

from evim3.runtime.errors import ModelFileError
from evim3.runtime.meta import ENGINE_MAGIC, ModelMeta

HEADER_FORMAT = "evim3-engine/1"
_LENGTH = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20  # a header is a few KiB; anything near this is a corrupt length field


@dataclass(frozen=True)
class EngineHeader:
    meta: ModelMeta
    tensorrt: str  # TensorRT version that built the plan, e.g. "10.3.0"
    gpu: str  # device name, e.g. "NVIDIA H100 80GB HBM3" or "Orin"
    compute_capability: str  # e.g. "9.0"
    precision: str  # one of PRECISIONS
    batch: tuple[int, int, int]  # optimisation profile of the batch: min, opt, max

    def to_json(self) -> str:
        d = asdict(self)
        d["meta"] = json.loads(self.meta.to_json())
        d["format"] = HEADER_FORMAT
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineHeader:
        d = json.loads(text)
        if d.pop("format", None) != HEADER_FORMAT:
            raise ValueError(f"not an {HEADER_FORMAT} header")
        d["meta"] = ModelMeta.from_json(json.dumps(d["meta"]), precision=d["precision"])
        d["batch"] = tuple(d["batch"])
        return cls(**d)


def pack_engine(header: EngineHeader, plan: bytes) -> bytes:
    """The bytes of an engine file: magic, header length, header, plan."""
    text = header.to_json().encode()
    return ENGINE_MAGIC + _LENGTH.pack(len(text)) + text + bytes(plan)


def read_engine(path: str | os.PathLike) -> tuple[EngineHeader, bytes]:
    """(header, TensorRT plan) of an evim3 engine file; ModelFileError naming the problem otherwise."""
    path = os.fspath(path)
    with _open(path) as f:
        header = _read_header(path, f)
        plan = f.read()
    if not plan:
        raise ModelFileError(path, "engine file holds a header but no TensorRT plan (truncated?)")
    return header, plan


def read_engine_header(path: str | os.PathLike) -> EngineHeader:
    """Only the header: cheap, for listing or checking engines without reading the plan."""
    path = os.fspath(path)
    with _open(path) as f:
        return _read_header(path, f)


def read_engine_file(path: str | os.PathLike) -> tuple[ModelMeta, bytes]:
    """(ModelMeta, TensorRT plan): what a backend needs to run the engine."""
    header, plan = read_engine(path)
    return header.meta, plan


def _open(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ModelFileError(path, "engine file not found") from None
    except OSError as e:
        raise ModelFileError(path, f"engine file cannot be read ({e.strerror})") from None


def _read_header(path: str, f: Any) -> EngineHeader:
    magic = f.read(len(ENGINE_MAGIC))
    if magic != ENGINE_MAGIC:
        raise ModelFileError(path, "not an evim3 engine file (no EVIM3TRT header; a bare TensorRT plan? "
                                   "build engines with `evim3 export --format engine`)")
    raw_length = f.read(_LENGTH.size)
    if len(raw_length) != _LENGTH.size:
        raise ModelFileError(path, "engine file is truncated inside its header")
    (length,) = _LENGTH.unpack(raw_length)
    if length > _MAX_HEADER_BYTES:
        raise ModelFileError(path, f"engine header length {length} is implausible (corrupt file)")
    text = f.read(length)
    if len(text) != length:
        raise ModelFileError(path, "engine file is truncated inside its header")
    try:
        return EngineHeader.from_json(text.decode())
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise ModelFileError(path, f"engine header is invalid ({e})") from None


def check_engine_compatible(path: str | os.PathLike, header: EngineHeader, tensorrt_version: str,
                            gpu: str, compute_capability: str) -> None:
    """Raise ModelFileError when the plan was built for another TensorRT version or another GPU."""
    built = f"TensorRT {header.tensorrt} on {header.gpu} (sm {header.compute_capability})"
    here = f"TensorRT {tensorrt_version} on {gpu} (sm {compute_capability})"
    if header.tensorrt != tensorrt_version:
        raise ModelFileError(path, f"engine was built with {built}; this machine has {here}: TensorRT plans "
                                   "only load on the version that built them; rebuild it here with "
                                   "`evim3 export --format engine`")
    if header.compute_capability != compute_capability or header.gpu != gpu:
        raise ModelFileError(path, f"engine was built for {built}; this machine has {here}: rebuild it on "
                                   "this GPU with `evim3 export --format engine`")


def current_gpu() -> tuple[str, str] | None:
    """(name, compute capability 'major.minor') of CUDA device 0 through cuda-python, or None when
    cuda-python or a CUDA device is missing."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
