"""The inference pipeline: source -> frames -> preprocess -> sliding clips -> backend -> EF per clip and per
video (or, for a seg model, the LV of every frame, its beats and their EF: evim3.runtime.seg), timing every
stage. No torch: numpy, PyAV/pydicom (through evim3.runtime.video) and a Backend.

Files are streamed: decoded and preprocessed frame by frame on a thread by the same functions as training
(evim3.runtime.preprocess, with the model's own PreprocessSpec), cut into clips every `stride` resampled
frames as they arrive and run in batches; memory does not grow with a file's length. Live sources
(evim3.runtime.live) are analysed as frames arrive: one clip every `stride` frames, each with its timestamp.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from evim3.runtime.backends import Backend
from evim3.runtime.errors import EchoInputError, Evim3Error, TooShortError
from evim3.runtime.live import LiveFrame, LiveReader, is_live_source
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import (
    motion_region,
    motion_window_frames,
    normalise,
    real_frame_share,
    sample_clip_indices,
    stream_to_uint8,
)
from evim3.runtime.provenance import Provenance
from evim3.runtime.seg import FrameStitcher, LVReport, analyse_lv
from evim3.runtime.tasks import TaskSpec, task_spec
from evim3.runtime.timing import Stopwatch, Timings
from evim3.runtime.video import VideoReader, iter_video_files, open_video

STRIP_FRAMES = 8  # frames kept per source for the --plot strip
PREFETCH_FRAMES = 64  # prepared (spec.size^2 uint8) frames the decoding thread may run ahead of inference
T = TypeVar("T")
# Shortest video analysed: a clip mostly made of repeated frames cannot measure a heartbeat. Shorter than the
# model's clip but above this, the clip loops the video, with a warning and its share of real frames.
MIN_VIDEO_SECONDS = 0.5
MIN_CLIP_SHARE = 0.5  # of the model's clip span (spec.clip_seconds)


@dataclass
class ClipResult:
    start_s: float  # source time of the clip's first and last frame
    end_s: float
    # [EF in points] for EF models; class probabilities for classification models; none for seg models (their
    # clips add up to the masks of SourceResult.lv)
    values: list[float]
    real_share: float = 1.0  # share of the clip's frames that are not repeats of a looped short video

    def to_dict(self, spec: TaskSpec, names: list[str]) -> dict:
        """JSON-able, the values as task `spec` names them (`names`: its value names)."""
        d = {"start_s": self.start_s, "end_s": self.end_s, "real_frame_share": self.real_share}
        return {**d, **spec.clip_entry(self.values, names)} if self.values else d


@dataclass
class SourceResult:
    """What one source (file or stream) gave: its clips, or the one-line reason it failed."""

    source: str
    clips: list[ClipResult] = field(default_factory=list)
    task: str = "ef"  # of the model whose clips these are (evim3.runtime.tasks)
    duration_s: float = 0.0  # seconds of video analysed
    error: str | None = None
    dropped_frames: int = 0  # live --realtime only
    interrupted: bool = False  # live source stopped with Ctrl-C
    strip: list[tuple[float, np.ndarray]] = field(default_factory=list, repr=False)  # (time, frame) for plots
    lv: LVReport | None = None  # seg models: the LV of every frame, the beats, their EF
    lv_masks: list[np.ndarray | None] = field(default_factory=list, repr=False)  # seg, keep_frames: per frame
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # keep_frames: the prepared frames
    timings: Timings = field(default_factory=Timings, repr=False)  # of this source alone
    provenance: Provenance | None = None  # the frames the model saw, and the maps back to the source's

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def real_share(self) -> float:
        """The smallest share of real (not looped) frames over the clips: below 1 for a video shorter
        than one clip."""
        return min((c.real_share for c in self.clips), default=1.0)

    def mean_values(self) -> list[float] | None:
        """Per-video result: the mean over clips of EF (one value) or of each class probability; None without
        clips or for a seg model."""
        if not self.clips or not self.clips[0].values:
            return None
        return np.mean([c.values for c in self.clips], axis=0).tolist()

    def to_dict(self, class_names: list[str]) -> dict:
        d: dict = {"source": self.source, "ok": self.ok, "error": self.error, "duration_s": self.duration_s,
                   "num_clips": len(self.clips), "real_frame_share": self.real_share}
        spec = task_spec(self.task)
        d.update(spec.video_entry(self.mean_values(), class_names))
        if self.lv is not None:
            d["lv"] = self.lv.to_dict()
        if self.dropped_frames or self.interrupted:
            d.update(dropped_frames=self.dropped_frames, interrupted=self.interrupted)
        d["clips"] = [c.to_dict(spec, class_names) for c in self.clips]
        return d


def in_background(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items`, produced on a thread at most `depth` ahead of the consumer, so that producing (decoding)
    overlaps consuming (inference). An exception of the producer is raised here after the items before
    it; closing the generator stops the producer and waits for it."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                channel.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            put((False, e))

    thread = threading.Thread(target=produce, name="evim3-decode", daemon=True)
    thread.start()
    try:
        while True:
            more, item = channel.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _StripSampler:
    """Up to 2 * STRIP_FRAMES evenly spaced (time, frame) pairs of a stream of unknown length: every
    `step`-th frame, the step doubling (and every other pair dropped) whenever the strip fills."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, np.ndarray]] = []
        self.step = 1
        self.seen = 0

    def add(self, time_s: float, frame: np.ndarray) -> None:
        if self.seen % self.step == 0:
            self.pairs.append((time_s, frame))
            if len(self.pairs) >= 2 * STRIP_FRAMES:
                self.pairs, self.step = self.pairs[::2], 2 * self.step
        self.seen += 1

    def frames(self) -> list[tuple[float, np.ndarray]]:
        picks = np.linspace(0, len(self.pairs) - 1, min(STRIP_FRAMES, len(self.pairs))).round().astype(int)
        return [self.pairs[i] for i in picks]


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


