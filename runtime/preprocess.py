"""The one preprocessing of evim3: training datasets and edge inference both run it.

    frames (T, H, W) uint8 at the source rate
      -> crop to the ultrasound region (the DICOM region, else where pixels move; see ``ultrasound_region``)
      -> pad the shorter side with black to a square, keeping the aspect ratio; resize to spec.size
         (area averaging when shrinking, bicubic when enlarging; nothing to do for EchoNet's 112x112)
      -> resample to spec.fps (the nearest frame in time)
      -> (x - mean) / std as float32 (T', size, size)

The names say what comes in and what goes out: ``{stream,frames,video}_to_uint8`` run every step but the
last (uint8 at spec.size and spec.fps: what a dataset caches, a quarter of float32's memory) on an iterator
of frames, a (T, H, W) array or a decoded ``Video`` (whose DICOM region it uses); ``{frames,video}_to_input``
add the normalisation: the model's input. Clip sampling, which frames of the preprocessed video make a model
input, is defined here too, once. numpy and Pillow only.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.video import Region, Video
from PIL import Image

# Motion crop (see ultrasound_region).
MOTION_SAMPLE_FRAMES = 32  # frames, spread over the video, on which motion is measured
MOTION_LEVEL = 12  # gray levels a pixel must vary by to move: above codec noise, below speckle change
LINE_SHARE = 0.02  # a row/column is in the region when this share of it (and at least 2 pixels) moves
MIN_LINE_PIXELS = 2
GAP_SHARE = 0.02  # still rows/columns inside the region (dark chambers) bridged, as a share of the side
EDGE_SNAP_SHARE = 0.04  # margins thinner than this share of the side are not cropped
# A box of motion this share of both sides or more: a picture already cropped to its sector (EchoNet's
# prepared 112x112 videos, whose still rows above the sector's apex and dark corners are part of what the
# paper's network saw), kept whole. A scanner screen's sector is well under 80 % of its width: text, scales
# and menus sit beside it.
SECTOR_FILL_SHARE = 0.8
MIN_MOVING_SHARE = 0.01  # less motion than this share of the frame: a still picture, kept whole
# The motion crop is measured on the video's first frames: a stream cannot look ahead, and until the box is
# known these frames are held at source resolution (the bound on a stream's memory; see stream_to_uint8).
MOTION_WINDOW_SECONDS = 2.0  # two heartbeats at 60 bpm
MOTION_WINDOW_MAX_FRAMES = 100  # at most: 2 s at 50 fps; 207 MB of 1920x1080 gray frames

FPS_TOLERANCE = 0.5  # source rates this close to spec.fps are not resampled


def ultrasound_region(video: Video) -> Region:
    """(y0, y1, x0, x1), half-open: where the ultrasound picture is in `video`'s frames.

    The region the DICOM file states when there is one (``video.meta["region"]``); otherwise found by
    ``motion_region`` from the motion in the first ``motion_window_frames`` frames.
    """
    region = video.meta.get("region")
    return tuple(region) if region else motion_region(video.frames[:motion_window_frames(video.fps)])


def motion_window_frames(fps: float) -> int:
    """How many of a video's first frames the motion crop is measured on: MOTION_WINDOW_SECONDS of them, at
    most MOTION_WINDOW_MAX_FRAMES."""
    return max(2, min(MOTION_WINDOW_MAX_FRAMES, math.ceil(MOTION_WINDOW_SECONDS * fps)))


def motion_region(frames: np.ndarray) -> Region:
    """The box around the pixels that change over time, without overlays.

    Rule: a pixel moves when its range (max - min) over up to 32 frames spread over `frames` exceeds 12
    gray levels. A row is active when at least 2 % of it (and 2 pixels) moves; active rows separated by gaps
    of up to 2 % of the height form runs, and the run holding the most moving pixels gives y0..y1. Columns
    are then found the same way within those rows. So static text and calipers never count, and moving
    things apart from the picture (a blinking cursor, a changing clock or heart rate, an ECG trace below the
    sector) form their own, smaller runs and are left out. A box covering 80 % or more of both sides is a
    picture already cropped to its sector (EchoNet's videos: still rows above the apex, dark corners) and the
    whole frame is returned; otherwise margins thinner than 4 % of a side are kept. A video in which less
    than 1 % of the frame moves is taken as still, and its whole frame returned.
    """
    num_frames, height, width = frames.shape
    whole = (0, height, 0, width)
    sample = frames[motion_sample(num_frames)]
    moving = sample.max(axis=0) - sample.min(axis=0) > MOTION_LEVEL
    if moving.sum() < MIN_MOVING_SHARE * height * width:
        return whole
    y0, y1 = _main_run(moving)
    x0, x1 = _main_run(moving[y0:y1].T)
    if moving[y0:y1, x0:x1].sum() < MIN_MOVING_SHARE * height * width:  # only a cursor blinks
        return whole
    if y1 - y0 >= SECTOR_FILL_SHARE * height and x1 - x0 >= SECTOR_FILL_SHARE * width:
        return whole
    return (*_snap_to_edges(y0, y1, height), *_snap_to_edges(x0, x1, width))


def motion_sample(num_frames: int) -> np.ndarray:
    """Indices of the (up to MOTION_SAMPLE_FRAMES) frames, spread over `num_frames`, motion is measured on."""
    return np.unique(np.linspace(0, num_frames - 1, MOTION_SAMPLE_FRAMES).round().astype(int))


def _main_run(moving: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the run of active rows of `moving` that holds the most moving pixels."""
    length, line = moving.shape
    counts = moving.sum(axis=1)
    active = np.flatnonzero(counts >= max(MIN_LINE_PIXELS, LINE_SHARE * line))
    if active.size == 0:
        return 0, length
    max_gap = max(1, round(GAP_SHARE * length))
    breaks = np.flatnonzero(np.diff(active) > max_gap + 1)
    starts = active[np.r_[0, breaks + 1]]
    stops = active[np.r_[breaks, active.size - 1]] + 1
    weights = [counts[start:stop].sum() for start, stop in zip(starts, stops)]
    best = int(np.argmax(weights))
    return int(starts[best]), int(stops[best])


def _snap_to_edges(start: int, stop: int, side: int) -> tuple[int, int]:
    margin = EDGE_SNAP_SHARE * side
    return (0 if start < margin else start), (side if side - stop < margin else stop)


def resample_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """For each frame at `target_fps`, the index of the source frame nearest in time.

    Frame i of a video at `fps` covers [i / fps, (i + 1) / fps); output frame j takes the source frame whose
    span holds its centre (j + 0.5) / target_fps. The duration is kept: round(num_frames * target_fps / fps)
    frames come out. Rates within 0.5 fps of each other are taken as equal (every frame, once).
    """
    if fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got {fps} and {target_fps}")
    if abs(fps - target_fps) < FPS_TOLERANCE:
        return np.arange(num_frames)
    count = max(1, round(num_frames * target_fps / fps))
    return np.minimum(_source_index(np.arange(count), fps, target_fps), num_frames - 1)


def _source_index(output: np.ndarray | int, fps: float, target_fps: float) -> np.ndarray | int:
    """Source frame whose span holds the centre of `output` frame(s) at target_fps (unbounded by the end)."""
    return np.floor((2 * np.asarray(output) + 1) * fps / (2 * target_fps)).astype(np.int64)


def square_resize_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where ``square_resize`` puts a (height, width) picture in its size x size output: (new height,
    new width, top, left)."""
    new_height, new_width = resized_shape(height, width, size)
    return new_height, new_width, (size - new_height) // 2, (size - new_width) // 2


def preprocessed_points(points: np.ndarray, region: Region, size: int) -> np.ndarray:
    """(P, 2) x, y pixel coordinates of a source frame (pixel centres at integers, as EchoNet's tracings)
    -> the same points in the preprocessed size x size frame: crop to `region`, then ``square_resize``."""
    y0, y1, x0, x1 = region
    new_height, new_width, top, left = square_resize_geometry(y1 - y0, x1 - x0, size)
    scale = np.array([new_width / (x1 - x0), new_height / (y1 - y0)])
    # Resizing maps pixel edges onto pixel edges, so a centre at c maps to (c + 0.5) * scale - 0.5.
    return (np.asarray(points, np.float64) - [x0, y0] + 0.5) * scale - 0.5 + [left, top]


def square_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W) uint8 -> (T, size, size) uint8: scale the longer side to `size`, centre, pad with black.

    The same as padding to a square first and resizing, without resampling the padding. Black is what
    surrounds an ultrasound sector anyway. Area averaging (Pillow BOX) when shrinking, bicubic when enlarging.
    """
    num_frames, height, width = frames.shape
    new_height, new_width, top, left = square_resize_geometry(height, width, size)
    longer = max(height, width)
    if (new_height, new_width) != (height, width):
        method = Image.Resampling.BOX if longer > size else Image.Resampling.BICUBIC
        frames = np.stack([np.asarray(Image.fromarray(frame).resize((new_width, new_height), method))
                           for frame in frames])
    if new_height == new_width == size:
        return frames
    squared = np.zeros((num_frames, size, size), np.uint8)
    squared[:, top:top + new_height, left:left + new_width] = frames
    return squared


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of a picture once ``square_resize`` has scaled its longer side to `size`."""
    longer = max(height, width)
    return max(1, round(height * size / longer)), max(1, round(width * size / longer))


def resized_spacing(spacing: tuple[float, float], region: Region, size: int) -> tuple[float, float]:
    """The physical (dy, dx) of a pixel of the model's frames, from that of the source's pixels and the
    region ``square_resize`` scaled: each side keeps its physical length over its new pixel count."""
    y0, y1, x0, x1 = region
    new_height, new_width = resized_shape(y1 - y0, x1 - x0, size)
    return spacing[0] * (y1 - y0) / new_height, spacing[1] * (x1 - x0) / new_width


def stream_to_uint8(frames: Iterable[np.ndarray], fps: float, spec: PreprocessSpec,
                    region: Region | None = None, on_region: Callable[[Region], None] | None = None
                    ) -> Iterator[np.ndarray]:
    """uint8 frames (H, W) at `fps`, one at a time -> uint8 (spec.size, spec.size) frames at spec.fps, one at
    a time: crop to `region`, ``square_resize``, ``resample_indices``. The frames at spec.fps are those of
    ``frames_to_uint8`` on the whole stack (each needed source frame is resized once, as it arrives).

    `region` (y0, y1, x0, x1) None: found by ``motion_region`` on the first ``motion_window_frames(fps)``
    frames, which are held until then. Past them only the current frame is held, so memory does not grow
    with the length of the stream. `on_region` is told the region used, before the first frame comes out.
    """
    frames = iter(frames)
    if region is None:
        window = deque(itertools.islice(frames, motion_window_frames(fps)))
        if not window:
            return
        region = motion_region(np.stack([window[i] for i in motion_sample(len(window))]))  # the same sample
        frames = itertools.chain(_drain(window), frames)
    if on_region:
        on_region(region)
    y0, y1, x0, x1 = region

    def resized(frame: np.ndarray) -> np.ndarray:
        return square_resize(frame[None, y0:y1, x0:x1], spec.size)[0]

    if abs(fps - spec.fps) < FPS_TOLERANCE:  # as resample_indices: every frame, once
        yield from map(resized, frames)
        return
    output, count, last = 0, 0, None
    for index, frame in enumerate(frames):
        count, last, out = index + 1, frame, None
        while _source_index(output, fps, spec.fps) == index:  # upsampling repeats a frame
            out = resized(frame) if out is None else out
            yield out
            output += 1
    # The last outputs may fall past the last frame (resample_indices clips them to it).
    remaining = max(1, round(count * spec.fps / fps)) - output if count else 0
    if remaining > 0:
        out = resized(last)
        for _ in range(remaining):
            yield out


def _drain(window: deque) -> Iterator[np.ndarray]:
    """Yield and forget the held frames, so each is freed once it is processed."""
    while window:
        yield window.popleft()


def frames_to_uint8(frames: np.ndarray, fps: float, spec: PreprocessSpec,
                    region: Region | None = None) -> np.ndarray:
    """uint8 frames (T, H, W) at `fps` -> uint8 (T', spec.size, spec.size) at spec.fps: every step of
    ``frames_to_input`` but the normalisation (what a dataset keeps in memory: a quarter of float32's).

    `region` (y0, y1, x0, x1) is where the picture is; None finds it from the motion in the first frames
    (``motion_region``), as ``video_to_uint8`` does for a file without a DICOM region.
    """
    if frames.ndim != 3 or len(frames) == 0:
        raise ValueError(f"expected frames of shape (T, H, W) with T >= 1, got {frames.shape}")
    return np.stack(list(stream_to_uint8(frames, fps, spec, region)))


def normalise(frames: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 -> (x - mean) / std as float32; elementwise, so normalising a clip's frames equals taking
    them from the normalised video."""
    out = frames.astype(np.float32)
    out -= np.float32(spec.mean)
    out /= np.float32(spec.std)
    return out


def frames_to_input(frames: np.ndarray, fps: float, spec: PreprocessSpec,
                    region: Region | None = None) -> np.ndarray:
    """uint8 frames (T, H, W) at `fps` -> normalised float32 (T', spec.size, spec.size) at spec.fps."""
    return normalise(frames_to_uint8(frames, fps, spec, region), spec)


def video_to_uint8(video: Video, spec: PreprocessSpec) -> np.ndarray:
    """``video_to_input`` without the normalisation: uint8 (T', spec.size, spec.size)."""
    return frames_to_uint8(video.frames, video.fps, spec, ultrasound_region(video))


def video_to_input(video: Video, spec: PreprocessSpec) -> np.ndarray:
    """The pixel path of training and inference: float32 (T', spec.size, spec.size), normalised."""
    return normalise(video_to_uint8(video, spec), spec)


def sample_clip_indices(num_frames: int, spec: PreprocessSpec, start: int = 0) -> np.ndarray:
    """The spec.frames indices start, start + period, ... of a clip; they wrap around (loop the video) past
    the last frame, so a video shorter than a clip still gives a whole clip."""
    if num_frames < 1:
        raise ValueError("a clip needs a video of at least one frame")
    return (start + spec.period * np.arange(spec.frames)) % num_frames


def real_frame_share(num_frames: int, spec: PreprocessSpec, start: int = 0) -> float:
    """Share of the clip at `start` made of the video's own frames, not of repeats from looping past its end
    (``sample_clip_indices``): 1.0 unless the video is shorter than the clip."""
    return float(np.mean(start + spec.period * np.arange(spec.frames) < num_frames))


def sliding_clip_starts(num_frames: int, spec: PreprocessSpec, stride: int) -> list[int]:
    """Starts of the clips, every `stride` (preprocessed) frames, that fit in the video: always at least one
    (a looped clip at 0 when the video is shorter than spec.clip_span)."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1 frame, got {stride}")
    return list(range(0, max(num_frames - spec.clip_span, 0) + 1, stride))
