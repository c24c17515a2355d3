"""The one adapter between the node and the edge pipeline: ``Analyser(models).analyse(path) -> Analysis``.

It calls the runtime's public API, ``evim3.runtime.load(model).predict(path)``, the pipeline ``evim3 infer``
runs, so the EF it reports is the number ``evim3 infer --json`` reports as ``ef`` for the same file. Nothing
else in the node touches the pipeline.

With a seg model it also gives each beat's EF and the LV outline at its ED and ES frames in the source's
frames and pixels, through the result's provenance (``Result.beats``' source frames, ``to_source_xy``).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import evim3.runtime as rt
import numpy as np
from evim3.runtime.errors import EchoInputError
from evim3.runtime.infer import MIN_CLIP_SHARE, MIN_VIDEO_SECONDS
from evim3.runtime.seg import largest_component
from evim3.runtime.tasks import task_spec


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
    """Opens the models once (an EF model and/or a seg model, as `evim3 infer` takes them)."""

    def __init__(self, models: list[str], threads: int | None = None, scan: str = "auto"):
        self._stack = contextlib.ExitStack()
        try:
            loaded = [self._stack.enter_context(rt.load(m, threads=threads, scan=scan)) for m in models]
        except BaseException:
            self._stack.close()
            raise
        seg = [m for m in loaded if task_spec(m.task).per_frame]  # the LV of every frame, its beats
        ef = [m for m in loaded if task_spec(m.task).reports_ef]
        if len(seg) + len(ef) < len(loaded) or len(seg) > 1 or len(ef) > 1 or not loaded:
            self._stack.close()
            raise ValueError("the node takes one EF model and/or one seg model; got tasks "
                             + ", ".join(m.task for m in loaded))
        self.ef_model = ef[0] if ef else None
        self.seg_model = seg[0] if seg else None
        self.models = [ModelInfo(m.path, m.task, m.meta.preset, file_sha256(m.path),
                                 max(MIN_VIDEO_SECONDS, MIN_CLIP_SHARE * m.meta.preprocess.clip_seconds))
                       for m in loaded]
        self.model_hash = hashlib.sha256("".join(m.sha256 for m in self.models).encode()).hexdigest()

    @property
    def min_seconds(self) -> float:
        return max(m.min_seconds for m in self.models)

    def close(self) -> None:
        self._stack.close()

    def analyse(self, path: str) -> Analysis:
        analysis = Analysis(ef=None, ef_method="ef model")
        try:
            if self.ef_model is not None:
                result = self.ef_model.predict(path)
                analysis.ef = result.ef
                analysis.clip_efs = [c.values[0] for c in result.clips]
                analysis.clip_times = [(c.start_s, c.end_s) for c in result.clips]
            if self.seg_model is not None:
                seg = self.seg_model.predict(path)
                analysis.no_beat_reason = seg.raw.lv.no_beat_reason if seg.raw.lv else None
                analysis.beats = [_beat(b, seg) for b in seg.beats]
                if self.ef_model is None:
                    analysis.ef, analysis.ef_method = seg.ef, "seg beats"
        except EchoInputError as e:
            raise AnalysisError(e.problem) from None
        if analysis.ef is None:
            raise AnalysisError(analysis.no_beat_reason or "no EF could be measured")
        return analysis


def _beat(beat: rt.BeatResult, seg: rt.Result) -> BeatResult:
    """A seg result's beat with its ED/ES source frames and LV outlines in source pixels."""
    def outline(model_frame: int) -> np.ndarray | None:
        mask = seg.masks[model_frame] if model_frame < len(seg.masks) else None
        if mask is None or not mask.any():
            return None
        return seg.source.to_source_xy(trace_outline(largest_component(mask)))

    b = beat.beat
    return BeatResult(b.ef, beat.ed_source_frame, beat.es_source_frame, outline(b.ed_frame), outline(b.es_frame),
                      b.ed_area_cm2, b.es_area_cm2)


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
