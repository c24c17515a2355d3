"""Read echo videos and DICOM cines as grayscale uint8 frames: the first step of training and of inference.

``read_video`` chooses the reader by content. A file with the DICOM 'DICM' marker at byte 128, or named
.dcm/.dicom, goes through pydicom (compressed transfer syntaxes through the pylibjpeg/pillow plugins; MPEG-2,
H.264 and HEVC cines through PyAV). Every other file goes through PyAV (FFmpeg), which probes the content
itself, so AVI, MP4, MKV, MOV and extension-less videos all work.

A file that cannot be used raises one of the ``EchoInputError`` subclasses of ``evim3.runtime.errors``; its
message is one line that names the file and the problem.

Truncation rule. A cut file often still decodes: FFmpeg returns the frames before the cut, with or without an
error. The file counts as truncated when the container declares how many frames it holds and more than
``TRUNCATION_SLACK`` of them (or 1 %, if more) are missing, whether or not the decoder raised. The frame
count comes from the stream header, or from the duration when the video is the container's only stream
(Matroska stores no count). When nothing is declared, an error after some frames keeps the frames that
decoded and records the error in ``meta["notes"]``.
"""

from __future__ import annotations

import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import pydicom
from av.video.reformatter import VideoReformatter
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
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder, iter_pixels
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MPEGTransferSyntaxes,
)

VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".m4v", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".wmv", ".ogv"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

# Sizes no echo produces: rejected before decoding, so a bad header cannot exhaust memory.
MAX_SIDE = 4096
MIN_SIDE = 16
MAX_FRAMES = 20_000

DEFAULT_FPS = 30.0  # used, with a note in meta, when a file states no frame rate
TRUNCATION_SLACK = 2  # frames a declared count may overstate (encoder delay, rounded durations) in a whole file

# Gray from RGB: ITU-R BT.601 luma (the Y of YCbCr, so gray from RGB matches gray from YBR) as torchvision's
# rgb_to_grayscale rounds it, which the paper's loader applies to OpenCV's RGB frames.
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)
# Photometric interpretations whose first sample already is BT.601 luma (full range): no conversion needed.
LUMA_FIRST_PHOTOMETRICS = frozenset({"YBR_FULL", "YBR_FULL_422"})
# What pydicom needs to know to decode pixel data.
PIXEL_DESCRIPTION = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
REGION_SPATIAL_FORMAT_2D = 1  # SequenceOfUltrasoundRegions: 1 = 2D image; others are M-mode, spectral, ...
REGION_UNITS_CM = 3  # PhysicalUnitsX/YDirection: 3 = cm (others: none, percent, dB, seconds, hertz, ...)

if TYPE_CHECKING:
    from typing_extensions import Self

Region = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open like a numpy slice


@dataclass
class Video:
    """A decoded video: frames (T, H, W) uint8 grayscale at `fps` frames per second.

    meta holds at least ``original_size`` (H, W), ``num_frames``, ``region`` (the ultrasound region the file
    states, as (y0, y1, x0, x1), or None), ``spacing_cm`` (the physical (dy, dx) of a pixel in cm the file
    states, or None) with ``spacing_source`` (the DICOM element it came from) and ``notes`` (list of str:
    defaults assumed, damage tolerated).
    """

    frames: np.ndarray
    fps: float
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


