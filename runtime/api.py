"""The public Python API of the edge runtime: load an exported model, predict on a source.

    import evim3.runtime as rt
    with rt.load("model.onnx") as model:
        result = model.predict("a4c.dcm")
    print(result.ef, result.to_dict())

`evim3 infer` and `evim3 bench` call this; so can any program (a DICOM node, a notebook). No torch: numpy,
PyAV, pydicom and the backend (ONNX Runtime or TensorRT).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from evim3.runtime.backends import Backend, open_backend
from evim3.runtime.errors import EchoInputError
from evim3.runtime.infer import ClipResult, InferencePipeline, SourceResult
from evim3.runtime.live import is_live_source
from evim3.runtime.meta import ModelMeta
from evim3.runtime.provenance import Provenance
from evim3.runtime.seg import Beat
from evim3.runtime.tasks import task_spec
from evim3.runtime.timing import Stage, Timings, latency_percentiles
from evim3.runtime.video import VideoReader, open_dicom_dataset, open_frames, open_video

if TYPE_CHECKING:
    from typing_extensions import Self

# What predict() takes: a file (video or DICOM) or live source by path, a pydicom Dataset, or frames.
Source = str | os.PathLike | pydicom.Dataset | Iterable[np.ndarray]


@dataclass(frozen=True)
class BeatResult:
    """One beat a seg model found: `beat` in the model's frame numbering (the video resampled to the model's
    fps, as `evim3 infer` reports it), and its ED and ES frames in the source's own numbering."""

    beat: Beat
    ed_source_frame: int
    es_source_frame: int

    @property
    def ef(self) -> float:
        return self.beat.ef


