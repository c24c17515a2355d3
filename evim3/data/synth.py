"""Synthetic apical-four-chamber echo videos in the EchoNet-Dynamic layout: the built-in default dataset.

Each video comes from a small geometric heart. The left ventricle (LV) is a superellipse cut flat at the
mitral valve plane. Its apex stays put while the walls move in and the base moves up, by a contraction
sampled per video. The right ventricle and both atria beat with it. The picture has a sector field of view,
speckle, gain and depth attenuation. Labels are measured on what was drawn: the LV area in pixels and the
apex-to-base length at the traced end-diastolic (ED) and end-systolic (ES) frames give the volumes by the
area-length method V = 8 A^2 / (3 pi L). So EF, ESV, EDV and the traced chords agree with the pixels.
Beside EchoNet's files, ``Masks/<name>.npz`` holds the LV cavity as drawn in every frame (``read_truth_masks``),
so segmentation can be judged on every frame, not only on the two traced ones.

Brightness (gain, wall and blood levels, attenuation) and heart size are drawn independently of EF, so EF
can only be learned from motion. Everything comes from numpy random generators seeded by (seed, video
index): the same seed gives the same CSVs and the same frames, whatever the number of workers.

numpy and PyAV only: `evim3 data synth` runs where torch is not installed.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import av
import numpy as np

from evim3.runtime.atomic import atomic_path, write_atomic
from evim3.runtime.echonet_layout import (
    FILELIST_COLUMNS,
    FILELIST_NAME,
    MASKS_DIR,
    TRACING_COLUMNS,
    TRACINGS_NAME,
    VIDEOS_DIR,
)
from evim3.runtime.errors import DatasetError
from evim3.runtime.seg import area_length_volume

DEFAULT_SIZE = (112, 112)  # (height, width), as EchoNet-Dynamic
DEFAULT_FPS = 50
# A share of each dataset is written at other sizes and rates so that loaders have to resize and resample.
OTHER_SIZES = ((128, 160), (144, 144), (96, 128))
OTHER_FPS = tuple(fps for fps in range(30, 61) if fps != DEFAULT_FPS)
CHORDS = 20  # perpendicular chords per traced frame, as in EchoNet's VolumeTracings.csv
MIN_FRAMES = 32  # room for the first traced beat (ED, then ES up to ~0.4 s later at 60 fps)
JPEG_QSCALE = 2  # MJPEG quantiser scale: 2 is near-lossless
RENDER_CHUNK = 32  # frames rendered at once: vectorised, yet small in memory
_VALVE_BAND = 2.0  # px between a ventricle's cavity and its atrium: where the valve leaflets are drawn


@dataclass(frozen=True)
class SynthVideo:
    """One generated video: its FileList.csv row and its traced ED/ES frame indices."""

    file_name: str
    ef: float
    esv: float
    edv: float
    height: int
    width: int
    fps: int
    num_frames: int
    split: str
    ed_frame: int
    es_frame: int

    def filelist_row(self) -> list[str]:
        return [
            self.file_name, f"{self.ef:.4f}", f"{self.esv:.4f}", f"{self.edv:.4f}",
            str(self.height), str(self.width), str(self.fps), str(self.num_frames), self.split,
        ]


class _Masks(NamedTuple):
    """Soft (0..1) masks of one chamber over a chunk of frames, each (frames, H, W)."""

    cavity: np.ndarray  # blood pool
    wall: np.ndarray  # myocardium ring around the cavity
    zone: np.ndarray  # cavity and wall: lower-priority chambers may not carve into it
    valve: np.ndarray | None  # ventricles: the valve leaflets across the base, open in diastole


@dataclass(frozen=True)
class _Chamber:
    """A chamber over time: a superellipse |x/a|^p + |y/b|^p <= 1 in axes local to it.

    x runs along (ex, ey), from apex to base; y runs across. Ventricles are cut flat at x = cut, their valve
    plane. Arrays are per frame, shape (T,); the shape exponent, axis and wall stay fixed.
    """

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ex: float
    ey: float
    p: float
    wall: float  # wall thickness, px
    cut: np.ndarray | None = None  # ventricles only: valve plane, distance from the centre towards the base
    valve_open: np.ndarray | None = None  # ventricles only: 0 closed .. 1 fully open

    def masks(self, xs: np.ndarray, ys: np.ndarray, frames: slice) -> _Masks:
        def per_frame(values: np.ndarray) -> np.ndarray:
            return values[frames, None, None].astype(np.float32)

        dx, dy = xs - per_frame(self.cx), ys - per_frame(self.cy)
        along = dx * self.ex + dy * self.ey
        across = dy * self.ex - dx * self.ey
        a, b = per_frame(self.a), per_frame(self.b)
        distance = _superellipse_distance(np.abs(along) / a, np.abs(across) / b, a, b, self.p)
        wall = _soft_inside(-distance) * _soft_inside(distance - self.wall)
        zone = _soft_inside(distance - self.wall)
        if self.cut is None:
            return _Masks(_soft_inside(distance), wall, zone, None)

        cut = per_frame(self.cut)
        beyond_base = along - cut
        cavity = _soft_inside(np.maximum(distance, beyond_base))
        # The wall stops at the valve plane; the leaflets fill the base in a band just outside the cavity.
        before_valve = _soft_inside(beyond_base - _VALVE_BAND)
        base_half_width = b * (1 - (cut / a) ** self.p) ** (1 / self.p)
        leaflet_gap = base_half_width * 0.85 * per_frame(self.valve_open)
        valve = (
            _soft_inside(-beyond_base)
            * before_valve
            * _soft_inside(np.abs(across) - base_half_width)  # across the base ...
            * _soft_inside(leaflet_gap - np.abs(across))  # ... but not in the opening between the leaflets
        )
        return _Masks(cavity, wall * before_valve, zone * before_valve, valve)

    def half_width(self, frame: int, along: np.ndarray) -> np.ndarray:
        """Half-width of the cavity at positions `along` the axis (relative to the centre) in one frame."""
        a, b = self.a[frame], self.b[frame]
        return b * np.clip(1 - (np.abs(along) / a) ** self.p, 0, 1) ** (1 / self.p)

    def apex_and_base(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """The long axis of a ventricle: apex point and the middle of its valve plane, (x, y) each."""
        centre = np.array([self.cx[frame], self.cy[frame]])
        axis = np.array([self.ex, self.ey])
        return centre - self.a[frame] * axis, centre + self.cut[frame] * axis


def _soft_inside(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by the region {distance < 0}: a one-pixel linear ramp, so areas are sub-pixel."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _superellipse_distance(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray, p: float) -> np.ndarray:
    """Approximate signed distance (px) to the superellipse u^p + v^p = 1, with u = |x|/a and v = |y|/b.

    First-order: (r - 1) / |grad r| with r = (u^p + v^p)^(1/p), exact on the boundary, which is all the
    walls and soft edges need.
    """
    u_pow, v_pow = u ** (p - 1), v ** (p - 1)
    radius_pow = np.maximum(u_pow * u + v_pow * v, 1e-6)
    radius = radius_pow ** (1 / p)
    scale = radius / radius_pow  # = radius^(1 - p)
    gradient = np.sqrt((u_pow / a) ** 2 + (v_pow / b) ** 2) * scale
    return (radius - 1) / np.maximum(gradient, 1e-6)


@dataclass(frozen=True)
class _Heart:
    """Everything drawn from a video's random generator: the scene, the beat and the picture's look."""

    height: int
    width: int
    fps: int
    num_frames: int
    name: str
    # Sector field of view: transducer position, depth and half-angle.
    origin: tuple[float, float]
    depth: float
    half_angle: float
    cm_per_px: float
    # The traced beat.
    ed_frame: int
    es_frame: int
    # Chambers: the LV, the right ventricle and the two atria, in carving priority.
    chambers: tuple[_Chamber, ...]
    wall_levels: tuple[float, ...]
    valve_level: float
    blood_level: float
    tissue_level: float
    # Imaging.
    gain: float
    attenuation: float
    clutter: float
    speckle_sigma: tuple[float, float]  # (axial, lateral) correlation, px
    speckle_persistence: float  # 0: fresh speckle every frame .. 1: frozen


def _beat(num_frames: int, fps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Contraction and valve opening per frame, and the ED and ES frames of the first beat in the video.

    The systole is a whole number of frames long and the beat is placed so an ED frame falls exactly on
    a frame: both traced frames are exact ED and ES.
    """
    heart_rate = rng.uniform(50, 120)
    beat_frames = fps * 60.0 / heart_rate
    # Systole shortens less than diastole as the heart rate rises.
    systole_s = 0.36 - 0.10 * (heart_rate - 50) / 70 + rng.uniform(-0.02, 0.02)
    systole_frames = round(systole_s * fps)
    ed_frame = int(rng.integers(0, min(round(beat_frames), num_frames - systole_frames)))

    phase = ((np.arange(num_frames) - ed_frame) / beat_frames) % 1.0
    systole_share = systole_frames / beat_frames
    in_systole = phase < systole_share
    filling = np.clip((phase - systole_share) / (1 - systole_share), 0.0, 1.0)
    contraction = np.where(
        in_systole,
        0.5 * (1 - np.cos(np.pi * phase / systole_share)),
        0.5 * (1 + np.cos(np.pi * filling**0.6)),  # fast early filling, then slow
    )
    valve_open = np.where(in_systole, 0.0, np.clip(np.sin(np.pi * filling), 0.0, 1.0) ** 0.7)
    return contraction, valve_open, ed_frame, ed_frame + systole_frames


