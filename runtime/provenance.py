"""Where a result's frames came from: the source, the frames used, the crop and the resize that made the model's
frames, and the maps back from model frames to source frames and from model pixels to source pixels.

A program that draws a seg model's LV contour on the source frames, or reports an ED frame in the source's
own numbering (a DICOM frame number), needs exactly these; they are the inverse of evim3.runtime.preprocess
(``resample_indices``, ``preprocessed_points``), computed here and nowhere else. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import resample_indices, resized_spacing, square_resize_geometry
from evim3.runtime.video import Region


@dataclass
class Provenance:
    """One source as the model saw it."""

    source: str  # file path, stream URL, or a name given to a dataset / frames
    fps: float  # the source's frame rate
    num_frames: int  # source frames decoded (a live source: so far)
    region: Region | None  # (y0, y1, x0, x1) of the source frame the model saw (half-open), None before any frame
    spec: PreprocessSpec  # the model's preprocessing: size, fps
    model_frames: int = 0  # frames of the video resampled to spec.fps (model frame numbers 0 ..)
    spacing_cm: tuple[float, float] | None = None  # (dy, dx) of a source pixel in cm, where the file states it
    spacing_source: str | None = None
    notes: list[str] = field(default_factory=list)  # the reader's notes: defaults assumed, damage tolerated

    @property
    def crop_box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) in source pixels, half-open: what was cropped before resizing."""
        if self.region is None:
            return None
        y0, y1, x0, x1 = self.region
        return x0, y0, x1, y1

    @property
    def resized_to(self) -> tuple[int, int] | None:
        """(height, width) the crop was resized to; it sits centred in the model's size x size frame."""
        if self.region is None:
            return None
        y0, y1, x0, x1 = self.region
        return square_resize_geometry(y1 - y0, x1 - x0, self.spec.size)[:2]

    @property
    def model_spacing_cm(self) -> tuple[float, float] | None:
        """(dy, dx) of a model pixel in cm, where the source states its own."""
        if self.spacing_cm is None or self.region is None:
            return None
        return resized_spacing(self.spacing_cm, self.region, self.spec.size)

    def source_frames(self) -> np.ndarray:
        """For each model frame, the index of the source frame it was made from (preprocess.resample_indices)."""
        return resample_indices(self.num_frames, self.fps, self.spec.fps)[:self.model_frames]

    def source_frame(self, model_frame: int) -> int:
        """The source frame (0-based) model frame `model_frame` was made from."""
        return int(self.source_frames()[model_frame])

    def source_time(self, model_frame: int) -> float:
        """Seconds from the source's start of the frame model frame `model_frame` was made from."""
        return self.source_frame(model_frame) / self.fps

    def to_source_xy(self, points: np.ndarray) -> np.ndarray:
        """(P, 2) x, y in model pixels (centres at integers) -> the same points in source pixels: the inverse
        of preprocess.preprocessed_points (undo the centring pad, the resize, the crop)."""
        if self.region is None:
            raise ValueError(f"{self.source}: no frame was preprocessed, so there is no crop to map through")
        y0, y1, x0, x1 = self.region
        height, width, top, left = square_resize_geometry(y1 - y0, x1 - x0, self.spec.size)
        scale = np.array([width / (x1 - x0), height / (y1 - y0)])
        return (np.asarray(points, np.float64) - [left, top] + 0.5) / scale - 0.5 + [x0, y0]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "fps": self.fps, "num_frames": self.num_frames,
                "model_fps": self.spec.fps, "model_frames": self.model_frames, "model_size": self.spec.size,
                "crop_box": None if self.crop_box is None else list(self.crop_box),
                "resized_to": None if self.resized_to is None else list(self.resized_to),
                "pixel_spacing_cm": None if self.spacing_cm is None else list(self.spacing_cm),
                "pixel_spacing_source": self.spacing_source,
                "source_frames": self.source_frames().tolist() if self.num_frames else [],
                "notes": list(self.notes)}