class VideoReader:
    """An opened video or DICOM cine: ``fps``, ``meta`` (Video.meta but ``num_frames``) and ``frames()``, which
    decodes one gray (H, W) uint8 frame at a time, so that a long video can be processed in bounded memory.

    The checks that need the whole stream (the module's truncation rule, no frame at all, a single frame,
    more than MAX_FRAMES) raise from ``frames()`` after yielding the frames before them: a caller that
    processes frames as they come must drop its results when it raises. ``num_frames`` is set at the end.
    """

    def __init__(self, source: str, fps: float, meta: dict[str, Any], decode: Callable[[], Iterator[np.ndarray]],
                 close: Callable[[], None] = lambda: None):
        self.source = source
        self.fps = fps
        self.meta = meta
        self.num_frames: int | None = None
        self._decode = decode
        self._close = close

    def frames(self) -> Iterator[np.ndarray]:
        count = 0
        for frame in self._decode():
            if count == 0:
                _check_size(self.source, 0, *frame.shape)
            count += 1
            if count > MAX_FRAMES:
                raise AbsurdSizeError(self.source, f"more than {MAX_FRAMES} frames")
            yield frame
        if count == 1:
            raise SingleFrameError(self.source, "holds a single frame: a still image, not a cine")
        self.num_frames = count

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(path: str | os.PathLike, decode_threads: int = 0) -> VideoReader:
    """Open a video or DICOM cine file for decoding frame by frame (see VideoReader).

    `decode_threads` is the FFmpeg decoder thread count (0: FFmpeg's choice); pydicom decodes on one thread.
    Raises an ``EchoInputError`` subclass for a file that cannot be used, as far as its header tells.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceNotFoundError(path, "no such file")
    if os.path.isdir(path):
        raise NotAVideoError(path, "is a folder, not a video file")
    if os.path.getsize(path) == 0:
        raise EmptyFileError(path, "file is empty (0 bytes)")
    is_dicom = _has_dicom_magic(path) or os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS
    return _open_dicom(path) if is_dicom else _open_with_pyav(path, decode_threads)


def open_frames(frames: Iterable[np.ndarray], fps: float, source: str = "frames") -> VideoReader:
    """Frames already decoded, uint8 gray (H, W) or RGB (H, W, 3), at `fps`, as a VideoReader (RGB to gray
    with GRAY_WEIGHTS, as DICOM frames); the size is that of the first frame."""
    if not fps > 0:
        raise ValueError(f"frames need their frame rate: fps must be positive, got {fps}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise NoFramesError(source, "no frames given")
    shape = np.shape(first)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise NotAVideoError(source, f"frames must be (H, W) gray or (H, W, 3) RGB, got {shape}")

    def gray() -> Iterator[np.ndarray]:
        for frame in itertools.chain([first], iterator):
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.shape != shape:
                raise NotAVideoError(source, f"frames must all be uint8 of shape {shape}, got {frame.dtype} "
                                             f"{frame.shape}")
            yield frame if frame.ndim == 2 else np.clip(np.rint(frame @ GRAY_WEIGHTS), 0, 255).astype(np.uint8)

    return VideoReader(source, float(fps), _video_meta(None, [], shape[:2]), gray)


def read_video(path: str | os.PathLike, decode_threads: int = 0) -> Video:
    """Decode a whole video or DICOM cine file into grayscale frames; errors as ``open_video``."""
    with open_video(path, decode_threads) as reader:
        frames = np.stack(list(reader.frames()))
    return Video(frames, reader.fps, reader.source, {**reader.meta, "num_frames": len(frames)})


def iter_video_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The video and DICOM files among `paths`: files as given, folders searched recursively.

    In folders, a file counts when its extension is a known video/DICOM one, or when it has no extension
    and carries the DICOM marker (PACS exports name files IM0001 and the like). Hidden files and folders
    and DICOMDIR index files are skipped. Folder contents come sorted; duplicates are dropped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, None] = {}  # an ordered set
    for path in map(os.fspath, paths):
        if os.path.isfile(path):
            found[path] = None
        elif os.path.isdir(path):
            found.update(dict.fromkeys(_videos_under(path)))
        else:
            raise SourceNotFoundError(path, "no such file or folder")
    return list(found)


def _videos_under(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(".") and is_video_file_name(path):
                files.append(path)
    return sorted(files)


def is_video_file_name(path: str) -> bool:
    """Whether `path` names a file the readers take: a known video or DICOM suffix, or no suffix and the
    DICOM marker (the one rule for every folder walk: infer, check)."""
    extension = os.path.splitext(path)[1].lower()
    if extension in VIDEO_EXTENSIONS or extension in DICOM_EXTENSIONS:
        return True
    return extension == "" and os.path.basename(path).upper() != "DICOMDIR" and _has_dicom_magic(path)


def _has_dicom_magic(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(DICOM_MAGIC_OFFSET)
        return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC


def gray_frame(reformatter: VideoReformatter, frame: av.VideoFrame, **size: int) -> np.ndarray:
    """A decoded frame as (H, W) uint8 gray, as the paper's loader makes it: FFmpeg's RGB, then GRAY_WEIGHTS.

    Not FFmpeg's own gray (the Y plane, range-expanded): where compression leaves colour noise in dark or
    bright pixels, RGB clips and the two differ by up to 2 gray levels.
    """
    rgb = reformatter.reformat(frame, format="rgb24", **size).to_ndarray()
    return np.rint(rgb @ GRAY_WEIGHTS).astype(np.uint8)


def _check_size(path: str, num_frames: int, height: int, width: int) -> None:
    """Reject absurd sizes; 0 means the header does not say, and passes."""
    if height > MAX_SIDE or width > MAX_SIDE:
        raise AbsurdSizeError(path, f"frames of {height}x{width} pixels exceed {MAX_SIDE} pixels a side")
    if 0 < height < MIN_SIDE or 0 < width < MIN_SIDE:
        raise AbsurdSizeError(path, f"frames of {height}x{width} pixels are under {MIN_SIDE} pixels a side")
    if num_frames > MAX_FRAMES:
        raise AbsurdSizeError(path, f"{num_frames} frames exceed the limit of {MAX_FRAMES}")


def _video_meta(region: Region | None, notes: list[str], original_size: tuple[int, int],
                spacing: tuple[tuple[float, float], str] | None = None, **extra: Any) -> dict[str, Any]:
    spacing_cm, spacing_source = spacing or (None, None)
    return {"original_size": original_size, "region": region, "spacing_cm": spacing_cm,
            "spacing_source": spacing_source, "notes": notes, **extra}


# --- PyAV: video files, and MPEG cines inside DICOM ---

def _open_with_pyav(path: str, decode_threads: int) -> VideoReader:
    container = _open_container(path, path)
    try:
        stream = _video_stream(container, path)
        height, width = stream.codec_context.height, stream.codec_context.width
        _check_size(path, stream.frames, height, width)
    except BaseException:
        container.close()
        raise
    notes: list[str] = []
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate and rate > 0:
        fps = float(rate)
    else:
        fps = DEFAULT_FPS
        notes.append(f"the container states no frame rate; assumed {DEFAULT_FPS:g} fps")
    declared = _declared_frames(container, stream, fps)
    meta = _video_meta(None, notes, (height, width), codec=stream.codec_context.name)
    return VideoReader(path, fps, meta,
                       lambda: _gray_frames(container, stream, path, declared, decode_threads, notes),
                       container.close)


def _open_container(path: str, source: str | io.BytesIO) -> av.container.InputContainer:
    try:
        return av.open(source)
    except av.FFmpegError as e:
        raise NotAVideoError(path, f"not a video FFmpeg can read ({e.strerror})") from None


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    if not container.streams.video:
        raise NotAVideoError(path, "has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # the container names a codec this FFmpeg build has no decoder for
        raise UnsupportedCodecError(path, "the video codec has no decoder in this FFmpeg build")
    return stream


def _declared_frames(container: av.container.InputContainer, stream: av.VideoStream, fps: float) -> int:
    """How many frames the container says the stream holds; 0 when it does not say."""
    if stream.frames > 0:
        return stream.frames
    # Only when the video is the sole stream: a longer audio track would otherwise look like missing frames.
    if container.duration and len(container.streams) == 1:
        return round(container.duration / av.time_base * fps)
    return 0


def _gray_frames(container: av.container.InputContainer, stream: av.VideoStream, path: str,
                 declared_frames: int, decode_threads: int, notes: list[str]) -> Iterator[np.ndarray]:
    """Decode frame by frame to gray (H, W) uint8; the module's truncation rule is applied at the end."""
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = decode_threads
    # One reformatter for all frames: frame.to_ndarray(format=...) builds a new one per frame (4x slower).
    reformatter = VideoReformatter()
    decoded = container.decode(stream)
    count = 0
    size: dict[str, int] = {}
    error = None
    while True:
        try:
            frame = next(decoded, None)
        except av.FFmpegError as e:
            error = e.strerror or str(e)
            break
        if frame is None:
            break
        # Scale to the first frame's size so that a mid-stream resolution change cannot break the stack.
        size = size or {"width": frame.width, "height": frame.height}
        count += 1
        yield gray_frame(reformatter, frame, **size)
    if not count:
        raise NoFramesError(path, "no frame could be decoded" + (f" ({error})" if error else ""))
    missing = declared_frames - count
    if missing > max(TRUNCATION_SLACK, declared_frames // 100):
        stop = f"; the decoder stopped with: {error}" if error else ""
        raise TruncatedVideoError(path, f"file is cut short: decoded {count} of the {declared_frames} "
                                        f"frames the container declares{stop}")
    if error:
        notes.append(f"decoding stopped after {count} frames: {error}")


# --- pydicom ---

def _open_dicom(path: str) -> VideoReader:
    """The dataset is read whole (pydicom), its frames decoded one at a time."""
    return open_dicom_dataset(*_read_dicom_dataset(path), source=path)


def open_dicom_dataset(ds: pydicom.Dataset, notes: list[str] | None = None, source: str | None = None
                       ) -> VideoReader:
    """A DICOM cine already in memory (read by pydicom, or received over the network) as a VideoReader;
    `source` names it in messages (default: its SOPInstanceUID). A dataset without file meta gets the
    transfer syntax pydicom read it in written into its file meta (the decoders need it)."""
    path = source or f"DICOM {ds.get('SOPInstanceUID', '(no SOPInstanceUID)')}"
    notes = [] if notes is None else notes
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "PixelData" not in ds:
        raise NoPixelDataError(path, "DICOM file has no pixel data (a report or other non-image object)")
    undescribed = [keyword for keyword in PIXEL_DESCRIPTION if keyword not in ds]
    if undescribed:
        raise NotAVideoError(path, f"DICOM pixel data lacks {', '.join(undescribed)}")
    num_frames = int(ds.get("NumberOfFrames") or 1)
    height, width = int(ds.Rows), int(ds.Columns)
    _check_size(path, num_frames, height, width)
    if num_frames < 2:
        raise SingleFrameError(path, "single-frame DICOM: a still image, not a cine")

    fps, fps_notes = _dicom_fps(ds)
    notes += fps_notes
    region = _dicom_region(ds, height, width, notes)
    transfer_syntax = _transfer_syntax(ds)
    meta = _video_meta(region, notes, (height, width), _dicom_spacing(ds, region),
                       transfer_syntax=transfer_syntax.name)
    if transfer_syntax in MPEGTransferSyntaxes:
        return VideoReader(path, fps, meta, lambda: _dicom_mpeg_frames(ds, path, num_frames, notes))
    decode = _dicom_frame_decoder(ds, path, transfer_syntax, num_frames, notes)
    return VideoReader(path, fps, meta, decode)


def _read_dicom_dataset(path: str) -> tuple[pydicom.Dataset, list[str]]:
    """The dataset, and pydicom's warnings as notes (they are kept out of the user's terminal).

    A cut file: pydicom reads what is there and warns that the file ended inside an element, or, cut
    between elements before the pixel data, returns an image object without it. Both are TruncatedVideoError.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # force: also read files named .dcm that lack the 128-byte preamble and 'DICM' marker
            ds = pydicom.dcmread(path, force=True)
        except EOFError as e:
            raise TruncatedVideoError(path, f"DICOM file is cut short ({e})") from None
        except (InvalidDicomError, ValueError, OSError) as e:
            raise NotAVideoError(path, f"not a readable DICOM file ({e})") from None
    notes = [str(w.message).split(" in file ")[0] for w in caught]
    ended = [note for note in notes if "end of file" in note.lower()]
    if ended:
        raise TruncatedVideoError(path, f"DICOM file is cut short: {ended[0][0].lower()}{ended[0][1:]}")
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if "PixelData" not in ds and sop_class is not None and "Image" in UID(sop_class).name:
        raise TruncatedVideoError(path, f"DICOM file is cut short: it holds a {UID(sop_class).name} object "
                                        "but ends before the pixel data")
    if sop_class is None and "PixelData" not in ds:  # what force=True makes of a non-DICOM file
        raise NotAVideoError(path, "not a DICOM file (no DICOM marker and no DICOM elements)")
    return ds, notes


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The file's transfer syntax. A bare dataset (no file meta) is native pixel data in the encoding pydicom
    read it in; the decoders need that written into the file meta."""
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit_vr, little_endian = ds.original_encoding  # (None, None): built in memory, never encoded
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit_vr else
                                          ExplicitVRBigEndian if little_endian is False else ExplicitVRLittleEndian)
    return ds.file_meta.TransferSyntaxUID


