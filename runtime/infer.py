"""The inference pipeline: source -> frames -> preprocess -> sliding clips -> backend -> EF per clip and per
video, timing every stage. No torch: numpy, PyAV/pydicom (through evim3.runtime.video) and a Backend.

Files are decoded whole, preprocessed by the same function as training (evim3.runtime.preprocess, with the
model's own PreprocessSpec), cut into clips every `stride` resampled frames and run in batches. Live sources
(evim3.runtime.live) are analysed as frames arrive: one clip every `stride` frames, each with its timestamp.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from evim3.runtime.backends import Backend, latency_percentiles
from evim3.runtime.errors import EchoInputError, Evim3Error, TooShortError
from evim3.runtime.live import LiveFrame, LiveReader, is_live_source
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.outputs import clip_values
from evim3.runtime.preprocess import (
    motion_region,
    preprocess,
    preprocess_frames,
    real_frame_share,
    sample_clip_indices,
    sliding_clip_starts,
)
from evim3.runtime.video import Video, iter_video_files, read_video

STRIP_FRAMES = 8  # frames kept per source for the --plot strip
# Shortest video analysed: a clip mostly made of repeated frames cannot measure a heartbeat. Shorter than the
# model's clip but above this, the clip loops the video, with a warning and its share of real frames.
MIN_VIDEO_SECONDS = 0.5
MIN_CLIP_SHARE = 0.5  # of the model's clip span (spec.clip_seconds)


@dataclass
class ClipResult:
    start_s: float  # source time of the clip's first and last frame
    end_s: float
    values: list[float]  # [EF in points] for EF models; class probabilities for classification models
    real_share: float = 1.0  # share of the clip's frames that are not repeats of a looped short video

    def to_dict(self, class_names: list[str]) -> dict:
        d = {"start_s": self.start_s, "end_s": self.end_s, "real_frame_share": self.real_share}
        if class_names:
            return {**d, "probabilities": dict(zip(class_names, self.values))}
        return {**d, "ef": self.values[0]}


@dataclass
class SourceResult:
    """What one source (file or stream) gave: its clips, or the one-line reason it failed."""

    source: str
    clips: list[ClipResult] = field(default_factory=list)
    duration_s: float = 0.0  # seconds of video analysed
    error: str | None = None
    dropped_frames: int = 0  # live --realtime only
    interrupted: bool = False  # live source stopped with Ctrl-C
    strip: list[tuple[float, np.ndarray]] = field(default_factory=list, repr=False)  # (time, frame) for plots

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def real_share(self) -> float:
        """The smallest share of real (not looped) frames over the clips: below 1 for a video shorter
        than one clip."""
        return min((c.real_share for c in self.clips), default=1.0)

    def mean_values(self) -> list[float] | None:
        """Per-video result: the mean over clips of EF (one value) or of each class probability."""
        if not self.clips:
            return None
        return np.mean([c.values for c in self.clips], axis=0).tolist()

    def to_dict(self, class_names: list[str]) -> dict:
        d: dict = {"source": self.source, "ok": self.ok, "error": self.error, "duration_s": self.duration_s,
                   "num_clips": len(self.clips), "real_frame_share": self.real_share}
        mean = self.mean_values()
        if class_names:
            d["probabilities"] = None if mean is None else dict(zip(class_names, mean))
            d["prediction"] = None if mean is None else class_names[int(np.argmax(mean))]
        else:
            d["ef"] = None if mean is None else mean[0]
        if self.dropped_frames or self.interrupted:
            d.update(dropped_frames=self.dropped_frames, interrupted=self.interrupted)
        d["clips"] = [c.to_dict(class_names) for c in self.clips]
        return d


@dataclass
class Stage:
    """Durations of one pipeline stage, one sample per call (per video, per frame, per batch...)."""

    unit: str
    seconds: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return float(sum(self.seconds))

    def to_dict(self) -> dict:
        return {"unit": self.unit, "count": len(self.seconds), "total_s": self.total_s,
                **{f"{k}_ms": v for k, v in latency_percentiles(self.seconds, (50, 95)).items()}}


@dataclass
class Timings:
    stages: dict[str, Stage] = field(default_factory=dict)  # "decode", "preprocess", "inference"
    video_s: float = 0.0  # seconds of video analysed
    wall_s: float = 0.0  # wall time spent on sources (model loading excluded)
    clips: int = 0

    def stage(self, name: str, unit: str) -> Stage:
        """The stage `name` timed per `unit`; files and live streams time decoding per video/per frame."""
        key = f"{name} per {unit}"
        return self.stages.setdefault(key, Stage(unit))

    def total(self, name: str) -> float:
        return sum(s.total_s for key, s in self.stages.items() if key.startswith(f"{name} "))

    @property
    def realtime_factor(self) -> float:
        """Video seconds analysed per wall second."""
        return self.video_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def input_share(self) -> float:
        """Fraction of the wall time spent decoding and preprocessing."""
        return (self.total("decode") + self.total("preprocess")) / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"stages": {k: s.to_dict() for k, s in self.stages.items()}, "video_s": self.video_s,
                "wall_s": self.wall_s, "clips": self.clips, "realtime_factor": self.realtime_factor,
                "decode_preprocess_share": self.input_share}


def check_long_enough(source: str, duration_s: float, spec: PreprocessSpec) -> None:
    """Refuse a video under MIN_VIDEO_SECONDS or under MIN_CLIP_SHARE of the model's clip."""
    minimum = max(MIN_VIDEO_SECONDS, MIN_CLIP_SHARE * spec.clip_seconds)
    if duration_s < minimum:
        raise TooShortError(source, f"video is too short: {duration_s:.2f} s, the model needs at least "
                                    f"{minimum:.2f} s (half its {spec.clip_seconds:.2f} s clip, and at least "
                                    f"{MIN_VIDEO_SECONDS:g} s)")


