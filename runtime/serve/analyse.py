"""The one adapter between the node and the edge pipeline: ``Analyser(models).analyse(path) -> Analysis``.

Until the public ``evim3.runtime.load(...).predict(...)`` API (issue 24) lands, it runs the pipeline
``evim3 infer`` runs (``InferencePipeline(open_backend(...)).run_file``), so the EF it reports is the number
``evim3 infer --json`` reports as ``ef`` for the same file. Switching to the public API changes this module
only.

With a seg model it also gives each beat's EF and the LV contour at its ED and ES frames, mapped from the
model's frames back to the source image: the model frame index through the resampling to the source frame
(``resample_indices``), the mask's outline through the inverse of crop + square resize to source pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import numpy as np
from evim3.runtime.backends import Backend, open_backend
from evim3.runtime.infer import InferencePipeline, SourceResult
from evim3.runtime.preprocess import (
    motion_region,
    motion_sample,
    motion_window_frames,
    resample_indices,
    square_resize_geometry,
)
from evim3.runtime.seg import largest_component
from evim3.runtime.video import Region, open_video


class AnalysisError(Exception):
    """The file could not be analysed: one line, the job's failure reason."""


@dataclass
class BeatResult:
    ef: float
    ed_frame: int  # source frame index (0-based); DICOM frame numbers are these + 1
    es_frame: int
    ed_contour: np.ndarray | None  # (P, 2) x, y in source pixel coordinates (pixel centres at integers)
    es_contour: np.ndarray | None
    ed_area_cm2: float | None = None
    es_area_cm2: float | None = None


@dataclass
class Analysis:
    ef: float | None  # the EF model's video EF (what `evim3 infer --json` reports as "ef"); else the beats' mean
    ef_method: str  # "ef model" | "seg beats"
    clip_efs: list[float] = field(default_factory=list)
    clip_times: list[tuple[float, float]] = field(default_factory=list)
    beats: list[BeatResult] = field(default_factory=list)
    no_beat_reason: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    path: str
    task: str
    preset: str
    sha256: str
    min_seconds: float  # shortest video the pipeline analyses


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Analyser:
    """Opens the models once (an EF or classification model and/or a seg model, as `evim3 infer`)."""

    def __init__(self, models: list[str], threads: int | None = None, scan: str = "auto"):
        self._stack = contextlib.ExitStack()
        try:
            backends = [self._stack.enter_context(open_backend(m, threads=threads, scan=scan)) for m in models]
        except BaseException:
            self._stack.close()
            raise
        seg = [b for b in backends if b.meta.task == "seg"]
        clip = [b for b in backends if b.meta.task == "ef"]
        other = [b for b in backends if b.meta.task not in ("seg", "ef")]
        if other or len(seg) > 1 or len(clip) > 1 or not backends:
            self._stack.close()
            raise ValueError("the node takes one EF model and/or one seg model; got tasks "
                             + ", ".join(b.meta.task for b in backends))
        self.ef_backend: Backend | None = clip[0] if clip else None
        self.seg_backend: Backend | None = seg[0] if seg else None
        from evim3.runtime.infer import MIN_CLIP_SHARE, MIN_VIDEO_SECONDS

        self.models = [ModelInfo(b.path, b.meta.task, b.meta.preset, file_sha256(b.path),
                                 max(MIN_VIDEO_SECONDS, MIN_CLIP_SHARE * b.meta.preprocess.clip_seconds))
                       for b in backends]
        self.model_hash = hashlib.sha256("".join(m.sha256 for m in self.models).encode()).hexdigest()

    @property
    def min_seconds(self) -> float:
        return max(m.min_seconds for m in self.models)

    def close(self) -> None:
        self._stack.close()

    def analyse(self, path: str) -> Analysis:
        result = None
        analysis = Analysis(ef=None, ef_method="ef model")
        if self.ef_backend is not None:
            result = _run(InferencePipeline(self.ef_backend), path)
            analysis.ef = result.to_dict([])["ef"]
            analysis.clip_efs = [c.values[0] for c in result.clips]
            analysis.clip_times = [(c.start_s, c.end_s) for c in result.clips]
        if self.seg_backend is not None:
            seg = _run(InferencePipeline(self.seg_backend, keep_frames=True), path)
            lv = seg.lv
            analysis.no_beat_reason = lv.no_beat_reason
            analysis.notes += lv.notes
            analysis.beats = _beats(path, seg, self.seg_backend)
            if self.ef_backend is None:
                analysis.ef, analysis.ef_method = lv.ef_mean, "seg beats"
        if analysis.ef is None:
            raise AnalysisError(analysis.no_beat_reason or "no EF could be measured")
        return analysis