class ClipCutter:
    """Clips every `stride` frames of a stream of prepared (uint8, spec.fps) frames, each as soon as its frames
    are in; keeps only the frames a clip still to come may hold (with `keep_tail`, also the last clip span, for
    a clip aligned to the stream's end). The one clip cutting of files and live streams."""

    def __init__(self, spec: PreprocessSpec, stride: int, keep_tail: bool = False):
        self.spec, self.stride, self.keep_tail = spec, stride, keep_tail
        self.window: deque[np.ndarray] = deque()  # prepared frames first, first + 1, ...
        self.first = self.count = self.next_start = 0

    def add(self, frame: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Take the next frame; the (frame indices, uint8 clip) of every clip it completes."""
        self.window.append(frame)
        self.count += 1
        done = []
        while self.next_start + self.spec.clip_span <= self.count:
            done.append(self.clip_at(self.next_start))
            self.next_start += self.stride
        while self.window and self.first < self.kept_from():
            self.window.popleft()
            self.first += 1
        return done

    def clip_at(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """The clip at frame `start` of the frames so far (looping them when they are fewer than a clip)."""
        indices = sample_clip_indices(self.count, self.spec, start)
        return indices, np.stack([self.window[i] for i in indices - self.first])

    def kept_from(self) -> int:
        """The first frame a clip still to come may hold: the next clip's start, and with keep_tail that of a
        last clip aligned to the end so far (at most one clip span back)."""
        if self.keep_tail:
            return min(self.next_start, self.count - self.spec.clip_span)
        return self.next_start


class InferencePipeline:
    """Runs sources through one backend; `timings` adds up the per-stage timings of every source it runs (each
    result carries its own).

    keep_frames (seg models, for --overlay): keep every prepared frame and LV mask of a file in its result,
    size^2 bytes and size^2 / 8 bytes per frame, so memory grows with the video's length; keep_masks: the
    masks only.
    """

    def __init__(self, backend: Backend, stride: int | None = None, batch: int = 1, keep_strip: bool = False,
                 keep_frames: bool = False, keep_masks: bool = False):
        self.backend = backend
        self.spec = backend.meta.preprocess
        self.task = backend.meta.task
        self.task_spec = task_spec(self.task)
        self.class_names = self.task_spec.value_names(backend.meta)
        self.stride = stride or self.spec.default_stride
        if self.stride < 1 or batch < 1:
            raise ValueError(f"stride and batch must be >= 1 (got stride {stride}, batch {batch})")
        self.batch = batch
        self.keep_strip = keep_strip
        self.keep_frames = keep_frames
        self.keep_masks = keep_masks or keep_frames
        self.timings = Timings()

    def _run_clips(self, clips: np.ndarray, timings: Timings) -> list[Any]:
        """Backend outputs per clip: values (EF, or class probabilities), or a seg model's LV evidence (T, H, W)."""
        with timings.stage("inference", "batch").timed():
            out = self.backend.run(clips[:, None])
        timings.clips += len(clips)
        return self.task_spec.clip_outputs(out, self.backend.meta)

    def run_file(self, path: str) -> SourceResult:
        """Decode, preprocess and analyse one video/DICOM file; a bad file gives a result with .error."""
        return self.run_reader(lambda: open_video(path), path)

    def run_reader(self, open_reader: Callable[[], VideoReader], source: str) -> SourceResult:
        """Analyse what `open_reader` opens (a file, a DICOM dataset, frames in memory); a bad source gives a
        result with .error.

        A stream: a thread decodes, crops, resizes and resamples (``stream_to_uint8``) up to PREFETCH_FRAMES
        ahead while this thread runs the clips, each as soon as its frames are in; only the frames of the
        clips still to come are kept. A source found bad at its end (cut short) drops the clips it gave.
        """
        timings = Timings()
        wall, decode, prepare = Stopwatch(), Stopwatch(), Stopwatch()
        stitcher = FrameStitcher() if self.task_spec.per_frame else None
        result = SourceResult(source, task=self.task)  # replaced by the analysis, or by the error
        try:
            with wall:
                with decode:  # opening reads headers (and a DICOM file's whole dataset)
                    reader = open_reader()
                with reader:
                    provenance = Provenance(source, reader.fps, 0, reader.meta["region"], self.spec,
                                            spacing_cm=reader.meta.get("spacing_cm"),
                                            spacing_source=reader.meta.get("spacing_source"),
                                            notes=reader.meta["notes"])

                    def found(region: tuple[int, int, int, int]) -> None:
                        provenance.region = region

                    frames = prepare.over(stream_to_uint8(decode.over(reader.frames()), reader.fps, self.spec,
                                                          reader.meta["region"], found))
                    with contextlib.closing(in_background(frames, PREFETCH_FRAMES)) as frames:
                        result = self._analyse(frames, lambda: reader.num_frames / reader.fps, provenance,
                                               timings, stitcher)
                provenance.num_frames = reader.num_frames or 0
                if stitcher:
                    self._measure_lv(result, stitcher, provenance, timings)
            return result
        except EchoInputError as e:
            result = SourceResult(source, task=self.task, error=str(e))
            return result
        finally:  # a failed source's decoding time counts too
            timings.stage("decode", "video").seconds.append(decode.seconds)
            timings.stage("preprocess", "video").seconds.append(prepare.seconds - decode.seconds)
            timings.wall_s += wall.seconds
            result.timings = timings
            self.timings.add(timings)

    def _measure_lv(self, result: SourceResult, stitcher: FrameStitcher, provenance: Provenance,
                    timings: Timings) -> None:
        """The LV report of a seg model's stitched masks, in cm when the file states its pixel spacing."""
        with timings.stage("LV analysis", "video").timed():
            result.lv = analyse_lv(stitcher.masks(), self.spec.fps, provenance.model_spacing_cm,
                                   provenance.spacing_source)
        result.lv.clips = len(result.clips)
        if self.keep_masks:
            result.lv_masks = list(stitcher.masks())

    def _analyse(self, frames: Iterable[np.ndarray], duration_s: Callable[[], float], provenance: Provenance,
                 timings: Timings, stitcher: FrameStitcher | None = None) -> SourceResult:
        """Clips every `stride` frames of a stream of prepared (uint8, spec.fps) frames, run in batches as
        their frames arrive; a video shorter than one clip gives one clip that loops it. `duration_s` tells
        the source's duration once the stream has ended. A seg model's clips go to `stitcher`, which settles
        each frame once no clip still to come holds it; its last clip is aligned to the video's end, so that
        the frames after the last clip of the stride have masks too. `provenance` is told the count of
        model frames."""
        source, spec, span = provenance.source, self.spec, self.spec.clip_span
        cutter = ClipCutter(spec, self.stride, keep_tail=self.task_spec.per_frame)
        pending: list[tuple[np.ndarray, np.ndarray, float]] = []  # (frame indices, uint8 clip, share of real frames)
        result = SourceResult(source, task=self.task)
        strip = _StripSampler() if self.keep_strip else None
        for frame in frames:
            if strip:
                strip.add(cutter.count / spec.fps, frame)
            if self.keep_frames:
                result.frames.append(frame)
            for indices, clip in cutter.add(frame):
                pending.append((indices, clip, 1.0))
                if len(pending) == self.batch:
                    self._run_pending(pending, result, stitcher, cutter.kept_from(), timings)
        count = cutter.count
        result.duration_s = duration_s()
        check_long_enough(source, result.duration_s, spec)
        if cutter.next_start == 0:  # shorter than one clip: every frame is still in the window
            pending.append((*cutter.clip_at(0), real_frame_share(count, spec, 0)))
        elif stitcher and cutter.next_start - self.stride + span < count:  # the last clip ended before the video
            pending.append((*cutter.clip_at(count - span), 1.0))
        self._run_pending(pending, result, stitcher, count, timings)
        if strip:
            result.strip = strip.frames()
        timings.video_s += result.duration_s
        provenance.model_frames = count
        result.provenance = provenance
        return result

    def _run_pending(self, pending: list[tuple[np.ndarray, np.ndarray, float]], result: SourceResult,
                     stitcher: FrameStitcher | None, settled: int, timings: Timings) -> None:
        """Run the pending clips as one batch and empty the list; a stitcher then settles the frames before
        `settled`, which no clip still to come holds."""
        spec = self.spec
        if pending:
            outputs = self._run_clips(normalise(np.stack([clip for _, clip, _ in pending]), spec), timings)
            for (indices, _, share), output in zip(pending, outputs):
                start = int(indices[0])
                if stitcher:
                    stitcher.add(indices, output)
                values = [] if stitcher else output
                result.clips.append(ClipResult(start / spec.fps, (start + spec.clip_span - 1) / spec.fps, values,
                                               share))
            pending.clear()
        if stitcher:
            stitcher.finish_before(settled)

    def run_live(self, source: str, realtime: bool = False,
                 on_clip: Callable[[ClipResult], None] | None = None) -> SourceResult:
        """Analyse a stream as it arrives, one clip every `stride` resampled frames, until the stream ends or
        Ctrl-C. `on_clip` sees each clip as soon as it is computed."""
        timings, wall = Timings(), Stopwatch()
        result = SourceResult(source, task=self.task)
        if self.task_spec.per_frame:
            result.error = (f"{source}: a {self.task} model measures beats over a whole file; live sources are "
                            "not supported (record the stream to a file)")
            return result
        decode = timings.stage("decode", "frame")
        try:
            with wall:
                # The queue holds two clips' worth of frames, so after a --realtime drop the consumer can
                # restart from a whole contiguous clip.
                reader = LiveReader(source, queue_seconds=2 * self.spec.clip_seconds + 1.0, realtime=realtime)
                result.provenance = Provenance(source, reader.fps, 0, None, self.spec)
                with reader:
                    try:
                        for clip in self._live_clips(reader.frames(), reader.fps, result, timings):
                            result.clips.append(clip)
                            if on_clip:
                                on_clip(clip)
                    except KeyboardInterrupt:
                        result.interrupted = True
                    finally:
                        reader.stop()
                        result.dropped_frames = reader.dropped
                        decode.seconds.extend(reader.decode.seconds)
                        result.duration_s = len(reader.decode.seconds) / reader.fps
                        result.provenance.num_frames = len(reader.decode.seconds)
        except Evim3Error as e:
            result.error = str(e)
        finally:
            timings.wall_s += wall.seconds
            timings.video_s += result.duration_s
            result.timings = timings
            self.timings.add(timings)
        return result

    def _live_clips(self, frames: Iterator[LiveFrame], fps: float, result: SourceResult,
                    timings: Timings) -> Iterator[ClipResult]:
        """Clips of a live stream cut as a file's are (stream_to_uint8, then ClipCutter), each as soon as its
        frames are in. A gap (frames dropped by --realtime) starts a new stretch: no clip spans one. The
        ultrasound region is found from the motion in the first whole clip's source frames, then kept."""
        spec = self.spec
        clip_frames = math.ceil(spec.clip_span * fps / spec.fps)  # source frames one clip spans
        strip = _StripSampler() if self.keep_strip else None
        preprocess = timings.stage("preprocess", "clip")
        for t0, images in _stretches(frames):
            head = list(itertools.islice(images, clip_frames))
            if len(head) < clip_frames:  # a gap came first
                continue
            if result.provenance.region is None:
                result.provenance.region = motion_region(np.stack(head[:motion_window_frames(fps)]))
            waiting, preparing = Stopwatch(), Stopwatch()
            source = waiting.over(itertools.chain(head, images))
            cutter = ClipCutter(spec, self.stride)
            for frame in preparing.over(stream_to_uint8(source, fps, spec, result.provenance.region)):
                for indices, clip in cutter.add(frame):
                    preprocess.seconds.append(preparing.seconds - waiting.seconds)
                    waiting.seconds = preparing.seconds = 0.0
                    (values,) = self._run_clips(normalise(clip[None], spec), timings)
                    start = t0 + int(indices[0]) / spec.fps
                    if strip:
                        strip.add(start, clip[0])
                        result.strip = strip.frames()
                    yield ClipResult(start, start + (spec.clip_span - 1) / spec.fps, values)


def _stretches(frames: Iterator[LiveFrame]) -> Iterator[tuple[float, Iterator[np.ndarray]]]:
    """The stream in stretches without dropped frames: (time of the first frame, its images as they arrive).
    Each stretch's images must be read to their end before the next stretch is asked for."""
    following: list[LiveFrame] = list(itertools.islice(frames, 1))

    def images(frame: LiveFrame) -> Iterator[np.ndarray]:
        yield frame.image
        for after in frames:
            if after.index != frame.index + 1:
                following.append(after)
                return
            frame = after
            yield frame.image

    while following:
        first = following.pop()
        yield first.time, images(first)
