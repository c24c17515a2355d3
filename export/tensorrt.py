"""ONNX -> TensorRT engine (TensorRT 10.3 / JetPack 6 and newer), written as an evim3 engine file.

Precision:
* fp32: TF32 is switched off (it is on by default in TensorRT), so an fp32 engine is fp32.
* fp16, TensorRT 10.x: the fp32 ONNX with BuilderFlag.FP16, and every layer of the selective scan (the
  ONNX nodes tagged SCAN_TAG by export/onnx.py: the Scan loops, their bodies and the exp) constrained to
  float32 with OBEY_PRECISION_CONSTRAINTS.
* fp16, TensorRT >= 11 (no BuilderFlag.FP16): a strongly typed network from the fp16 ONNX, whose types
  already keep the scan in float32 (export_onnx(fp16=True)).
* int8: the Q/DQ ONNX of `evim3 export --int8` (export/quantize.py: linear layers int8, everything else
  float32, activation scales calibrated on TRAIN clips), built strongly typed on every version: TensorRT's
  explicit quantization, the only INT8 that TensorRT 11 has (it removed implicit calibration and the INT8
  builder flag). The same file runs in ONNX Runtime.

The batch gets an optimisation profile (min, opt, max); a fixed-batch ONNX gets the profile of its size.
Tactic timings are kept in a timing cache file so rebuilding is quick.

Importable without TensorRT or a GPU: building raises BackendUnavailableError naming what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import onnx
from evim3.export.defaults import ENGINE_WORKSPACE_GIB
from evim3.export.onnx import SCAN_TAG, read_onnx_meta
from evim3.export.trt_rules import require_tensorrt_ready
from evim3.runtime.atomic import write_atomic
from evim3.runtime.engine_file import EngineHeader, current_gpu, pack_engine
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import INPUT_NAME

MIN_TENSORRT = (10, 3)


@dataclass(frozen=True)
class EngineBuild:
    path: str
    header: EngineHeader
    seconds: float
    strongly_typed: bool


def import_tensorrt() -> Any:
    """The tensorrt module (>= 10.3), or BackendUnavailableError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(None, "TensorRT is not installed (pip install 'evim3[gpu]', or JetPack's "
                                            "python3-libnvinfer on a Jetson)") from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise BackendUnavailableError(None, f"TensorRT {trt.__version__} is too old: evim3 engines need "
                                            f">= {'.'.join(map(str, MIN_TENSORRT))}")
    return trt


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def fp16_needs_fp16_onnx(trt: Any) -> bool:
    """TensorRT >= 11 dropped BuilderFlag.FP16: fp16 engines come from an fp16 ONNX, strongly typed."""
    return not hasattr(trt.BuilderFlag, "FP16")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 workspace_gib: float = ENGINE_WORKSPACE_GIB, batch: tuple[int, int, int] | None = None,
                 fp16: bool = False, timing_cache: str | os.PathLike | None = None) -> EngineBuild:
    """Build an engine from an evim3 ONNX file and write it with its header (atomically).

    batch: (min, opt, max) for a dynamic-batch ONNX (default (1, 1, 8)); a fixed-batch ONNX takes its
    own size. fp16: an fp16 engine; the ONNX must be the fp32 export on TensorRT 10.x and the fp16
    export on TensorRT >= 11 (fp16_needs_fp16_onnx). An int8 engine comes from the int8 (Q/DQ) ONNX, whose
    precision the file states. timing_cache: file read before and written after the build (default: beside
    the engine).
    """
    trt = import_tensorrt()
    gpu = current_gpu() or _torch_gpu()
    if gpu is None:
        raise BackendUnavailableError(None, "no CUDA GPU is visible: TensorRT engines are built on the GPU "
                                            "that will run them")
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    meta, _ = read_onnx_meta(onnx_path)
    require_tensorrt_ready(onnx.load(onnx_path), onnx_path)  # a file from elsewhere: one line, not a parser log
    # fp16 and int8 files carry their types (float16 compute; Q/DQ pairs): built as typed, on every version
    strongly_typed = meta.precision in ("fp16", "int8")
    if fp16 and fp16_needs_fp16_onnx(trt) and meta.precision != "fp16":
        raise ValueError(f"TensorRT {trt.__version__} builds fp16 engines from an fp16 ONNX only: export with "
                         "--fp16 first")
    if not fp16 and meta.precision == "fp16":
        raise ValueError(f"{onnx_path} is an fp16 ONNX: fp32 and int8 engines need the fp32 or int8 export")
    if fp16 and meta.precision == "int8":
        raise ValueError(f"{onnx_path} is an int8 ONNX: an fp16 engine needs the fp32 or fp16 export")

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelFileError(onnx_path, f"TensorRT {trt.__version__} cannot parse this ONNX: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32 (TF32 is on by default)
    if fp16 and not strongly_typed:  # TensorRT 10.x: the fp32 graph, float16 where the scan is not
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_scan_to_float32(trt, network)
        if not pinned:
            raise ModelFileError(onnx_path, f"no layer carries the {SCAN_TAG!r} tag: re-export the ONNX with "
                                            "this evim3 so the scan can be kept in float32")

    profile_batch = _profile_batch(network.get_input(0).shape, batch)
    profile = builder.create_optimization_profile()
    clip_shape = tuple(network.get_input(0).shape)[1:]
    profile.set_shape(INPUT_NAME, *[(b, *clip_shape) for b in profile_batch])
    config.add_optimization_profile(profile)

    cache_path = os.fspath(timing_cache) if timing_cache else os.path.splitext(engine_path)[0] + ".timing.cache"
    cache = config.create_timing_cache(_read_bytes(cache_path))
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelFileError(onnx_path, f"TensorRT {trt.__version__} failed to build an engine (see its log above)")
    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    precision = "fp16" if fp16 else meta.precision
    header = EngineHeader(meta=dataclasses.replace(meta, precision=precision), tensorrt=trt.__version__,
                          gpu=gpu[0], compute_capability=gpu[1], precision=precision, batch=profile_batch)
    write_atomic(engine_path, pack_engine(header, bytes(plan)))
    return EngineBuild(engine_path, header, time.perf_counter() - t0, strongly_typed)


def pin_scan_to_float32(trt: Any, network: Any) -> int:
    """Constrain every layer that came from a SCAN_TAG node to compute and output float32; returns how
    many. (TensorRT names layers after their ONNX nodes, inside loop bodies too.)"""
    float_types = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if SCAN_TAG not in layer.name:
            continue
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in float_types]
        if not outputs:  # shape and index layers: nothing to pin
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _profile_batch(input_shape: Any, batch: tuple[int, int, int] | None) -> tuple[int, int, int]:
    fixed = int(input_shape[0])
    if fixed > 0:  # a fixed-batch graph has one possible profile
        if batch is not None and set(batch) != {fixed}:
            raise ValueError(f"the ONNX has a fixed batch of {fixed}; re-export with --dynamic-batch for {batch}")
        return (fixed, fixed, fixed)
    low, opt, high = batch or (1, 1, 8)
    if not 1 <= low <= opt <= high:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {(low, opt, high)}")
    return (low, opt, high)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _torch_gpu() -> tuple[str, str] | None:
    """(name, compute capability) through torch when cuda-python is missing."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"
