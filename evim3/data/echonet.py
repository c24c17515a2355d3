"""EchoNet-Dynamic (or the synthetic dataset in its layout) as model input for EF regression.

``ClipDataset`` is the pixel path every evim3 dataset shares: decode with ``evim3.runtime.video.read_video``,
one ``evim3.runtime.preprocess.video_to_uint8`` call (crop, resize, resample: the code the edge runtime
runs), then clips cut with ``sample_clip_indices`` and normalised. So a dataset item and the inference path agree
exactly for the same file and clip start. ``EchoNetDataset`` adds the EchoNet files and the EF labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from evim3.data import CROP_PAD
from evim3.data.tables import (
    MIN_TRACED_FRAMES,
    SHOWN,
    check_ef_labels,
    number,
    read_csv_table,
    traced_frame_counts,
    video_name,
)
from evim3.runtime.echonet_layout import FILELIST_COLUMNS, FILELIST_NAME, TRACINGS_NAME, VIDEOS_DIR
from evim3.runtime.errors import DatasetError, EchoInputError
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import normalise, sample_clip_indices, sliding_clip_starts, video_to_uint8
from evim3.runtime.video import read_video

# "random": one clip at a random start; "first": one clip from frame 0; k: k clips, evenly spaced starts;
# "all": the sliding clips the inference path runs (every `stride` resampled frames).
Clips = Literal["random", "first", "all"] | int
SPLIT_NAMES = ("TRAIN", "VAL", "TEST", "ALL")


def check_files_exist(paths: Sequence[str], listed_in: str) -> None:
    """One DatasetError naming how many of `paths` are missing, and the first few."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(os.path.basename(path) for path in missing[:SHOWN])
        more = ", ..." if len(missing) > SHOWN else ""
        raise DatasetError(listed_in, f"{len(missing)} of {len(paths)} listed videos are missing: {shown}{more}")


def select_rows(
    rows: list[dict[str, str]], split: str, split_column: str, keep_ratio: float, max_videos: int | None
) -> list[dict[str, str]]:
    """The rows of one split (any case; "ALL" keeps every row), then the first `keep_ratio` of them in file
    order (the paper's reduced-label runs), then at most `max_videos`."""
    if split.upper() not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLIT_NAMES)}, any case)")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if split.upper() != "ALL":
        rows = [row for row in rows if row[split_column].upper() == split.upper()]
    rows = rows[: max(1, round(len(rows) * keep_ratio))]
    return rows if max_videos is None else rows[:max_videos]