def _run(pipeline: InferencePipeline, path: str) -> SourceResult:
    result = pipeline.run_file(path)
    if not result.ok:
        raise AnalysisError(result.error)
    return result


def _beats(path: str, seg: SourceResult, backend: Backend) -> list[BeatResult]:
    """Each beat of a seg result with its ED/ES frames and LV contours in the source's frames and pixels."""
    spec = backend.meta.preprocess
    with open_video(path) as reader:
        region, fps = reader.meta["region"], reader.fps
        frames = reader.frames()
        window = []
        if region is None:  # as the pipeline found it: the motion in the first frames
            for frame in frames:
                window.append(frame)
                if len(window) == motion_window_frames(fps):
                    break
        region = region or motion_region(np.stack([window[i] for i in motion_sample(len(window))]))
        num_frames = _count(frames, len(window)) if reader.num_frames is None else reader.num_frames
    to_source = resample_indices(num_frames, fps, spec.fps)
    beats = []
    areas = seg.lv.area_cm2()
    for beat in seg.lv.beats:
        contours = [_contour(seg.lv_masks[i], region, spec.size) for i in (beat.ed_frame, beat.es_frame)]
        beats.append(BeatResult(
            beat.ef, int(to_source[min(beat.ed_frame, len(to_source) - 1)]),
            int(to_source[min(beat.es_frame, len(to_source) - 1)]), *contours,
            ed_area_cm2=areas[beat.ed_frame] if areas else None, es_area_cm2=areas[beat.es_frame] if areas else None))
    return beats


def _count(frames, already: int) -> int:
    return already + sum(1 for _ in frames)


def _contour(mask: np.ndarray | None, region: Region, size: int) -> np.ndarray | None:
    """The outline of the mask's largest region, as source pixel coordinates (x, y), closed."""
    if mask is None or not mask.any():
        return None
    outline = trace_outline(largest_component(mask))
    return to_source_points(outline, region, size)


def to_source_points(points: np.ndarray, region: Region, size: int) -> np.ndarray:
    """(P, 2) x, y in the model's size x size frame -> the same points in the source frame (the inverse of
    ``evim3.runtime.preprocess.preprocessed_points``)."""
    y0, y1, x0, x1 = region
    new_height, new_width, top, left = square_resize_geometry(y1 - y0, x1 - x0, size)
    scale = np.array([new_width / (x1 - x0), new_height / (y1 - y0)])
    return (np.asarray(points, np.float64) - [left, top] + 0.5) / scale - 0.5 + [x0, y0]


# Moore neighbourhood, clockwise on screen (y down), starting west: (dy, dx)
_AROUND = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]


def trace_outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of one 8-connected region, in order (Moore neighbour tracing), as (P, 2) x, y
    pixel centres, closed (the first point repeated at the end)."""
    padded = np.pad(mask.astype(bool), 1)
    ys, xs = np.nonzero(padded)
    top = ys.min()
    start = (int(top), int(xs[ys == top].min()))
    points = [start]
    here, back = start, 0  # entered from the west, which is background (start is the top row's leftmost)
    for _ in range(4 * padded.size):
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (here[0] + _AROUND[d][0], here[1] + _AROUND[d][1])
            if padded[nxt]:
                previous = (here[0] + _AROUND[(d - 1) % 8][0], here[1] + _AROUND[(d - 1) % 8][1])
                back = _AROUND.index((previous[0] - nxt[0], previous[1] - nxt[1]))
                here = nxt
                break
        else:  # a single pixel
            break
        if here == start:
            break
        points.append(here)
    points.append(start)
    return np.array([(x - 1, y - 1) for y, x in points], np.float64)
