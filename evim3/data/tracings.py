"""LV masks from EchoNet's VolumeTracings.csv, at the geometry of the preprocessed video. Torch-free.

A traced frame is a list of segments (X1, Y1, X2, Y2): the first is the long axis (apex to the middle of
the mitral plane), the others are chords across the cavity. The cavity outline is, as EchoNet-Dynamic's
own loader draws it, the polygon through the X1 ends of the chords, then the X2 ends in reverse order.
Here the polygon's vertices are first carried through the preprocessing (crop to the ultrasound region,
``square_resize``; ``evim3.runtime.preprocess.preprocessed_points``) and then filled at the model's size,
so the mask covers the pixels the network sees, and traced frames are found again after resampling to the
model's fps (``resampled_frame``).

Which traced frame is end-diastole: the one whose polygon is larger (EchoNet lists the smaller, systolic,
tracing first; the area decides whatever the order of a file).
"""

from __future__ import annotations

import os

import numpy as np

from evim3.data.tables import read_csv_table
from evim3.runtime.echonet_layout import TRACING_COLUMNS, video_name
from evim3.runtime.errors import DatasetError
from evim3.runtime.preprocess import preprocessed_points, resample_indices
from evim3.runtime.video import Region

Tracings = dict[int, np.ndarray]  # {source frame: (segments, 4) X1, Y1, X2, Y2; the long axis first}
MIN_SEGMENTS = 3  # the long axis and two chords: the least that outlines an area


def read_tracings(path: str | os.PathLike) -> dict[str, Tracings]:
    """{video file name (with .avi): {frame: (segments, 4)}} from VolumeTracings.csv, rows in file order."""
    path = os.fspath(path)
    traced: dict[str, dict[int, list[list[float]]]] = {}
    for line, row in enumerate(read_csv_table(path, TRACING_COLUMNS), start=2):
        try:
            frame = int(row["Frame"])
            values = [float(row[key]) for key in ("X1", "Y1", "X2", "Y2")]
        except (TypeError, ValueError):
            raise DatasetError(path, f"line {line}: Frame, X1, Y1, X2, Y2 must be numbers") from None
        traced.setdefault(video_name(row["FileName"]), {}).setdefault(frame, []).append(values)
    return {name: {frame: np.array(rows, np.float64) for frame, rows in frames.items()}
            for name, frames in traced.items()}


def chord_polygon(segments: np.ndarray) -> np.ndarray:
    """(segments, 4) -> (P, 2) x, y vertices of the cavity outline: X1 ends of the chords, then X2 ends
    reversed (the first segment, the long axis, is not part of it)."""
    chords = np.asarray(segments, np.float64)[1:]
    return np.concatenate([chords[:, :2], chords[::-1, 2:]])


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (P, 2)."""
    x, y = points[:, 0], points[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def fill_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centre (integer x, y) lies inside the polygon (even-odd rule).

    skimage.draw.polygon, which EchoNet uses, tests the same centres after rounding the vertices to whole
    pixels; here the vertices stay where the preprocessing put them.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = np.zeros((height, width), bool)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if ay == by:
            continue  # a horizontal edge crosses no row between its ends
        crosses = (ay > ys) != (by > ys)
        x_at_row = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < x_at_row)
    return inside


def traced_mask(segments: np.ndarray, region: Region, size: int) -> np.ndarray:
    """(size, size) bool: the LV of one traced frame in the preprocessed frame of a video whose ultrasound
    region is `region` (y0, y1, x0, x1 in its source frames)."""
    if len(segments) < MIN_SEGMENTS:
        raise ValueError(f"a tracing needs the long axis and at least 2 chords, got {len(segments)} segments")
    return fill_polygon(preprocessed_points(chord_polygon(segments), region, size), size, size)


def ed_es_frames(tracings: Tracings) -> tuple[int, int]:
    """(ED, ES) source frames of a video's tracings: the traced frames with the largest and the smallest
    cavity polygon, whatever the order of the rows."""
    if len(tracings) < 2:
        raise ValueError(f"need two traced frames (ED and ES), got {len(tracings)}")
    areas = {frame: polygon_area(chord_polygon(segments)) for frame, segments in tracings.items()}
    return max(areas, key=areas.get), min(areas, key=areas.get)


def resampled_frame(frame: int, num_frames: int, fps: float, target_fps: float) -> int:
    """The frame of the video resampled to `target_fps` (``resample_indices``) that shows source `frame`,
    or, when resampling dropped it, the one showing the source frame nearest to it."""
    shown = resample_indices(num_frames, fps, target_fps)
    return int(np.argmin(np.abs(shown - frame)))
