"""How an INT8 export is calibrated: the defaults and the Calibration a caller passes to export_onnx. Light
(no onnx, no torch), so the CLI reads its defaults from here without importing the export layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from evim3.runtime.errors import ModelFileError

CALIBRATION_SPLIT = "TRAIN"  # never the TEST videos that evaluation reports on
CALIBRATION_VIDEOS = 64  # videos whose first clip calibrates (a clip is T frames: thousands of frames in all)
CALIBRATION_SEED = 0  # which TRAIN videos: a seeded sample, the same set on every machine
# Chosen by measurement (python -m benchmarks int8, BENCHMARKS.md): on the demo's evim3-tiny (600 steps, seed
# 0), 40 TEST clips against PyTorch fp32, max / mean |dEF|: minmax 0.31 / 0.091, entropy the same (ONNX
# Runtime 1.32's entropy calibrator returned the same ranges for these symmetric activations), percentile
# (99.999) 0.48 / 0.131: clipping the rare large activations costs more than the coarser steps.
CALIBRATION_METHOD = "minmax"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Calibration:
    """Where an INT8 export gets its activation ranges: the table file if it exists (no data needed), else
    the first clip of up to `videos` seeded TRAIN videos of `data` (or, from Python, `clips`: preprocessed
    (N, 1, T, S, S) float32 clips), and then the table is written."""

    table: str
    data: str | None = None
    videos: int = CALIBRATION_VIDEOS
    method: str = CALIBRATION_METHOD
    clips: Any = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.videos < 1:
            raise ValueError(f"calibration videos must be >= 1, got {self.videos}")
        if self.data is None and self.clips is None and not os.path.isfile(self.table):
            raise ModelFileError(self.table, "no calibration table here: give a dataset folder to calibrate on "
                                             "(--calib-data DATA)")


def table_path_for(output: str | os.PathLike) -> str:
    """The default calibration table beside an exported file: X.int8.onnx -> X.int8.calib.json."""
    return os.path.splitext(os.fspath(output))[0] + ".calib.json"