class Result:
    """What a model gave for one source: `clips` (per clip: its time span in the source and its values, EF
    or class probabilities), a seg model's `masks` (the LV of every model frame, size x size bool, None
    where no clip covered the frame; `source.to_source_xy` maps their pixels back), `timings`, `source`
    (the provenance: the frames used, the crop and resize, the maps back to source frames and pixels)."""

    def __init__(self, raw: SourceResult, class_names: list[str]):
        self.raw = raw  # the pipeline's record, as `evim3 infer` reports it
        self.class_names = class_names
        self.ok, self.error = raw.ok, raw.error
        self.clips: list[ClipResult] = raw.clips
        self.masks: list[np.ndarray | None] = raw.lv_masks
        self.timings: Timings = raw.timings
        self.source: Provenance | None = raw.provenance

    @property
    def ef(self) -> float | None:
        """The video's EF: the mean over clips of an EF model, the mean over beats of a seg model; None for a
        classification model, or without clips or beats. The number `evim3 infer --json` reports as "ef"
        (a seg model's: as "lv.ef_mean")."""
        if self.raw.lv is not None:
            return self.raw.lv.ef_mean
        mean = self.raw.mean_values()
        return mean[0] if mean is not None and task_spec(self.raw.task).reports_ef else None

    @property
    def probabilities(self) -> dict[str, float] | None:
        """A classification model's class probabilities, mean over clips."""
        mean = self.raw.mean_values()
        return None if mean is None or not self.class_names else dict(zip(self.class_names, mean))

    @property
    def beats(self) -> list[BeatResult]:
        """A seg model's beats (empty otherwise), with ED and ES in model and source frame numbers."""
        if self.raw.lv is None or self.source is None:
            return []
        to_source = self.source.source_frames()
        return [BeatResult(b, int(to_source[b.ed_frame]), int(to_source[b.es_frame])) for b in self.raw.lv.beats]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the entry `evim3 infer --json` writes for this source."""
        return self.raw.to_dict(self.class_names)


class Model:
    """A loaded model file and the one edge pipeline that runs it. Use as a context manager, or close()."""

    def __init__(self, backend: Backend, stride: int | None = None, batch: int = 1):
        self.backend = backend
        self.meta: ModelMeta = backend.meta  # what the file says: preprocessing, task, classes...
        self.task: str = backend.meta.task
        self.path: str = backend.path
        self.device: str = backend.device  # what runs it, for the user
        self.stride = stride
        self.batch = batch

    def pipeline(self, keep_strip: bool = False, keep_frames: bool = False,
                 keep_masks: bool = True) -> InferencePipeline:
        """The pipeline predict() runs, for callers that run many sources and keep its added-up timings."""
        return InferencePipeline(self.backend, stride=self.stride, batch=self.batch, keep_strip=keep_strip,
                                 keep_frames=keep_frames, keep_masks=keep_masks)

    def predict(self, source: Source, fps: float | None = None, *, name: str | None = None) -> Result:
        """Run one source: a video or DICOM file (str or Path), a live stream URL or camera, a pydicom
        Dataset, or an iterable of uint8 frames, gray (H, W) or RGB (H, W, 3), at `fps`. `name` names a
        dataset or frames in messages and results. A source that cannot be used raises its one-line
        EchoInputError."""
        result = self.analyse(source, fps, name=name, pipeline=self.pipeline())
        if result.error is not None:
            raise EchoInputError(None, result.error)
        return result

    def analyse(self, source: Source, fps: float | None = None, *, name: str | None = None,
                pipeline: InferencePipeline | None = None, realtime: bool = False,
                on_clip: Callable[[ClipResult], None] | None = None) -> Result:
        """predict() without raising: a source that cannot be used gives a Result with .error (what
        `evim3 infer` reports and goes on). `pipeline` (from pipeline()) adds its timings up over calls;
        `realtime` and `on_clip` are for live sources."""
        pipeline = pipeline or self.pipeline()
        names = pipeline.class_names
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if is_live_source(path):
                return Result(pipeline.run_live(path, realtime=realtime, on_clip=on_clip), names)
            return Result(pipeline.run_reader(lambda: open_video(path), name or path), names)
        return Result(pipeline.run_reader(_reader_of(source, fps, name), name or _default_name(source)), names)

    def benchmark(self, batch: int = 1, warmup: int = 3, runs: int = 20, seed: int = 0) -> dict[str, Any]:
        """Latency of the backend on random clips of the model's shape, and what it means in real time.

        A clip covers spec.clip_span resampled frames; with stride s a video second needs spec.fps / s clips,
        so real-time factor = clips/s / (fps / s).
        """
        backend, spec = self.backend, self.meta.preprocess
        stride = self.stride or spec.default_stride
        clips = np.random.default_rng(seed).standard_normal((batch, *backend.input_shape), dtype=np.float32)
        for _ in range(warmup):
            backend.run(clips)
        latency = Stage("run")
        for _ in range(runs):
            with latency.timed():
                backend.run(clips)
        clips_per_s = batch * runs / latency.total_s
        return {
            "model": backend.path, "preset": self.meta.preset, "device": backend.device,
            "batch": batch, "warmup": warmup, "runs": runs,
            "clip": list(backend.input_shape), "fps": spec.fps, "period": spec.period, "stride": stride,
            "latency_ms": latency_percentiles(latency.seconds), "clips_per_s": clips_per_s,
            "realtime_factor": clips_per_s / (spec.fps / stride),
        }

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | os.PathLike, provider: str | None = None, threads: int | None = None, scan: str = "auto",
         *, stride: int | None = None, batch: int = 1) -> Model:
    """Open an exported model file (.onnx, .engine): its backend, chosen by the suffix, and its metadata.

    provider: 'tensorrt' | 'cuda' | 'cpu' for ONNX files (None: the best available); threads: ONNX Runtime's
    CPU threads (None: every CPU this process may use); scan: 'auto' | 'fused' | 'graph', how ONNX Runtime
    on CPU runs the selective scans; stride: model frames between clip starts (None: half a clip); batch:
    clips per inference call. Raises a one-line ModelFileError or BackendUnavailableError.
    """
    return Model(open_backend(path, provider=provider, threads=threads, scan=scan), stride=stride, batch=batch)


def _reader_of(source: Any, fps: float | None, name: str | None) -> Callable[[], VideoReader]:
    """How to open a dataset or frames (not a path)."""
    if isinstance(source, pydicom.Dataset):
        return lambda: open_dicom_dataset(source, source=name)
    if fps is None:
        raise ValueError("frames need their frame rate: predict(frames, fps=...)")
    return lambda: open_frames(source, fps, name or "frames")


def _default_name(source: Any) -> str:
    if isinstance(source, pydicom.Dataset):
        return f"DICOM {source.get('SOPInstanceUID', '(no SOPInstanceUID)')}"
    return "frames"