def _es_width_factor(volume_ratio: float, length_coupling: float) -> float:
    """LV width factor w at ES such that ESV/EDV = w^2 * l, with the length factor l = 1 - k (1 - w).

    The area-length volume scales as width^2 x length; the left side grows with w, so bisect.
    """
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if mid * mid * (1 - length_coupling * (1 - mid)) < volume_ratio:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _ventricle(
    apex_or_base: np.ndarray, from_base: bool, angle: float, length: np.ndarray, half_width: np.ndarray,
    base_share: float, p: float, wall: float, valve_open: np.ndarray,
) -> _Chamber:
    """A ventricle placed by its apex, or by the middle of its valve plane when `from_base`.

    `base_share` is how far the cut sits past the centre, as a share of the semi-axis: the base is
    narrower than the widest part, like a bullet.
    """
    ex, ey = math.sin(angle), math.cos(angle)
    semi_axis = length / (1 + base_share)
    cut = base_share * semi_axis
    offset = -cut if from_base else semi_axis
    cx, cy = apex_or_base + np.array([[ex], [ey]]) * offset
    return _Chamber(cx, cy, semi_axis, half_width, ex, ey, p, wall, cut, valve_open)


def _atrium(base: np.ndarray, angle: float, semi_axes: tuple[np.ndarray, np.ndarray], wall: float) -> _Chamber:
    """An ellipse below a ventricle's valve plane, past the band where the leaflets are."""
    ex, ey = math.sin(angle), math.cos(angle)
    along, across = semi_axes
    cx, cy = base + np.array([[ex], [ey]]) * (_VALVE_BAND + along)
    return _Chamber(cx, cy, along, across, ex, ey, 2.0, wall)