def expand_sources(sources: list[str]) -> Iterator[tuple[str, EchoInputError | None]]:
    """Each source as (source, None), folders replaced by the video files under them (recursive);
    a folder without videos comes back as (folder, error)."""
    for source in sources:
        if is_live_source(source) or not os.path.isdir(source):
            yield source, None
            continue
        files = list(iter_video_files([source]))
        if not files:
            yield source, EchoInputError(source, "folder holds no video or DICOM files")
        for path in files:
            yield os.fspath(path), None


class InferencePipeline:
    """Runs sources through one backend; collects per-stage timings over every source it runs."""

    def __init__(self, backend: Backend, stride: int | None = None, batch: int = 1, keep_strip: bool = False):
        self.backend = backend
        self.spec = backend.meta.preprocess
        self.class_names = backend.meta.class_names if backend.meta.task == "classification" else []
        self.stride = stride or max(1, self.spec.clip_span // 2)
        if self.stride < 1 or batch < 1:
            raise ValueError(f"stride and batch must be >= 1 (got stride {stride}, batch {batch})")
        self.batch = batch
        self.keep_strip = keep_strip
        self.timings = Timings()

    @contextlib.contextmanager
    def _timed(self, name: str, unit: str) -> Iterator[None]:
        """Add the duration of the `with` block to the stage `name` (per `unit`)."""
        stage = self.timings.stage(name, unit)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            stage.seconds.append(time.perf_counter() - t0)

    def _run_clips(self, clips: np.ndarray) -> list[list[float]]:
        """Backend outputs as per-clip values: EF, or class probabilities."""
        with self._timed("inference", "batch"):
            out = self.backend.run(clips[:, None])
        self.timings.clips += len(clips)
        return clip_values(out, self.backend.meta).tolist()

    def run_file(self, path: str) -> SourceResult:
        """Decode, preprocess and analyse one video/DICOM file; a bad file gives a result with .error."""
        t0 = time.perf_counter()
        try:
            with self._timed("decode", "video"):
                video = read_video(path)
            return self.run_video(video)
        except EchoInputError as e:
            return SourceResult(path, error=str(e))
        finally:
            self.timings.wall_s += time.perf_counter() - t0

    def run_video(self, video: Video) -> SourceResult:
        spec = self.spec
        with self._timed("preprocess", "video"):
            frames = preprocess(video, spec)
        result = SourceResult(video.source, duration_s=len(video.frames) / video.fps)
        check_long_enough(video.source, result.duration_s, spec)
        starts = sliding_clip_starts(len(frames), spec, self.stride)
        for i in range(0, len(starts), self.batch):
            batch_starts = starts[i:i + self.batch]
            clips = np.stack([frames[sample_clip_indices(len(frames), spec, s)] for s in batch_starts])
            for start, values in zip(batch_starts, self._run_clips(clips)):
                result.clips.append(ClipResult(start / spec.fps, (start + spec.clip_span - 1) / spec.fps, values,
                                               real_frame_share(len(frames), spec, start)))
        if self.keep_strip:
            picks = np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int)
            result.strip = [(i / spec.fps, frames[i]) for i in picks]
        self.timings.video_s += result.duration_s
        return result

    def run_live(self, source: str, realtime: bool = False,
                 on_clip: Callable[[ClipResult], None] | None = None) -> SourceResult:
        """Analyse a stream as it arrives, one clip every `stride` resampled frames, until the stream ends or
        Ctrl-C. `on_clip` sees each clip as soon as it is computed."""
        t0 = time.perf_counter()
        result = SourceResult(source)
        decode = self.timings.stage("decode", "frame")
        try:
            # The queue holds two clips' worth of frames, so after a --realtime drop the consumer can
            # restart from a whole contiguous clip.
            reader = LiveReader(source, queue_seconds=2 * self.spec.clip_seconds + 1.0, realtime=realtime)
            with reader:
                try:
                    for clip in self._live_clips(reader.frames(), reader.fps, result):
                        result.clips.append(clip)
                        if on_clip:
                            on_clip(clip)
                except KeyboardInterrupt:
                    result.interrupted = True
                finally:
                    reader.stop()
                    result.dropped_frames = reader.dropped
                    decode.seconds.extend(reader.decode_seconds)
                    result.duration_s = len(reader.decode_seconds) / reader.fps
        except Evim3Error as e:
            result.error = str(e)
        finally:
            self.timings.wall_s += time.perf_counter() - t0
            self.timings.video_s += result.duration_s
        return result

    def _live_clips(self, frames: Iterator[LiveFrame], fps: float, result: SourceResult) -> Iterator[ClipResult]:
        """Clips over a window of contiguous source frames that slides by `stride` resampled frames."""
        spec = self.spec
        ratio = fps / spec.fps  # source frames per resampled frame
        window_len = math.ceil(spec.clip_span * ratio)
        window: deque[LiveFrame] = deque()
        region = None  # the ultrasound region, found from the motion in the first window, then kept
        clips_since_gap = 0
        for frame in frames:
            if window and frame.index != window[-1].index + 1:  # frames were dropped: never clip across the gap
                window.clear()
                clips_since_gap = 0
            window.append(frame)
            if len(window) < window_len:
                continue
            with self._timed("preprocess", "clip"):
                images = np.stack([f.image for f in window])
                region = region or motion_region(images)
                resampled = preprocess_frames(images, fps, spec, region)
                start = max(0, len(resampled) - spec.clip_span)
                clip = resampled[sample_clip_indices(len(resampled), spec, start)]
            (values,) = self._run_clips(clip[None])
            if self.keep_strip:
                result.strip = _thin(result.strip + [(window[0].time, clip[0])])
            yield ClipResult(window[0].time, window[-1].time, values)
            # Slide in source frames; rounding the running total keeps long streams from drifting.
            clips_since_gap += 1
            advance = round(clips_since_gap * self.stride * ratio) - round((clips_since_gap - 1) * self.stride * ratio)
            for _ in range(min(advance, len(window))):
                window.popleft()


def _thin(strip: list, keep: int = STRIP_FRAMES) -> list:
    """Bound a growing strip: drop every other frame once it holds twice what a plot shows."""
    return strip[::2] if len(strip) >= 2 * keep else strip
