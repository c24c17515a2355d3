"""Left-ventricle segmentation at the edge: from a seg model's clips to the ejection fraction of every beat.

    per clip: LV evidence (LV minus background logit) of every pixel of every frame (evim3.runtime.outputs)
      -> FrameStitcher: one mask per frame of the resampled video, where the mean evidence of the clips that
         hold the frame is positive; frames no clip holds get no mask (never one made up)
      -> measure_lv: the LV is the mask's largest 4-connected region; its area and its long axis
      -> find_beats: ED = maxima, ES = minima of the lightly smoothed area curve, within the bounds of a heart
         rate of 30..200 bpm, each swing at least a share of the LV's size (so noise makes no beats)
      -> EF of every beat by the area-length method (area_length_volume), their mean and beat-to-beat SD

numpy only (the edge runtime never imports torch). The synthetic generator (evim3.data.synth) labels its
videos with the same area_length_volume.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

# Physiological heart rates: a beat lasts 0.3 s (200 bpm) to 2 s (30 bpm). Two EDs (or two ESs) closer than the
# shortest beat are one beat; an ES more than the longest beat after its ED belongs to no beat.
HEART_RATE_BPM = (30.0, 200.0)
# Gaussian smoothing (sigma) of the area curve before extrema are looked for: a sixth of the shortest systole
# (~0.12 s at 200 bpm). It irons out one-frame segmentation noise but moves a peak by well under a frame.
SMOOTH_SECONDS = 0.02
# A beat's rise and fall must each reach this share of the area curve's 5th-95th percentile range (weaker
# swings ride on a beat: noise, the atrial kick) ...
PROMINENCE_SHARE = 0.3
# ... and this share of the median LV area: an EF of 10 % already changes the area by ~7 %, while a
# segmentation flickering by a pixel along the border changes it by ~2 %. A curve without such swings has
# no beat: that is reported, not invented.
MIN_SWING_SHARE = 0.04


def area_length_volume(area: float, length: float) -> float:
    """LV volume by the single-plane area-length method, V = 8 A^2 / (3 pi L): an ellipsoid of revolution
    whose long axis L and whose cut along it (area A) are those seen. Units follow the inputs: px^2 and px
    give px^3, cm^2 and cm give mL."""
    return float(8 * area**2 / (3 * math.pi * length))


# --- stitching clips into one mask per frame ---

class FrameStitcher:
    """Per frame of the resampled video, the mean LV evidence of the clips that hold it, thresholded at 0
    (the LV logit wins, evim3.runtime.outputs.lv_masks' rule, on the clips' average).

    Streaming: ``finish_before(n)`` settles the frames before n once no later clip can hold them, keeping each
    as a bit-packed mask (size^2 / 8 bytes); only the frames of clips still open keep float sums.
    """

    def __init__(self) -> None:
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}
        self._masks: dict[int, np.ndarray] = {}  # frame -> np.packbits of its mask
        self.shape: tuple[int, int] | None = None
        self.num_frames = 0

    def add(self, indices: np.ndarray, evidence: np.ndarray) -> None:
        """One clip: `evidence` (T, H, W) for the resampled frames `indices` (T,) it was sampled from; a
        looped short video may list a frame twice."""
        if len(indices) != len(evidence):
            raise ValueError(f"{len(indices)} frame indices for {len(evidence)} frames of evidence")
        self.shape = evidence.shape[1:]
        for index, frame in zip(indices.tolist(), evidence):
            if index in self._masks:
                raise ValueError(f"frame {index} was already settled; clips must come in order of their start")
            if index in self._sums:
                self._sums[index] += frame
                self._counts[index] += 1
            else:
                self._sums[index] = frame.astype(np.float32, copy=True)
                self._counts[index] = 1

    def finish_before(self, end: int) -> None:
        """Settle every frame before `end`: no clip still to come holds one."""
        for index in [i for i in self._sums if i < end]:
            self._masks[index] = np.packbits(self._sums.pop(index) / self._counts.pop(index) > 0)
        self.num_frames = max(self.num_frames, end)

    def masks(self) -> Iterator[np.ndarray | None]:
        """The settled mask (H, W) bool of every frame 0 .. num_frames - 1, unpacked one at a time; None where
        no clip held the frame."""
        size = None if self.shape is None else self.shape[0] * self.shape[1]
        for i in range(self.num_frames):
            packed = self._masks.get(i)
            yield None if packed is None else np.unpackbits(packed, count=size).astype(bool).reshape(self.shape)


# --- one mask: the LV, its area and long axis ---

def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a 2-D bool mask (one of them on a tie); all False if empty.

    The LV is one blood pool: islands elsewhere (a flicker in the atrium or the right ventricle) are not it.
    Runs of True pixels per row are joined with the overlapping runs of the next row (union-find over runs:
    a few hundred per frame, not one per pixel).
    """
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)
    _, stops = np.nonzero(change == -1)  # row-major order: the n-th stop ends the n-th run
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for row in range(1, mask.shape[0]):
        above, here = row_first[row - 1], row_first[row]
        end_above, end_here = here, row_first[row + 1]
        while above < end_above and here < end_here:
            if starts[above] < stops[here] and starts[here] < stops[above]:  # the runs share a column
                parent[root(above)] = root(here)
            if stops[above] < stops[here]:
                above += 1
            else:
                here += 1
    out = np.zeros_like(mask, dtype=bool)
    if not parent:
        return out
    roots = np.array([root(i) for i in range(len(parent))])
    sizes = np.bincount(roots, weights=stops - starts)
    best = int(np.argmax(sizes))
    for row, start, stop in zip(rows[roots == best], starts[roots == best], stops[roots == best]):
        out[row, start:stop] = True
    return out