def _sample_heart(rng: np.random.Generator, height: int, width: int, fps: int, num_frames: int) -> _Heart:
    """Draw one video's scene. LV placements that would leave the sector are drawn again."""
    name = f"0X{int(rng.integers(0, 2**63)):016X}"
    contraction, valve_open, ed_frame, es_frame = _beat(num_frames, fps, rng)
    origin = ((width - 1) / 2, -0.02 * height)
    depth = 1.0 * height
    half_angle = rng.uniform(0.62, 0.72)
    size = depth / 112  # the scene is designed at 112 px and scales with the frame
    wall_level = rng.uniform(0.5, 0.9)
    while True:
        # The EF aimed at, mean ~50 %, spread over 10..80 %; the label is measured on the drawn frames.
        target_ef = 10 + 70 * rng.beta(2.2, 1.6)
        length_coupling = rng.uniform(0.25, 0.5)  # longitudinal shortening relative to radial
        es_width = _es_width_factor(1 - target_ef / 100, length_coupling)
        es_length = 1 - length_coupling * (1 - es_width)

        # Left ventricle: apex fixed near the top, base to the lower right; walls in, base up.
        lv_angle = rng.uniform(-0.08, 0.22)
        lv_length0 = depth * rng.uniform(0.42, 0.54)
        lv_width0 = lv_length0 * rng.uniform(0.26, 0.36)
        apex = np.array([origin[0] + depth * rng.uniform(-0.02, 0.06), origin[1] + depth * rng.uniform(0.1, 0.2)])
        lv_length = lv_length0 * (1 - contraction * (1 - es_length))
        lv_width = lv_width0 * (1 - contraction * (1 - es_width))
        lv_wall = size * rng.uniform(4.0, 6.0)
        lv = _ventricle(
            apex[:, None], False, lv_angle, lv_length, lv_width,
            rng.uniform(0.2, 0.35), rng.uniform(2.0, 2.6), lv_wall, valve_open,
        )
        if _fits_in_sector(lv, ed_frame, origin, depth, half_angle, height, width):
            break

    # Right ventricle: to the left of the septum, sharing the LV's valve plane motion; its own contraction.
    rv_angle = lv_angle - rng.uniform(0.05, 0.25)
    rv_width = lv_width0 * rng.uniform(0.75, 1.0) * (1 - contraction * (1 - rng.uniform(0.7, 0.88)))
    rv_length = lv_length * rng.uniform(0.7, 0.88)
    septum_gap = size * rng.uniform(0.0, 2.0)
    lv_bases = np.stack([lv.cx + lv.cut * lv.ex, lv.cy + lv.cut * lv.ey])
    leftward = np.array([-lv.ey, lv.ex])[:, None]
    rv_base = lv_bases + leftward * (lv_width + lv_wall + septum_gap + rv_width)
    rv = _ventricle(
        rv_base, True, rv_angle, rv_length, rv_width,
        rng.uniform(0.1, 0.3), rng.uniform(1.7, 2.2), size * rng.uniform(2.0, 3.0), valve_open,
    )
    # Atria fill while the ventricles empty.
    atria = []
    for ventricle, angle, base in ((lv, lv_angle, lv_bases), (rv, rv_angle, rv_base)):
        filling = 1 + rng.uniform(0.1, 0.25) * contraction
        along = lv_length0 * rng.uniform(0.28, 0.36) * filling
        across = ventricle.half_width(ed_frame, ventricle.cut[ed_frame]) * rng.uniform(0.9, 1.1) * filling
        atria.append(_atrium(base, angle, (along, across), size * rng.uniform(2.0, 3.0)))

    return _Heart(
        height=height, width=width, fps=fps, num_frames=num_frames, name=name,
        origin=origin, depth=depth, half_angle=half_angle, cm_per_px=rng.uniform(14, 18) / depth,
        ed_frame=ed_frame, es_frame=es_frame,
        chambers=(lv, rv, atria[0], atria[1]),
        wall_levels=(wall_level, *(wall_level * rng.uniform([0.7, 0.5, 0.5], [1.0, 0.8, 0.8])).tolist()),
        valve_level=wall_level * rng.uniform(0.7, 1.0),
        blood_level=rng.uniform(0.01, 0.05),
        tissue_level=rng.uniform(0.08, 0.22),
        gain=rng.uniform(0.75, 1.3),
        attenuation=rng.uniform(0.2, 0.8),
        clutter=rng.uniform(0.1, 0.5),
        speckle_sigma=(size * rng.uniform(0.6, 1.0), size * rng.uniform(1.0, 1.8)),
        speckle_persistence=rng.uniform(0.4, 0.8),
    )