def _dicom_fps(ds: pydicom.Dataset) -> tuple[float, list[str]]:
    """Frame rate from FrameTime (ms per frame), CineRate or RecommendedDisplayFrameRate, in that order."""
    frame_time = float(ds.get("FrameTime") or 0)
    if frame_time > 0:
        return 1000.0 / frame_time, []
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = float(ds.get(keyword) or 0)
        if rate > 0:
            return rate, []
    return DEFAULT_FPS, [f"no FrameTime, CineRate or RecommendedDisplayFrameRate; assumed {DEFAULT_FPS:g} fps"]


def _first_2d_region(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    """The first item of SequenceOfUltrasoundRegions that is a 2D image with its four corners."""
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        corners = ("RegionLocationMinY0", "RegionLocationMaxY1", "RegionLocationMinX0", "RegionLocationMaxX1")
        if region.get("RegionSpatialFormat") == REGION_SPATIAL_FORMAT_2D and all(k in region for k in corners):
            return region
    return None


def _dicom_region(ds: pydicom.Dataset, height: int, width: int, notes: list[str]) -> Region | None:
    """The first 2D region of SequenceOfUltrasoundRegions; None (with a note) when it does not fit the image.

    DICOM region corners are inclusive pixel coordinates; the returned box is half-open.
    """
    region = _first_2d_region(ds)
    if region is None:
        return None
    y0, y1 = int(region.RegionLocationMinY0), int(region.RegionLocationMaxY1) + 1
    x0, x1 = int(region.RegionLocationMinX0), int(region.RegionLocationMaxX1) + 1
    if 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width:
        return (y0, y1, x0, x1)
    # Seen in files that were resized after the scanner wrote the region: the box no longer means anything.
    notes.append(f"ultrasound region rows {y0}-{y1}, columns {x0}-{x1} lies outside the {height}x{width} "
                 f"image; ignored")
    return None


def _dicom_spacing(ds: pydicom.Dataset, region: Region | None) -> tuple[tuple[float, float], str] | None:
    """((dy, dx) in cm, source): the physical size of a pixel, where the file states it.

    The used 2D ultrasound region's PhysicalDeltaY/X when both are in cm (how scanners state it), else
    PixelSpacing (row, column spacing in mm). None when neither: areas stay in pixels. A region that does not
    fit the image (ignored by _dicom_region) gives no spacing either: the image was resized after it was written.
    """
    item = _first_2d_region(ds) if region is not None else None
    if item is not None:
        units = (item.get("PhysicalUnitsYDirection"), item.get("PhysicalUnitsXDirection"))
        deltas = (float(item.get("PhysicalDeltaY") or 0), float(item.get("PhysicalDeltaX") or 0))
        if units == (REGION_UNITS_CM, REGION_UNITS_CM) and all(d != 0 for d in deltas):
            return (abs(deltas[0]), abs(deltas[1])), "SequenceOfUltrasoundRegions PhysicalDeltaY/X"
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(s) > 0 for s in spacing):
        return (float(spacing[0]) / 10, float(spacing[1]) / 10), "PixelSpacing"
    return None


def _dicom_frame_decoder(ds: pydicom.Dataset, path: str, transfer_syntax: UID, num_frames: int,
                         notes: list[str]) -> Callable[[], Iterator[np.ndarray]]:
    """A generator function of the frames of native or compressed (non-MPEG) pixel data, after checking
    that they can be decoded here."""
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise UnsupportedCodecError(path, f"no decoder for transfer syntax {transfer_syntax.name}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise UnsupportedCodecError(path, f"transfer syntax {transfer_syntax.name} needs a decoder plugin: {needs}")
    photometric = ds.PhotometricInterpretation
    palette = photometric == "PALETTE COLOR"  # indices into colour tables (Doppler overlays of older carts)
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    # Pillow's libjpeg-turbo decodes baseline JPEG, the usual echo cine, about 4x faster than pylibjpeg.
    plugin = "pillow" if transfer_syntax == JPEGBaseline8Bit and "pillow" in decoder.available_plugins else ""
    # YBR stays YBR (as_rgb=False) because its Y already is the luma we want.
    as_rgb = photometric not in LUMA_FIRST_PHOTOMETRICS

    def frames() -> Iterator[np.ndarray]:
        pixels = iter_pixels(ds, as_rgb=as_rgb, decoding_plugin=plugin)
        for _ in range(num_frames):
            with warnings.catch_warnings(record=True) as caught:  # pydicom's warnings: notes, not terminal output
                warnings.simplefilter("always")
                try:
                    frame = next(pixels, None)
                except (ValueError, RuntimeError) as e:  # short pixel data, corrupt compressed frames
                    raise TruncatedVideoError(path, f"pixel data cannot be decoded (cut or corrupt): {e}") from None
            notes.extend(str(w.message) for w in caught)
            if frame is None:
                return
            yield _palette_gray(frame, ds) if palette else _gray_uint8(frame, photometric, bits_stored, signed)

    return frames


def _palette_gray(indices: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """A PALETTE COLOR frame through its colour lookup tables (pydicom's apply_color_lut), as (H, W) uint8 gray
    (GRAY_WEIGHTS, as RGB frames); 16-bit table entries are scaled onto 0..255."""
    rgb = apply_color_lut(indices, ds).astype(np.float32)
    if int(ds.RedPaletteColorLookupTableDescriptor[2]) > 8:
        rgb /= 257.0
    return np.clip(np.rint(rgb @ GRAY_WEIGHTS), 0, 255).astype(np.uint8)


def _gray_uint8(pixels: np.ndarray, photometric: str, bits_stored: int, signed: bool) -> np.ndarray:
    """One decoded DICOM frame as (H, W) uint8 gray, bright = echo-bright."""
    if pixels.ndim == 3:
        pixels = pixels[..., 0] if photometric in LUMA_FIRST_PHOTOMETRICS else pixels @ GRAY_WEIGHTS
    if pixels.dtype != np.uint8:
        levels = pixels.astype(np.float32)
        if signed:
            levels += 2 ** (bits_stored - 1)
        scaled = levels * (255.0 / (2**bits_stored - 1))  # the stored range onto 0..255
        pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return 255 - pixels if photometric == "MONOCHROME1" else pixels  # MONOCHROME1: 0 is white


def _dicom_mpeg_frames(ds: pydicom.Dataset, path: str, num_frames: int, notes: list[str]) -> Iterator[np.ndarray]:
    """MPEG-2/H.264/HEVC cines: the fragments of the single encapsulated item are one bitstream for FFmpeg."""
    bitstream = b"".join(pydicom.encaps.generate_fragments(ds.PixelData))
    with _open_container(path, io.BytesIO(bitstream)) as container:
        stream = _video_stream(container, path)
        yield from _gray_frames(container, stream, path, num_frames, 0, notes)