def long_axis_length(region: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """The extent of a region's pixels (as squares of `spacing` (dy, dx)) along its principal axis.

    Why this axis: the LV cavity is about three times longer than wide, so its axis of largest spread is its
    long axis, from the apex to the middle of the mitral plane (the length area-length volumes use, and the one
    the synthetic generator labels with); finding the apex and the mitral plane on a mask would need anatomy
    the mask does not carry. Measured in physical units, so that non-square pixels do not tilt the axis.
    """
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return 0.0
    points = np.stack([ys * spacing[0], xs * spacing[1]], axis=1)
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axis = vectors[:, -1]  # of the largest eigenvalue
    along = centred @ axis
    pixel_extent = abs(axis[0]) * spacing[0] + abs(axis[1]) * spacing[1]  # one pixel square, along the axis
    return float(along.max() - along.min() + pixel_extent)


@dataclass(frozen=True)
class LVMeasure:
    """The LV in one frame: area in pixels (of the model's frame) and long axis in pixels or, when the pixel
    spacing is known, in cm."""

    area_px: float
    length: float


def measure_lv(mask: np.ndarray, spacing: tuple[float, float] | None = None) -> LVMeasure:
    region = largest_component(mask)
    return LVMeasure(float(region.sum()), long_axis_length(region, spacing or (1.0, 1.0)))


# --- the area curve: beats ---

def smooth(times: np.ndarray, values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted mean of `values` around each time, for samples at any (irregular) `times`: frames
    that no clip covers are missing, not zero."""
    out = np.empty(len(values))
    for i, t in enumerate(times):
        lo, hi = np.searchsorted(times, [t - 4 * sigma, t + 4 * sigma])
        weights = np.exp(-0.5 * ((times[lo:hi] - t) / sigma) ** 2)
        out[i] = weights @ values[lo:hi] / weights.sum()
    return out


def turning_points(values: np.ndarray, swing: float) -> list[int]:
    """Alternating maxima and minima of `values` (a zigzag filter): each differs from the points on both of
    its sides by at least `swing`, and the curve between two of them stays between them. A swing smaller
    than `swing` (noise) makes none. The curve's ends are no turning points: what came before the first
    sample or after the last one is not seen."""
    points: list[int] = []
    high = low = 0
    candidate, is_max = 0, None  # None: the curve has not yet moved by `swing`
    for i in range(1, len(values)):
        if is_max is None:
            high = i if values[i] > values[high] else high
            low = i if values[i] < values[low] else low
            if values[high] - values[low] >= swing:
                # The first extreme has no swing before it: it only starts the zigzag (dropped below).
                is_max = high > low
                points.append(low if is_max else high)
                candidate = high if is_max else low
            continue
        sign = 1 if is_max else -1
        if sign * values[i] > sign * values[candidate]:
            candidate = i
        elif sign * (values[candidate] - values[i]) >= swing:
            points.append(candidate)
            candidate, is_max = i, not is_max
    return points[1:]


def merge_close(points: list[int], values: np.ndarray, times: np.ndarray, shortest: float) -> list[int]:
    """Turning points (alternating, from turning_points) without two maxima or two minima closer in time
    than `shortest`: of such a pair the weaker goes, with the weaker of its two opposite neighbours, so the
    points still alternate."""
    points = list(points)
    while True:
        gaps = [(times[points[k + 2]] - times[points[k]], k) for k in range(len(points) - 2)]
        close = [(gap, k) for gap, k in gaps if gap < shortest]
        if not close:
            return points
        _, k = min(close)
        sign = 1 if values[points[k]] > values[points[k + 1]] else -1  # +1: points[k] is a maximum
        weak = k if sign * values[points[k]] < sign * values[points[k + 2]] else k + 2
        neighbours = [j for j in (weak - 1, weak + 1) if 0 <= j < len(points)]
        drop = max(neighbours, key=lambda j: sign * values[points[j]])  # the opposite point less extreme
        points = [p for j, p in enumerate(points) if j not in (weak, drop)]


@dataclass(frozen=True)
class BeatSearch:
    """ED and ES positions (indices into the curve) of every beat, and why there are none when so."""

    pairs: list[tuple[int, int]]
    swing: float  # the rise and fall a beat needed, in the curve's units
    no_beat_reason: str | None = None


def find_beats(times: np.ndarray, area: np.ndarray) -> BeatSearch:
    """Beats of an LV area curve sampled at `times` (seconds, increasing): each ED (a maximum of the smoothed
    curve) with the ES (minimum) that follows it, no two EDs closer than the shortest beat, no ES further
    than the longest beat from its ED."""
    shortest, longest = 60.0 / HEART_RATE_BPM[1], 60.0 / HEART_RATE_BPM[0]
    if len(area) < 3:
        return BeatSearch([], math.nan, f"no beat found: {len(area)} frames with an LV mask")
    curve = smooth(times, area, SMOOTH_SECONDS)
    median = float(np.median(curve))
    p5, p95 = np.percentile(curve, [5, 95])
    swing = max(PROMINENCE_SHARE * (p95 - p5), MIN_SWING_SHARE * median)
    points = merge_close(turning_points(curve, swing), curve, times, shortest)
    pairs = [(ed, es) for ed, es in itertools.pairwise(points)
             if curve[ed] > curve[es] and times[es] - times[ed] <= longest]
    if pairs:
        return BeatSearch(pairs, swing)
    spread, needed = 100 * (curve.max() - curve.min()) / median, 100 * swing / median
    return BeatSearch([], swing, f"no beat found: the LV area varies by {spread:.1f} % of its median over "
                                 f"{times[-1] - times[0]:.2f} s; a beat must rise and fall by {needed:.1f} % "
                                 f"and last {shortest:g}-{longest:g} s")


# --- a whole video ---

@dataclass(frozen=True)
class Beat:
    ed_frame: int  # frames of the video resampled to the model's fps
    es_frame: int
    ed_s: float
    es_s: float
    ed_area_px: float
    es_area_px: float
    ed_length: float  # long axis, cm with a known pixel spacing, else px
    es_length: float
    ef: float  # percent
    ed_area_cm2: float | None = None
    es_area_cm2: float | None = None
    edv_ml: float | None = None
    esv_ml: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LVReport:
    """What a seg model found in one video: the LV area of every frame, the beats and their EF."""

    fps: float  # of the resampled video the frames are counted in
    area_px: list[float | None]  # per frame; None where no clip covered the frame
    beats: list[Beat]
    spacing_cm: tuple[float, float] | None = None  # (dy, dx) of a model pixel; None: the video does not say
    spacing_source: str | None = None  # the DICOM element it came from
    no_beat_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    clips: int = 0  # the seg model's clips the masks come from

    @property
    def covered_frames(self) -> int:
        return sum(a is not None for a in self.area_px)

    @property
    def ef_mean(self) -> float | None:
        return float(np.mean([b.ef for b in self.beats])) if self.beats else None

    @property
    def ef_sd(self) -> float | None:
        """Beat-to-beat sample SD of the EF; None under two beats."""
        return float(np.std([b.ef for b in self.beats], ddof=1)) if len(self.beats) > 1 else None

    def area_cm2(self) -> list[float | None] | None:
        if self.spacing_cm is None:
            return None
        pixel = self.spacing_cm[0] * self.spacing_cm[1]
        return [None if a is None else a * pixel for a in self.area_px]

    def to_dict(self) -> dict:
        return {"ef_mean": self.ef_mean, "ef_sd": self.ef_sd, "num_beats": len(self.beats),
                "no_beat_reason": self.no_beat_reason, "num_clips": self.clips, "fps": self.fps,
                "frames": len(self.area_px),
                "covered_frames": self.covered_frames, "pixel_spacing_cm": self.spacing_cm,
                "pixel_spacing_source": self.spacing_source, "notes": self.notes,
                "beats": [b.to_dict() for b in self.beats],
                "frame_area_px": self.area_px, "frame_area_cm2": self.area_cm2()}


def analyse_lv(masks: Iterable[np.ndarray | None], fps: float, spacing_cm: tuple[float, float] | None = None,
               spacing_source: str | None = None) -> LVReport:
    """Per-frame LV masks (None: no mask) of a video at `fps` -> areas, beats and per-beat EF. Without a
    pixel spacing areas stay in pixels and volumes are not reported (EF, a ratio, needs none)."""
    measures = [None if m is None else measure_lv(m, spacing_cm) for m in masks]
    covered = np.array([i for i, m in enumerate(measures) if m is not None and m.area_px > 0], dtype=int)
    uncovered = sum(m is None for m in measures)
    empty = len(measures) - uncovered - len(covered)
    notes = [f"{uncovered} of {len(measures)} frames are in no clip: no mask"] if uncovered else []
    notes += [f"{empty} of {len(measures)} frames have an empty mask: no LV found"] if empty else []
    area = np.array([measures[i].area_px for i in covered])
    search = find_beats(covered / fps, area)
    beats = [_beat(int(covered[ed]), int(covered[es]), measures, fps, spacing_cm) for ed, es in search.pairs]
    return LVReport(fps, [None if m is None else m.area_px for m in measures], beats, spacing_cm, spacing_source,
                    search.no_beat_reason, notes)


def _beat(ed: int, es: int, measures: list[LVMeasure | None], fps: float,
          spacing_cm: tuple[float, float] | None) -> Beat:
    at_ed, at_es = measures[ed], measures[es]
    pixel = None if spacing_cm is None else spacing_cm[0] * spacing_cm[1]
    # Area and length in the same units (cm^2 and cm with a spacing): the volumes are then in mL.
    ed_area, es_area = (at_ed.area_px, at_es.area_px) if pixel is None else (at_ed.area_px * pixel,
                                                                             at_es.area_px * pixel)
    edv, esv = area_length_volume(ed_area, at_ed.length), area_length_volume(es_area, at_es.length)
    physical = pixel is not None
    return Beat(ed, es, ed / fps, es / fps, at_ed.area_px, at_es.area_px, at_ed.length, at_es.length,
                100 * (edv - esv) / edv,
                ed_area if physical else None, es_area if physical else None,
                edv if physical else None, esv if physical else None)


def contour(mask: np.ndarray) -> np.ndarray:
    """The border pixels of a mask: in it, with a 4-neighbour outside it (or the frame's edge)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner
