"""ONNX -> TensorRT engine (TensorRT 10.3 / JetPack 6 and newer), written as an evim3 engine file.

Precision:
* fp32: TF32 is switched off (it is on by default in TensorRT), so an fp32 engine is fp32.
* fp16, TensorRT 10.x: the fp32 ONNX with BuilderFlag.FP16, and every layer of the selective scan (the
  ONNX nodes tagged SCAN_TAG by export/onnx.py: the Scan loops, their bodies and the exp) constrained to
  float32 with OBEY_PRECISION_CONSTRAINTS.
* fp16, TensorRT >= 11 (no BuilderFlag.FP16): a strongly typed network from the fp16 ONNX, whose types
  already keep the scan in float32 (export_onnx(fp16=True)).
* int8: the fp32 ONNX with BuilderFlag.INT8 (and FP16 for the layers INT8 does not suit), calibrated by
  TensorRT's entropy calibrator on clips of a dataset folder (CalibrationClips: the first clip of each
  TRAIN video, preprocessed as `evim3 infer` does), the scan pinned to float32 as for fp16. The calibration
  table is cached in a file: with it, a rebuild needs no clips. (Implicit INT8 calibration is deprecated
  from TensorRT 10.1 on, in favour of Q/DQ graphs, but still builds on 10.x.)

The batch gets an optimisation profile (min, opt, max); a fixed-batch ONNX gets the profile of its size.
Tactic timings are kept in a timing cache file so rebuilding is quick.

Importable without TensorRT or a GPU: building raises BackendUnavailableError naming what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from evim3.export.onnx import SCAN_TAG, read_onnx_meta
from evim3.export.trt_rules import require_tensorrt_ready
from evim3.runtime.atomic import write_atomic
from evim3.runtime.engine_file import EngineHeader, current_gpu, pack_engine
from evim3.runtime.errors import BackendUnavailableError, ModelFileError
from evim3.runtime.meta import INPUT_NAME, PreprocessSpec
from evim3.runtime.parity_check import dataset_videos, video_clip

MIN_TENSORRT = (10, 3)
CALIBRATION_CLIPS = 64  # videos whose first clip calibrates an INT8 engine (TensorRT suggests ~500 images
#                         for image models; a clip is T frames, so 64 clips are thousands of frames)
CALIBRATION_SPLIT = "TRAIN"  # never the TEST videos that evaluation reports on


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


class CalibrationClips:
    """The clips an INT8 engine is calibrated on, in fixed-size float32 batches, and its calibration cache.

    Clips: the first clip of each of the first `count` CALIBRATION_SPLIT videos of an EchoNet-layout folder
    (or of the video files of a plain folder), read and preprocessed exactly as `evim3 infer` does, one video
    at a time as batches are asked for. TensorRT's calibrator takes batches of one size only: a last partial
    batch is left out. The cache file holds TensorRT's calibration table; when it exists, TensorRT reads it
    and asks for no batch.
    """

    def __init__(self, spec: PreprocessSpec, cache_path: str | os.PathLike, folder: str | os.PathLike | None = None,
                 batch: int = 1, count: int = CALIBRATION_CLIPS):
        if batch < 1 or count < 1:
            raise ValueError(f"calibration batch and clip count must be >= 1, got {batch} and {count}")
        self.spec, self.batch = spec, batch
        self.cache_path = os.fspath(cache_path)
        if folder is None and not os.path.isfile(self.cache_path):
            raise ModelFileError(self.cache_path, "no calibration cache here: give a dataset folder to calibrate on")
        self.videos = dataset_videos(folder, count, split=CALIBRATION_SPLIT) if folder is not None else []

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, 1, self.spec.frames, self.spec.size, self.spec.size)

    def __len__(self) -> int:
        """Batches one pass yields."""
        return len(self.videos) // self.batch

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self) * self.batch, self.batch):
            clips = [video_clip(path, self.spec) for path in self.videos[start:start + self.batch]]
            yield np.ascontiguousarray(np.stack(clips), dtype=np.float32)

    def read_cache(self) -> bytes | None:
        try:
            with open(self.cache_path, "rb") as f:
                return f.read() or None
        except FileNotFoundError:
            return None

    def write_cache(self, table: bytes) -> None:
        write_atomic(self.cache_path, bytes(table))


def make_calibrator(trt: Any, clips: CalibrationClips) -> Any:
    """A TensorRT entropy calibrator (IInt8EntropyCalibrator2) that copies each batch of `clips` into one
    device buffer (cuda-python) and keeps its table in clips' cache file."""
    from evim3.runtime.backends import import_tensorrt_cuda

    _, cudart = import_tensorrt_cuda()

    def cuda(result: tuple) -> Any:
        err, *values = result
        if err != cudart.cudaError_t.cudaSuccess:
            raise BackendUnavailableError(None, f"CUDA call failed during INT8 calibration: {err}")
        return values[0] if values else None

    class ClipCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(clips)
            self.device = None

        def get_batch_size(self) -> int:
            return clips.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            host = next(self.batches, None)
            if host is None:
                return None  # calibration is over
            if self.device is None:
                self.device = cuda(cudart.cudaMalloc(host.nbytes))
            cuda(cudart.cudaMemcpy(self.device, host.ctypes.data, host.nbytes,
                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return clips.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            clips.write_cache(bytes(cache))

        def free(self) -> None:
            if self.device is not None:
                cudart.cudaFree(self.device)
                self.device = None

    return ClipCalibrator()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, workspace_gib: float = 4.0,
                 batch: tuple[int, int, int] | None = None, fp16: bool = False,
                 int8: CalibrationClips | None = None,
                 timing_cache: str | os.PathLike | None = None) -> EngineBuild:
    """Build an engine from an evim3 ONNX file and write it with its header (atomically).

    batch: (min, opt, max) for a dynamic-batch ONNX (default (1, 1, 8)); a fixed-batch ONNX takes its
    own size. fp16: an fp16 engine; the ONNX must be the fp32 export on TensorRT 10.x and the fp16
    export on TensorRT >= 11 (fp16_needs_fp16_onnx). int8: an INT8 engine calibrated on these clips
    (from the fp32 ONNX). timing_cache: file read before and written after the build (default: beside
    the engine).
    """
    if fp16 and int8 is not None:
        raise ValueError("choose fp16 or int8, not both (an int8 engine runs in fp16 where int8 does not suit)")
    trt = import_tensorrt()
    gpu = current_gpu() or _torch_gpu()
    if gpu is None:
        raise BackendUnavailableError(None, "no CUDA GPU is visible: TensorRT engines are built on the GPU "
                                            "that will run them")
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    meta, _ = read_onnx_meta(onnx_path)
    require_tensorrt_ready(onnx.load(onnx_path), onnx_path)  # a file from elsewhere: one line, not a parser log
    strongly_typed = meta.precision == "fp16"
    if fp16 and fp16_needs_fp16_onnx(trt) and not strongly_typed:
        raise ValueError(f"TensorRT {trt.__version__} builds fp16 engines from an fp16 ONNX only: export with "
                         "--fp16 first")
    if not fp16 and strongly_typed:
        raise ValueError(f"{onnx_path} is an fp16 ONNX: fp32 and int8 engines need the fp32 export")
    if int8 is not None and meta.precision != "fp32":
        raise ValueError(f"{onnx_path} is a {meta.precision} ONNX: an int8 engine is calibrated from the fp32 export")
    if int8 is not None and not hasattr(trt.BuilderFlag, "INT8"):
        raise BackendUnavailableError(None, f"TensorRT {trt.__version__} has no implicit INT8 calibration")

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
    calibrator = None
    if not strongly_typed:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32 (TF32 is on by default)
        if int8 is not None:
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = make_calibrator(trt, int8)
            config.int8_calibrator = calibrator
        if fp16 or int8 is not None:
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
    if calibrator is not None:  # calibration runs at the calibrator's batch size
        if int8.batch not in range(profile_batch[0], profile_batch[2] + 1):
            raise ValueError(f"calibration batch {int8.batch} is outside the engine's batch {profile_batch}")
        calibration = builder.create_optimization_profile()
        calibration.set_shape(INPUT_NAME, *[(int8.batch, *clip_shape)] * 3)
        config.set_calibration_profile(calibration)

    cache_path = os.fspath(timing_cache) if timing_cache else os.path.splitext(engine_path)[0] + ".timing.cache"
    cache = config.create_timing_cache(_read_bytes(cache_path))
    config.set_timing_cache(cache, ignore_mismatch=False)

    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if plan is None:
        raise ModelFileError(onnx_path, f"TensorRT {trt.__version__} failed to build an engine (see its log above)")
    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    precision = "int8" if int8 is not None else "fp16" if fp16 else "fp32"
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
