"""Normalisation constants: pixel mean and standard deviation over a sample of training videos."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from evim3.data.echonet import EchoNetDataset
from evim3.runtime.errors import DatasetError, EchoInputError
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import video_to_input
from evim3.runtime.video import read_video


def compute_mean_std(
    dataset_root_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    spec: PreprocessSpec,
    num_videos: int = 128,
    seed: int = 0,
    on_unreadable: Callable[[str], None] | None = None,
) -> tuple[float, float]:
    """Mean and standard deviation of pixels (0..255) as the model would see them before normalisation:
    after `spec`'s crop, resize and resampling, with `spec.mean` and `spec.std` ignored.

    Computed over up to `num_videos` videos drawn at random (by `seed`) from an EchoNet-layout folder's
    TRAIN split, or from a list of video files. The result goes into a PreprocessSpec's mean and std.
    A video that cannot be decoded raises its EchoInputError, or with `on_unreadable` is passed to it (as
    "path: problem") and left out.
    """
    if isinstance(dataset_root_or_paths, (str, os.PathLike)):
        root = os.fspath(dataset_root_or_paths)
        if not os.path.isdir(root):
            raise DatasetError(root, "not a folder: pass an EchoNet-layout folder or a list of video files")
        paths = EchoNetDataset(root, "TRAIN", spec, drop_untraced=False).paths
    else:
        paths = [os.fspath(path) for path in dataset_root_or_paths]
    if not paths:
        raise ValueError("no videos to compute the mean and std from")

    chosen = np.random.default_rng(seed).choice(len(paths), min(num_videos, len(paths)), replace=False)
    unnormalised = dataclasses.replace(spec, mean=0.0, std=1.0)
    total = total_squares = count = 0.0
    for index in sorted(chosen):
        try:
            frames = video_to_input(read_video(paths[index]), unnormalised).astype(np.float64)
        except EchoInputError as e:
            if on_unreadable is None:
                raise
            on_unreadable(str(e))
            continue
        total += frames.sum()
        total_squares += np.square(frames).sum()
        count += frames.size
    if not count:
        raise DatasetError(os.path.dirname(paths[0]), f"none of the {len(chosen)} videos sampled for the "
                                                      "normalisation can be decoded")
    mean = total / count
    return float(mean), float(math.sqrt(max(total_squares / count - mean**2, 0.0)))
