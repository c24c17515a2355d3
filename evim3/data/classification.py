"""Video classification from a CSV of (path, label, split): views, pathologies, anything with class labels.

Same pixel path, clip sampling and augmentation as EchoNetDataset (``evim3.data.echonet.ClipDataset``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from evim3.data import CROP_PAD
from evim3.data.echonet import ClipDataset, Clips, check_files_exist, select_rows
from evim3.data.tables import read_csv_table
from evim3.runtime.errors import DatasetError
from evim3.runtime.meta import PreprocessSpec

CLASSIFICATION_COLUMNS = ("path", "label", "split")


class VideoClassificationDataset(ClipDataset):
    """Videos listed in a CSV with columns path, label, split; paths are relative to the CSV's folder.

    Class names are the sorted distinct labels over every split, so the indices agree between the TRAIN,
    VAL and TEST datasets of one CSV. `split` (any case, or ALL), `clips`, `pad` (TRAIN only), `keep_ratio`,
    `max_videos`, `stride`, `cache` and `substitute_unreadable` are as for EchoNetDataset. Items are dicts: x,
    label (int64 class index), file (the CSV's path), starts and unreadable (see ClipDataset).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        split: str,
        spec: PreprocessSpec,
        *,
        clips: Clips = "random",
        pad: int = CROP_PAD,
        keep_ratio: float = 1.0,
        max_videos: int | None = None,
        stride: int | None = None,
        cache: bool = False,
        substitute_unreadable: bool = False,
    ):
        csv_path = os.fspath(csv_path)
        rows = read_csv_table(csv_path, CLASSIFICATION_COLUMNS)
        self.class_names = sorted({row["label"] for row in rows})
        self.rows = select_rows(rows, split, "split", keep_ratio, max_videos)
        if not self.rows:
            raise DatasetError(csv_path, f"no {split.upper()} rows")
        folder = os.path.dirname(os.path.abspath(csv_path))
        paths = [os.path.join(folder, row["path"]) for row in self.rows]
        check_files_exist(paths, csv_path)
        super().__init__(paths, spec, split=split, clips=clips, pad=pad, stride=stride, cache=cache,
                         substitute_unreadable=substitute_unreadable)
        self.files = [row["path"] for row in self.rows]
        class_index = {name: index for index, name in enumerate(self.class_names)}
        self.labels = np.array([class_index[row["label"]] for row in self.rows], dtype=np.int64)

    def load_item(self, index: int) -> dict:
        x, starts = self.load_clips(index)
        return {"x": x, "label": torch.tensor(self.labels[index]), "file": self.files[index], "starts": starts}
