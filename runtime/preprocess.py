"""One preprocessing for training and for the edge: the same function makes the pixels both see.

    frames (T, H, W) uint8 at the source rate
      -> resample to spec.fps (nearest frame by timestamp)
      -> crop to the ultrasound region, pad to a square, resize to spec.size
      -> (x - mean) / std, float32

Clip sampling (which frames make a clip) is defined here too, once, for datasets and inference.
numpy + Pillow only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.video import Video

# Motion crop: a pixel "moves" when its range over the sampled frames exceeds this many gray levels; a
# row/column belongs to the ultrasound region when at least this share of it moves (drops a blinking
# cursor or a changing time stamp), and the region is the longest run of such rows (drops an ECG trace
# drawn below the sector), allowing small gaps inside the sector.
MOTION_LEVEL = 12
MOTION_SHARE = 0.05
MAX_GAP = 3
MOTION_SAMPLE_FRAMES = 32
FPS_TOLERANCE = 0.5  # rates closer than this to spec.fps are not resampled


def ultrasound_region(video: Video) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end exclusive: the DICOM ultrasound region when the file has one, else the
    bounding box of pixels that change over time (static text and overlays are left out)."""
    region = video.meta.get("region")
    return tuple(region) if region else motion_region(video.frames)  # type: ignore[return-value]


def motion_region(frames: np.ndarray) -> tuple[int, int, int, int]:
    T, H, W = frames.shape
    sample = frames[np.linspace(0, T - 1, min(T, MOTION_SAMPLE_FRAMES)).astype(int)]
    moving = (sample.max(0).astype(np.int16) - sample.min(0)) > MOTION_LEVEL
    rows = _longest_run(moving.mean(1) >= MOTION_SHARE)
    if rows is None:
        return (0, H, 0, W)  # nothing moves: keep the whole frame
    cols = _longest_run(moving[rows[0]:rows[1]].mean(0) >= MOTION_SHARE)
    if cols is None:
        return (0, H, 0, W)
    return (rows[0], rows[1], cols[0], cols[1])


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """[start, end) of the longest run of True, bridging gaps of up to MAX_GAP False."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(idx) > MAX_GAP + 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [idx.size - 1]])
    best = int(np.argmax(idx[ends] - idx[starts]))
    return int(idx[starts[best]]), int(idx[ends[best]]) + 1


def resample_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """Source frame for each output frame at target_fps (nearest by timestamp)."""
    if abs(fps - target_fps) < FPS_TOLERANCE:
        return np.arange(num_frames)
    count = int(np.floor((num_frames - 1) * target_fps / fps + 1e-9)) + 1
    return np.minimum(np.rint(np.arange(count) * fps / target_fps).astype(np.int64), num_frames - 1)


def crop_square_resize(frames: np.ndarray, region: tuple[int, int, int, int] | None, size: int) -> np.ndarray:
    """Crop to `region`, pad the shorter side symmetrically with black (aspect ratio kept), resize to
    size x size: area averaging when shrinking, bicubic when enlarging. Frames already size x size are
    taken as they are (EchoNet-Dynamic videos are stored cropped to the ultrasound region)."""
    T, H, W = frames.shape
    if H == W == size:
        return frames
    if region is not None:
        y0, y1, x0, x1 = region
        frames = frames[:, y0:y1, x0:x1]
        T, H, W = frames.shape
    side = max(H, W)
    if H != W:
        padded = np.zeros((T, side, side), dtype=frames.dtype)
        top, left = (side - H) // 2, (side - W) // 2
        padded[:, top:top + H, left:left + W] = frames
        frames = padded
    if side == size:
        return frames
    method = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), method)) for f in frames])


def preprocess_frames(
    frames: np.ndarray, fps: float, spec: PreprocessSpec, region: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """uint8 (T, H, W) at `fps` -> float32 (T', size, size) at spec.fps, normalised. `region` None: the
    frames are used whole (live streams pass the region found on their first frames)."""
    frames = frames[resample_indices(len(frames), fps, spec.fps)]
    frames = crop_square_resize(frames, region, spec.size)
    out = frames.astype(np.float32)
    out -= np.float32(spec.mean)
    out *= np.float32(1.0 / spec.std)
    return out


def preprocess(video: Video, spec: PreprocessSpec) -> np.ndarray:
    """The one pixel path of training and inference: float32 (T', spec.size, spec.size)."""
    return preprocess_frames(video.frames, video.fps, spec, ultrasound_region(video))


def sample_clip_indices(num_frames: int, spec: PreprocessSpec, start: int) -> np.ndarray:
    """spec.frames indices start, start+period, ... into a (resampled) video; loops when it is too short."""
    return (start + spec.period * np.arange(spec.frames)) % num_frames


def sliding_clip_starts(num_frames: int, spec: PreprocessSpec, stride: int) -> list[int]:
    """Starts of clips every `stride` frames that fit the video; one clip (looped) when none fits."""
    last = num_frames - spec.clip_span
    if last < 0:
        return [0]
    return list(range(0, last + 1, max(1, stride)))