class ClipDataset(Dataset):
    """Videos as model input clips; subclasses add labels to `load_clips`.

    One clip ("random", "first") is x of shape (1, frames, size, size); several (k, "all") are
    (clips, 1, frames, size, size), with "all" varying per video (use batch size 1). In the TRAIN split
    each item is zero-padded by `pad` pixels on every side and randomly cropped back to size (the same
    crop for all frames and clips); zero is the normalised mean pixel, as in EchoNet's training code.

    `cache` keeps each video, once decoded and preprocessed, in memory as uint8 (T x size x size bytes: 2.2 MB
    for a 175-frame 112x112 video) so later epochs skip decoding; ``preload`` fills it before DataLoader
    workers fork, which then share it.

    Items (subclasses' ``load_item``) also hold "unreadable": "" or, with `substitute_unreadable`, the error of
    a video that could not be decoded, whose item is then the next decodable video's (same random draws).
    Substituting in the dataset keeps every batch full, so DDP ranks and gradient accumulation stay in step,
    and works alike in DataLoader workers, where only the batch reaches the training process: its
    "unreadable" entries are how the run learns of, warns about and counts the bad videos (or stops, --strict).
    Without `substitute_unreadable` the decoding error is raised (evaluation).
    """

    def __init__(
        self, paths: Sequence[str], spec: PreprocessSpec, *, split: str, clips: Clips, pad: int, stride: int | None,
        cache: bool = False, substitute_unreadable: bool = False,
    ):
        if not (clips in ("random", "first", "all") or (type(clips) is int and clips >= 1)):
            raise ValueError(f"clips must be 'random', 'first', 'all' or a positive number, got {clips!r}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.paths = list(paths)
        self.spec = spec
        self.clips = clips
        self.pad = pad if split.upper() == "TRAIN" else 0
        # The inference pipeline's default stride, so "all" means the clips `evim3 infer` runs.
        self.stride = stride or spec.default_stride
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.substitute_unreadable = substitute_unreadable
        self.unreadable: dict[int, EchoInputError] = {}  # this process's failures, so each is decoded once

    def __len__(self) -> int:
        return len(self.paths)

    def load_item(self, index: int) -> dict:
        """Item `index` as the subclass defines it (x, labels, file, starts)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")  # also ends `for item in dataset`
        index %= len(self)
        unreadable = ""
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                item = self.load_item(candidate)
            except EchoInputError as e:
                if not self.substitute_unreadable:
                    raise
                unreadable = unreadable or str(e)
                continue
            return {**item, "unreadable": unreadable}
        raise DatasetError(os.path.dirname(self.paths[0]), f"none of the {len(self)} videos can be decoded "
                                                           f"(the first: {unreadable})")

    def clip_starts(self, num_frames: int) -> list[int]:
        """Start frames (in the resampled video) of the clips one item holds."""
        last_start = max(0, num_frames - self.spec.clip_span)
        if self.clips == "first":
            return [0]
        if self.clips == "random":
            return [int(torch.randint(last_start + 1, ()))]  # torch's RNG: seeded per DataLoader worker
        if self.clips == "all":
            return sliding_clip_starts(num_frames, self.spec, self.stride)
        return np.linspace(0, last_start, self.clips).round().astype(int).tolist()

    def video(self, index: int) -> np.ndarray:
        """The item's video preprocessed up to the normalisation: uint8 (T', size, size)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        if index in self.unreadable:
            raise self.unreadable[index]
        try:
            frames = self.decode(index)
        except EchoInputError as e:
            self.unreadable[index] = e
            raise
        if self.cache is not None:
            self.cache[index] = frames
        return frames

    def decode(self, index: int) -> np.ndarray:
        """Read and preprocess the item's video (no cache): uint8 (T', size, size)."""
        return video_to_uint8(read_video(self.paths[index]), self.spec)

    def preload(self) -> int:
        """Decode every video into the cache (which must be on) now; returns the cache's size in bytes.
        With `substitute_unreadable`, a video that cannot be decoded is left out (see `unreadable`)."""
        if self.cache is None:
            raise RuntimeError("this dataset was made without cache=True")
        for index in range(len(self)):
            try:
                self.video(index)
            except EchoInputError:
                if not self.substitute_unreadable:
                    raise
        return sum(frames.nbytes for frames in self.cache.values())

    def load_clips(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The item's input x and its clip starts (resampled frames)."""
        frames = self.video(index)
        starts = self.clip_starts(len(frames))
        clips = normalise(np.stack([frames[sample_clip_indices(len(frames), self.spec, start)] for start in starts]),
                          self.spec)
        x = torch.from_numpy(clips).unsqueeze(1)  # (clips, 1, frames, size, size)
        if self.pad:
            (x,) = self._pad_and_crop(x)
        return (x[0] if self.clips in ("random", "first") else x), torch.tensor(starts)

    def _pad_and_crop(self, *images: torch.Tensor) -> list[torch.Tensor]:
        """Each of `images` (..., size, size) zero-padded by `pad` and cropped back at one random offset."""
        size = self.spec.size
        top, left = torch.randint(2 * self.pad + 1, (2,)).tolist()
        return [F.pad(image, (self.pad,) * 4)[..., top : top + size, left : left + size].contiguous()
                for image in images]


class EchoNetDataset(ClipDataset):
    """EF regression on an EchoNet-Dynamic-layout folder (FileList.csv, VolumeTracings.csv, Videos/).

    `split` is TRAIN, VAL, TEST or ALL. Padding augmentation (`pad`, 0 for none) applies to TRAIN only.
    `drop_untraced` drops videos with fewer than two traced frames in VolumeTracings.csv and `keep_ratio`
    keeps the first share of the split's rows in file order, both as the paper; `max_videos` caps the
    count; `cache` and `substitute_unreadable` are ClipDataset's. `ef_mean` is the mean EF of the TRAIN rows
    chosen by the same rules, whatever `split` is: the constant a model's output is centred on; `ef_std`
    (their spread; 1.0 for fewer than two) its unit. The EF of every row used (this split's and those TRAIN
    rows) must be a number from 0 to 100, else a DatasetError names the rows. Items are dicts: x (see
    ClipDataset), ef, edv, esv (float tensors; NaN for a missing volume), file (FileList name), starts (clip
    starts, resampled frames) and unreadable (see ClipDataset).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        spec: PreprocessSpec,
        *,
        clips: Clips = "random",
        pad: int = CROP_PAD,
        keep_ratio: float = 1.0,
        drop_untraced: bool = True,
        max_videos: int | None = None,
        stride: int | None = None,
        cache: bool = False,
        substitute_unreadable: bool = False,
    ):
        root = os.fspath(root)
        filelist = os.path.join(root, FILELIST_NAME)
        if not os.path.isfile(filelist):
            raise DatasetError(root, f"no {FILELIST_NAME}: not an EchoNet-Dynamic folder (`evim3 data synth` makes one)")
        rows = read_csv_table(filelist, FILELIST_COLUMNS)
        if drop_untraced:
            traced = traced_frame_counts(os.path.join(root, TRACINGS_NAME))
            rows = [row for row in rows if traced.get(video_name(row["FileName"]), 0) >= MIN_TRACED_FRAMES]

        train_rows = select_rows(rows, "TRAIN", "Split", keep_ratio, max_videos)
        self.rows = select_rows(rows, split, "Split", keep_ratio, max_videos)
        # Before any video is read: a NaN EF would otherwise surface as a NaN loss at the first step.
        check_ef_labels(list({id(row): row for row in [*train_rows, *self.rows]}.values()), filelist)
        train_ef = np.array([float(row["EF"]) for row in train_rows])
        self.ef_mean = float(train_ef.mean()) if len(train_ef) else float("nan")
        self.ef_std = float(train_ef.std()) if len(train_ef) > 1 and train_ef.std() > 0 else 1.0
        if not self.rows:
            raise DatasetError(filelist, f"no {split.upper()} videos" + (" with tracings" if drop_untraced else ""))
        paths = [os.path.join(root, VIDEOS_DIR, video_name(row["FileName"])) for row in self.rows]
        check_files_exist(paths, os.path.join(root, VIDEOS_DIR))
        super().__init__(paths, spec, split=split, clips=clips, pad=pad, stride=stride, cache=cache,
                         substitute_unreadable=substitute_unreadable)
        self.files = [row["FileName"] for row in self.rows]
        self.ef = np.array([float(row["EF"]) for row in self.rows], dtype=np.float32)
        # Parsed here, not in a loader worker: volumes are carried along, not trained on, so unusable ones
        # become NaN (`evim3 data check` reports them).
        self.volumes = np.array([[number(row["EDV"]), number(row["ESV"])] for row in self.rows], dtype=np.float32)

    def load_item(self, index: int) -> dict:
        x, starts = self.load_clips(index)
        return {
            "x": x,
            "ef": torch.tensor(self.ef[index]),
            "edv": torch.tensor(self.volumes[index, 0]),
            "esv": torch.tensor(self.volumes[index, 1]),
            "file": self.files[index],
            "starts": starts,
        }