def _fits_in_sector(
    lv: _Chamber, frame: int, origin: tuple[float, float], depth: float, half_angle: float, height: int, width: int
) -> bool:
    """Whether the LV outline, with its wall, lies inside the sector and the frame in `frame` (its largest)."""
    points = np.concatenate([np.array(lv.apex_and_base(frame)), *_chord_ends(lv, frame)])
    margin = lv.wall + 2
    dx, dy = points[:, 0] - origin[0], points[:, 1] - origin[1]
    radius = np.hypot(dx, dy)
    inside_fan = (radius < depth - margin) & (np.abs(np.arctan2(dx, dy)) * radius < half_angle * radius - margin)
    inside_frame = (points > margin).all() and (points < np.array([width, height]) - 1 - margin).all()
    return bool(inside_fan.all() and inside_frame)


def _chord_ends(lv: _Chamber, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """The CHORDS perpendicular chords of a traced frame, evenly spaced from base to apex: (CHORDS, 2) each."""
    apex, base = lv.apex_and_base(frame)
    axis, across = np.array([lv.ex, lv.ey]), np.array([-lv.ey, lv.ex])
    length = np.linalg.norm(base - apex)
    from_base = length * (np.arange(CHORDS) + 0.5) / CHORDS
    half_width = lv.half_width(frame, lv.cut[frame] - from_base)[:, None]
    middles = base - from_base[:, None] * axis
    return middles + half_width * across, middles - half_width * across


def _gaussian_filter(height: int, width: int, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Frequency response of a Gaussian blur with the given spatial standard deviations (px)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    return np.exp(-2 * np.pi**2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2)).astype(np.float32)


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], response: np.ndarray) -> np.ndarray:
    """Complex Gaussian noise blurred by `response`, scaled to unit mean power."""
    white = rng.standard_normal((*shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    blurred = np.fft.ifft2(np.fft.fft2(white) * response)
    return blurred / np.sqrt(np.mean(response**2) * 2)


def _render(heart: _Heart, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The video as uint8 (T, H, W), the LV cavity area (px^2) drawn in each frame, and the LV truth mask
    (T, H, W) bool: pixels at least half covered by the cavity (the LV is carved first, so it is all blood)."""
    h, w = heart.height, heart.width
    ys, xs = (grid[None].astype(np.float32) for grid in np.mgrid[0:h, 0:w])
    dx, dy = xs - heart.origin[0], ys - heart.origin[1]
    radius = np.hypot(dx, dy)
    sector = _soft_inside(radius - heart.depth) * _soft_inside((np.abs(np.arctan2(dx, dy)) - heart.half_angle) * radius)
    depth_share = radius / heart.depth
    amplification = heart.gain * np.exp(-heart.attenuation * depth_share)
    near_field = heart.clutter * np.exp(-depth_share / 0.06)  # reverberation clutter under the probe
    tissue_texture = _correlated_noise(rng, (1, h, w), _gaussian_filter(h, w, 6 * h / 112, 6 * h / 112)).real
    tissue = heart.tissue_level * np.clip(1 + 0.5 * tissue_texture, 0.3, None)

    speckle_response = _gaussian_filter(h, w, *heart.speckle_sigma)
    frozen_speckle = _correlated_noise(rng, (1, h, w), speckle_response)
    rayleigh_mean = math.sqrt(math.pi) / 2  # mean of |z| for unit-power complex Gaussian z

    video = np.empty((heart.num_frames, h, w), np.uint8)
    lv_area = np.empty(heart.num_frames)
    lv_mask = np.empty((heart.num_frames, h, w), bool)
    for start in range(0, heart.num_frames, RENDER_CHUNK):
        frames = slice(start, min(start + RENDER_CHUNK, heart.num_frames))
        count = frames.stop - frames.start
        masks = [chamber.masks(xs, ys, frames) for chamber in heart.chambers]
        reflectivity = np.repeat(tissue, count, axis=0)
        for level, chamber_masks in zip(heart.wall_levels, masks):
            np.maximum(reflectivity, level * chamber_masks.wall, out=reflectivity)
        # Carve blood pools in priority order: the LV first, untouched; the others stop at higher walls.
        free = np.ones_like(reflectivity)
        for chamber_masks in masks:
            blood = chamber_masks.cavity * free
            reflectivity += (heart.blood_level - reflectivity) * blood
            free *= 1 - chamber_masks.zone
        for chamber_masks in masks:
            if chamber_masks.valve is not None:
                np.maximum(reflectivity, heart.valve_level * chamber_masks.valve, out=reflectivity)
        lv_area[frames] = masks[0].cavity.sum(axis=(1, 2), dtype=np.float64)
        lv_mask[frames] = masks[0].cavity >= 0.5

        fresh = _correlated_noise(rng, (count, h, w), speckle_response)
        persistence = heart.speckle_persistence
        speckle = np.abs(persistence * frozen_speckle + math.sqrt(1 - persistence**2) * fresh) / rayleigh_mean
        echo = (amplification * reflectivity + near_field) * speckle
        # Compress the echo amplitude into 0..255 the way a scanner's display map does: bright walls saturate.
        video[frames] = np.rint(255 * (1 - np.exp(-1.8 * echo)) * sector).astype(np.uint8)
    return video, lv_area, lv_mask


def _write_avi(path: str, video: np.ndarray, fps: int) -> None:
    """MJPEG AVI, full-range YUV 4:2:0 (what EchoNet-style loaders and ffmpeg read)."""
    with av.open(path, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.height, stream.width = video.shape[1:]
        stream.pix_fmt = "yuvj420p"
        stream.codec_context.qmin = stream.codec_context.qmax = JPEG_QSCALE
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())


def mask_path(root: str | os.PathLike, file_name: str) -> str:
    """Where the per-frame LV truth of video `file_name` (with or without .avi) lives in dataset `root`."""
    return os.path.join(os.fspath(root), MASKS_DIR, os.path.splitext(os.path.basename(file_name))[0] + ".npz")


def _write_masks(path: str, masks: np.ndarray) -> None:
    """(T, H, W) bool as packed bits (1/8 of a byte per pixel) plus the shape to unpack them."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, bits=np.packbits(masks, axis=None), shape=np.array(masks.shape))


def read_truth_masks(root: str | os.PathLike, file_name: str) -> np.ndarray:
    """The generator's LV truth of one synthetic video: (T, H, W) bool, at the video's own size and rate."""
    path = mask_path(root, file_name)
    if not os.path.isfile(path):
        raise DatasetError(path, "no LV truth masks (only `evim3 data synth` datasets have them)")
    with np.load(path, allow_pickle=False) as data:
        shape = tuple(int(n) for n in data["shape"])
        return np.unpackbits(data["bits"], count=int(np.prod(shape))).astype(bool).reshape(shape)


class _VideoJob(NamedTuple):
    seed: int
    index: int
    videos_dir: str
    root: str  # the dataset folder (masks: mask_path)
    height: int
    width: int
    fps: int
    frame_range: tuple[int, int]
    split: str


def _make_video(job: _VideoJob) -> tuple[SynthVideo, list[list[str]]]:
    """Draw, render and write one video; return its FileList row and its VolumeTracings rows."""
    rng = np.random.default_rng(np.random.SeedSequence(job.seed, spawn_key=(job.index,)))
    num_frames = int(rng.integers(job.frame_range[0], job.frame_range[1] + 1))
    heart = _sample_heart(rng, job.height, job.width, job.fps, num_frames)
    video, lv_area, lv_mask = _render(heart, rng)
    _write_avi(os.path.join(job.videos_dir, heart.name + ".avi"), video, job.fps)
    _write_masks(mask_path(job.root, heart.name), lv_mask)

    lv = heart.chambers[0]
    volumes, tracings = {}, []
    # EchoNet lists the ES (smaller) tracing first and the ED tracing last.
    for frame in (heart.es_frame, heart.ed_frame):
        apex, base = lv.apex_and_base(frame)
        length_cm = float(np.linalg.norm(base - apex)) * heart.cm_per_px
        volumes[frame] = area_length_volume(lv_area[frame] * heart.cm_per_px**2, length_cm)  # mL
        segments = [(apex, base), *zip(*_chord_ends(lv, frame))]  # the long axis, then the chords
        for (x1, y1), (x2, y2) in segments:
            tracings.append([f"{heart.name}.avi", f"{x1:.4f}", f"{y1:.4f}", f"{x2:.4f}", f"{y2:.4f}", str(frame)])
    edv, esv = volumes[heart.ed_frame], volumes[heart.es_frame]
    record = SynthVideo(
        file_name=heart.name, ef=100 * (edv - esv) / edv, esv=esv, edv=edv,
        height=job.height, width=job.width, fps=job.fps, num_frames=num_frames, split=job.split,
        ed_frame=heart.ed_frame, es_frame=heart.es_frame,
    )
    return record, tracings


def _plan(num_videos: int, seed: int, other_format_share: float) -> list[tuple[str, tuple[int, int], int]]:
    """Split, (height, width) and fps of every video: exact split sizes (~75/12.5/12.5) in shuffled order,
    and a fixed share of videos at other sizes and, independently, at other rates."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    held_out = max(1, round(num_videos / 8)) if num_videos >= 3 else 0
    splits = ["TRAIN"] * (num_videos - 2 * held_out) + ["VAL"] * held_out + ["TEST"] * held_out
    splits = [splits[i] for i in rng.permutation(num_videos)]
    sizes, rates = [DEFAULT_SIZE] * num_videos, [DEFAULT_FPS] * num_videos
    others = round(num_videos * other_format_share)
    for i in rng.choice(num_videos, others, replace=False):
        sizes[i] = OTHER_SIZES[rng.integers(len(OTHER_SIZES))]
    for i in rng.choice(num_videos, others, replace=False):
        rates[i] = int(rng.choice(OTHER_FPS))
    return list(zip(splits, sizes, rates))


def _make_videos(jobs: list[_VideoJob], workers: int) -> Iterator[tuple[SynthVideo, list[list[str]]]]:
    """`_make_video` over the jobs, in order, in this process or in a pool of `workers` processes."""
    if workers <= 1:
        yield from map(_make_video, jobs)
        return
    # spawn: workers start clean whatever the parent has loaded (torch's threads in a test run, say).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_make_video, jobs)


def _csv_text(header: tuple[str, ...], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def generate_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int = 0,
    *,
    workers: int = 1,
    frame_range: tuple[int, int] = (90, 220),
    other_format_share: float = 0.1,
    progress: Callable[[], None] | None = None,
) -> list[SynthVideo]:
    """Write an EchoNet-Dynamic-layout dataset of `num_videos` synthetic videos into a new folder `out_dir`.

    `frame_range` bounds the video lengths (inclusive); `other_format_share` of the videos get another
    frame size and, independently, the same share another frame rate. `progress` is called once per
    finished video. The CSVs are written last, so a folder without FileList.csv is an unfinished one.
    Returns the FileList rows in file order.

    With workers > 1 the videos are rendered in spawned processes: a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out_dir = os.fspath(out_dir)
    if num_videos < 1:
        raise ValueError(f"need at least one video, got {num_videos}")
    if not MIN_FRAMES <= frame_range[0] <= frame_range[1]:
        raise ValueError(f"frame_range must be (low, high) with {MIN_FRAMES} <= low <= high, got {frame_range}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise DatasetError(out_dir, "exists and is not empty; choose a new folder")
    videos_dir = os.path.join(out_dir, VIDEOS_DIR)
    os.makedirs(videos_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, MASKS_DIR), exist_ok=True)

    jobs = [
        _VideoJob(seed, index, videos_dir, out_dir, *size, fps, frame_range, split)
        for index, (split, size, fps) in enumerate(_plan(num_videos, seed, other_format_share))
    ]
    results = []
    for result in _make_videos(jobs, workers):
        results.append(result)
        if progress:
            progress()

    records = [record for record, _ in results]
    write_atomic(os.path.join(out_dir, TRACINGS_NAME), _csv_text(TRACING_COLUMNS, [r for _, t in results for r in t]))
    write_atomic(os.path.join(out_dir, FILELIST_NAME), _csv_text(FILELIST_COLUMNS, [r.filelist_row() for r in records]))
    return records
