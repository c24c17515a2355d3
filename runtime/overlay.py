"""`evim3 infer --overlay`: the video a seg model saw, with the LV it found drawn on every frame.

The frames are the model's own (cropped, resized to its size, resampled to its fps), scaled up OVERLAY_SCALE
times so the contour is visible: what the masks were computed on, pixel for pixel. Written atomically with
PyAV (H.264 where this FFmpeg has an encoder for it, else MPEG-4 Part 2).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
from evim3.runtime.atomic import atomic_path
from evim3.runtime.seg import LVReport, contour, largest_component
from PIL import Image, ImageDraw

OVERLAY_SCALE = 4  # output pixels per model pixel
CONTOUR_RGB = (0, 230, 0)  # the LV of an ordinary frame
ED_RGB = (255, 60, 60)  # the LV at end-diastole ...
ES_RGB = (60, 160, 255)  # ... and at end-systole of a beat
TEXT_RGB = (255, 255, 0)
CODECS = ("libx264", "mpeg4")  # first that this FFmpeg build can encode
EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi")  # containers that take both codecs


def check_overlay_path(path: str) -> None:
    """Refuse, before any work, a file name whose container the overlay cannot be written in."""
    if os.path.splitext(path)[1].lower() not in EXTENSIONS:
        raise ValueError(f"{path}: --overlay writes {', '.join(EXTENSIONS)} files")


def write_overlay(path: str | os.PathLike, frames: list[np.ndarray], masks: list[np.ndarray | None],
                  report: LVReport) -> None:
    """Frames (size, size) uint8 at report.fps with the contour of each frame's LV (the largest region of its
    mask), coloured at ED and ES, and a caption: time, beat and EF. Frames no clip covered say so."""
    roles = {b.ed_frame: (ED_RGB, f"ED beat {k}") for k, b in enumerate(report.beats, 1)}
    roles.update({b.es_frame: (ES_RGB, f"ES beat {k}: EF {b.ef:.1f} %") for k, b in enumerate(report.beats, 1)})
    codec = next(c for c in CODECS if c in av.codecs_available)
    with atomic_path(path) as tmp, av.open(tmp, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(report.fps).limit_denominator(1001))
        stream.height, stream.width = (OVERLAY_SCALE * side for side in frames[0].shape)
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}  # visually lossless: the contour must not smear into the blocks
        for index, frame in enumerate(frames):
            mask = masks[index] if index < len(masks) else None
            picture = _draw(frame, mask, *roles.get(index, (CONTOUR_RGB, "")), index / report.fps)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


def _draw(frame: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int], role: str,
          time_s: float) -> np.ndarray:
    """One overlay frame (RGB, scaled): the contour two output pixels wide, inside the LV's border."""
    scaled = np.kron(frame, np.ones((OVERLAY_SCALE, OVERLAY_SCALE), np.uint8))
    picture = np.repeat(scaled[..., None], 3, axis=2)
    if mask is not None:
        lv = np.kron(largest_component(mask), np.ones((OVERLAY_SCALE, OVERLAY_SCALE), bool))
        border = contour(lv)
        picture[border | contour(lv & ~border)] = colour
    caption = f"{time_s:6.2f} s  {role if mask is not None else 'no mask: no clip covered this frame'}"
    image = Image.fromarray(picture)
    ImageDraw.Draw(image).text((4, 2), caption, fill=TEXT_RGB)
    return np.asarray(image)
