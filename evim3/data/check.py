"""`evim3 data check`: everything in an EchoNet-Dynamic-layout folder that would drop a video from
training or stop a run, found before training. Torch-free (numpy, PyAV, pydicom)."""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from evim3.data.tables import (
    MIN_TRACED_FRAMES,
    ef_problem,
    read_csv_table,
    traced_frame_counts,
    video_name,
    volume_problems,
)
from evim3.runtime.echonet_layout import FILELIST_COLUMNS, FILELIST_NAME, SPLITS, TRACINGS_NAME, VIDEOS_DIR
from evim3.runtime.errors import DatasetError, EchoInputError
from evim3.runtime.video import read_video


class Problem(NamedTuple):
    file: str  # the FileList name, or the table the problem is in
    problem: str


class CheckReport(NamedTuple):
    videos: int  # FileList rows checked
    problems: list[Problem]


def check_dataset(root: str | os.PathLike, *, workers: int = 1,
                  progress: Callable[[], None] | None = None) -> CheckReport:
    """Every FileList row of `root`: its video present and decodable, EF a number from 0 to 100, ESV and EDV
    positive with ESV < EDV, a known split, listed once, and at least two traced frames in VolumeTracings.csv.

    Videos are decoded in `workers` processes (spawned: a script calling this with workers > 1 needs the
    ``if __name__ == "__main__":`` guard); `progress` is called once per decoded video. A folder without a
    readable FileList.csv is a DatasetError, not a problem row."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(root, "not a folder (expected an EchoNet-Dynamic-layout dataset)")
    filelist = os.path.join(root, FILELIST_NAME)
    if not os.path.isfile(filelist):
        raise DatasetError(root, f"no {FILELIST_NAME}: not an EchoNet-Dynamic folder (`evim3 data synth` makes one)")
    rows = read_csv_table(filelist, FILELIST_COLUMNS)

    problems: list[Problem] = []
    try:
        traced: dict[str, int] | None = traced_frame_counts(os.path.join(root, TRACINGS_NAME))
    except DatasetError as e:
        traced = None
        problems.append(Problem(TRACINGS_NAME, e.problem))
    listed = collections.Counter(video_name(row["FileName"]) for row in rows)

    to_decode = []
    for row in rows:
        name = row["FileName"]
        found = [ef_problem(row["EF"]), *volume_problems(row["ESV"], row["EDV"])]
        if row["Split"].upper() not in SPLITS:
            found.append(f"split {row['Split']!r} is not one of {', '.join(SPLITS)}")
        if listed[video_name(name)] > 1:
            found.append(f"listed {listed[video_name(name)]} times in {FILELIST_NAME}")
        if traced is not None and (count := traced.get(video_name(name), 0)) < MIN_TRACED_FRAMES:
            found.append(f"{count} traced frame{'s' * (count != 1)} in {TRACINGS_NAME} (EF training needs "
                         f"{MIN_TRACED_FRAMES}: it drops this video)")
        path = os.path.join(root, VIDEOS_DIR, video_name(name))
        if os.path.isfile(path):
            to_decode.append((name, path))
        else:
            found.append(f"video file {os.path.join(VIDEOS_DIR, video_name(name))} is missing")
        problems += [Problem(name, problem) for problem in found if problem]

    for name, problem in _decode_all(to_decode, workers):
        if problem:
            problems.append(Problem(name, problem))
        if progress:
            progress()
    order = {row["FileName"]: index for index, row in enumerate(rows)}
    problems.sort(key=lambda p: order.get(p.file, -1))  # table-level problems first, then in file order
    return CheckReport(len(rows), problems)


def _decode_all(videos: list[tuple[str, str]], workers: int) -> Iterator[tuple[str, str | None]]:
    if workers <= 1 or len(videos) <= 1:
        yield from map(_decode, videos)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_decode, videos, chunksize=4)


def _decode(video: tuple[str, str]) -> tuple[str, str | None]:
    """(name, why the video cannot be decoded, or None): the same reader training and `evim3 infer` use."""
    name, path = video
    try:
        read_video(path)
    except EchoInputError as e:
        return name, f"cannot be decoded: {e.problem}"
    return name, None
