"""Reading echo videos: container files through PyAV, DICOM cine loops through pydicom. numpy only.

Every reader returns a ``Video``: grayscale uint8 frames (T, H, W), the frame rate, and metadata. Every
failure is a specific ``EchoInputError`` whose one-line message names the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from evim3.runtime.errors import (
    AbsurdSizeError,
    EmptyFileError,
    NoFramesError,
    NoPixelDataError,
    NotAVideoError,
    SingleFrameError,
    SourceNotFoundError,
    TruncatedVideoError,
    UnsupportedCodecError,
)

VIDEO_EXTENSIONS = {".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"}
DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic"}
DEFAULT_DICOM_FPS = 30.0  # used (and noted in meta) when a cine loop carries no timing at all

# Sanity limits: beyond these a file is not an echo clip we should try to hold in memory.
MAX_SIDE = 4096
MIN_SIDE = 16
MAX_FRAMES = 20_000
# A container that decodes to fewer than this share of the frames it declares was cut short.
TRUNCATION_SHARE = 0.9
# ITU-R BT.601 luma weights: RGB -> gray, as PyAV's 'gray' conversion does for YUV.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Video:
    frames: np.ndarray  # (T, H, W) uint8 grayscale
    fps: float
    source: str
    meta: dict = field(default_factory=dict)  # original_size, num_frames, region (y0, y1, x0, x1) | None, ...


def is_dicom(path: str) -> bool:
    """DICOM by extension, or by the 'DICM' magic at byte 128 (files from PACS often have no extension)."""
    if os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_video(path: str | os.PathLike) -> Video:
    """Decode a video or DICOM cine file into grayscale frames."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "file not found")
    if os.path.isdir(path):
        raise NotAVideoError(path, "is a folder, not a video file")
    if os.path.getsize(path) == 0:
        raise EmptyFileError(path, "file is empty (0 bytes)")
    video = _read_dicom(path) if is_dicom(path) else _read_container(path)
    _check_size(video)
    return video


def _check_size(video: Video) -> None:
    T, H, W = video.frames.shape
    if max(H, W) > MAX_SIDE or min(H, W) < MIN_SIDE:
        raise AbsurdSizeError(video.source, f"frame size {W}x{H} is outside {MIN_SIDE}..{MAX_SIDE} pixels")
    if T > MAX_FRAMES:
        raise AbsurdSizeError(video.source, f"{T} frames is more than the {MAX_FRAMES} an echo clip can have")


# --- containers (AVI, MP4, MKV, MOV, ...) through PyAV ---

def _read_container(path: str) -> Video:
    import av

    try:
        container = av.open(path)
    except av.error.InvalidDataError:
        raise NotAVideoError(path, "not a video file (no container format recognised)") from None
    except av.error.FFmpegError as e:
        raise NotAVideoError(path, f"cannot be opened as a video ({e.strerror or e})") from None
    with container:
        if not container.streams.video:
            raise NotAVideoError(path, "contains no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.codec.name:
            raise UnsupportedCodecError(path, "video codec is not supported by this FFmpeg build")
        stream.thread_type = "AUTO"  # frame + slice threading in FFmpeg's decoder
        declared = stream.frames
        frames, error = [], None
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="gray"))
        except av.error.FFmpegError as e:  # a cut or damaged stream: keep what decoded
            error = e
        fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        size = (stream.codec_context.height, stream.codec_context.width)
    if not frames:
        reason = f" ({error})" if error else ""
        raise NoFramesError(path, f"no decodable video frames{reason}")
    if declared and len(frames) < TRUNCATION_SHARE * declared:
        raise TruncatedVideoError(path, f"truncated: decoded {len(frames)} of {declared} declared frames")
    if fps is None:
        raise NotAVideoError(path, "video stream has no frame rate")
    return Video(np.stack(frames), fps, path, {
        "original_size": size, "num_frames": len(frames), "region": None,
        "codec": stream.codec_context.name,
    })


# --- DICOM cine loops through pydicom ---

def _read_dicom(path: str) -> Video:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError) as e:
        raise NotAVideoError(path, f"not a readable DICOM file ({e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NoPixelDataError(path, "DICOM file has no pixel data")
    num_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if num_frames < 2:
        raise SingleFrameError(path, "single-frame DICOM: a still image, not a cine loop")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if max(rows, cols) > MAX_SIDE or min(rows, cols) < MIN_SIDE or num_frames > MAX_FRAMES:
        raise AbsurdSizeError(path, f"{num_frames} frames of {cols}x{rows} pixels is not an echo cine")
    try:
        pixels = ds.pixel_array  # pydicom 3 converts YBR_* to RGB by default
    except NotImplementedError as e:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", "unknown")
        raise UnsupportedCodecError(path, f"no decoder for transfer syntax {syntax} ({e})") from None
    except (ValueError, RuntimeError, EOFError) as e:
        raise TruncatedVideoError(path, f"pixel data cannot be decoded ({str(e).splitlines()[0]})") from None

    frames = _to_gray_uint8(pixels, ds)
    meta = {"original_size": (rows, cols), "num_frames": len(frames), "region": _ultrasound_region(ds, rows, cols),
            "photometric": str(ds.PhotometricInterpretation)}
    fps = _dicom_fps(ds)
    if fps is None:
        fps, meta["fps_note"] = DEFAULT_DICOM_FPS, f"no FrameTime/CineRate in file; assumed {DEFAULT_DICOM_FPS} fps"
    return Video(frames, fps, path, meta)


def _to_gray_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    if pixels.ndim == 4:  # (T, H, W, 3) RGB
        pixels = pixels.astype(np.float32) @ _LUMA
    pixels = pixels.astype(np.float32)
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if bits > 8:  # scale deeper data to 8 bits
        pixels = pixels * (255.0 / (2**bits - 1))
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":  # 0 = white in MONOCHROME1
        pixels = 255.0 - pixels
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _dicom_fps(ds) -> float | None:
    frame_time = getattr(ds, "FrameTime", None)  # milliseconds per frame
    if frame_time and float(frame_time) > 0:
        return 1000.0 / float(frame_time)
    for tag in ("CineRate", "RecommendedDisplayFrameRate"):
        value = getattr(ds, tag, None)
        if value and float(value) > 0:
            return float(value)
    return None


def _ultrasound_region(ds, rows: int, cols: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end exclusive, of the first 2D ultrasound region -- or None when there is none or
    it does not fit the image (some files keep the region of the unscaled acquisition)."""
    for region in getattr(ds, "SequenceOfUltrasoundRegions", []) or []:
        if int(getattr(region, "RegionSpatialFormat", 0)) != 1:  # 1 = 2D tissue or colour flow
            continue
        y0, y1 = int(region.RegionLocationMinY0), int(region.RegionLocationMaxY1) + 1
        x0, x1 = int(region.RegionLocationMinX0), int(region.RegionLocationMaxX1) + 1
        if 0 <= y0 < y1 <= rows and 0 <= x0 < x1 <= cols:
            return (y0, y1, x0, x1)
        return None
    return None


def iter_video_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given, and every video/DICOM file under given folders (recursive, sorted)."""
    found: list[str] = []
    for p in map(os.fspath, paths):
        if not os.path.isdir(p):
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                ext = os.path.splitext(name)[1].lower()
                if ext in VIDEO_EXTENSIONS or ext in DICOM_EXTENSIONS or (not ext and is_dicom(full)):
                    found.append(full)
    return found
