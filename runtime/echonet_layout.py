"""The EchoNet-Dynamic folder layout, defined once: the generator (evim3.data.synth) writes it, the datasets
and `evim3 data check` read it, and `evim3 check --data` takes its TEST videos from it. Pure Python.

    DATA/FileList.csv        FILELIST_COLUMNS, one row per video (Split: one of SPLITS)
    DATA/VolumeTracings.csv  TRACING_COLUMNS, the traced ED/ES frames
    DATA/Videos/<FileName>.avi
    DATA/Masks/<name>.npz    synthetic datasets only (not EchoNet's): the LV of every frame
"""

from __future__ import annotations

import os

FILELIST_NAME = "FileList.csv"
TRACINGS_NAME = "VolumeTracings.csv"
VIDEOS_DIR = "Videos"
# Not part of EchoNet's layout: the generator's per-frame LV truth, (T, H, W) bool at the video's own geometry.
MASKS_DIR = "Masks"
FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split")
TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
SPLITS = ("TRAIN", "VAL", "TEST")


def video_name(file_name: str) -> str:
    """FileList names come with or without .avi, depending on the EchoNet release; the files have it."""
    return file_name if os.path.splitext(file_name)[1] else file_name + ".avi"


def video_path(root: str | os.PathLike, file_name: str) -> str:
    """The video file of a FileList name."""
    return os.path.join(os.fspath(root), VIDEOS_DIR, video_name(file_name))
