"""The tables of an EchoNet-Dynamic-layout folder and the rules its labels obey. Torch-free: shared by the
datasets (``evim3.data.echonet``) and ``evim3 data check``, which runs without torch.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

from evim3.runtime.echonet_layout import TRACING_COLUMNS, video_name
from evim3.runtime.errors import DatasetError

EF_RANGE = (0.0, 100.0)  # percent
MIN_TRACED_FRAMES = 2  # ED and ES: videos with fewer are dropped from EF training, as in the paper
SHOWN = 5  # offending rows or files named in a one-line error


def read_csv_table(path: str, required_columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; a missing file or a header without `required_columns` is a DatasetError."""
    if not os.path.isfile(path):
        raise DatasetError(path, "not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [column for column in required_columns if column not in header]
        if missing:
            raise DatasetError(
                path, f"header lacks {', '.join(missing)} (has {','.join(header)}; expected {','.join(required_columns)})"
            )
        return list(reader)


def traced_frame_counts(path: str) -> dict[str, int]:
    """{video file name: number of distinct traced frames} from VolumeTracings.csv."""
    frames: dict[str, set[str]] = {}
    for row in read_csv_table(path, TRACING_COLUMNS):
        frames.setdefault(video_name(row["FileName"]), set()).add(row["Frame"])
    return {name: len(traced) for name, traced in frames.items()}


def number(text: str | None) -> float:
    """A CSV cell as a float; NaN for an empty or non-numeric cell (the label rules then reject it)."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def ef_problem(text: str | None) -> str | None:
    """Why an EF cell is unusable (not a finite number in EF_RANGE), or None."""
    ef = number(text)
    low, high = EF_RANGE
    if not (math.isfinite(ef) and low <= ef <= high):
        return f"EF {text!r} is not a number from {low:g} to {high:g}"
    return None


def volume_problems(esv_text: str | None, edv_text: str | None) -> list[str]:
    """Why ESV / EDV cells are unusable: each a finite positive number, and ESV below EDV."""
    esv, edv = number(esv_text), number(edv_text)
    problems = [f"{name} {text!r} is not a positive number"
                for name, text, value in (("ESV", esv_text, esv), ("EDV", edv_text, edv))
                if not (math.isfinite(value) and value > 0)]
    if not problems and esv >= edv:
        problems.append(f"ESV {esv_text} is not below EDV {edv_text}")
    return problems


def check_ef_labels(rows: Sequence[dict[str, str]], filelist: str) -> None:
    """One DatasetError naming the rows (by FileName) whose EF is unusable, before any training starts."""
    bad = [(row["FileName"], problem) for row in rows if (problem := ef_problem(row["EF"]))]
    if bad:
        shown = "; ".join(f"{name}: {problem}" for name, problem in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DatasetError(filelist, f"{len(bad)} row{'s' * (len(bad) != 1)} with an unusable EF label "
                                     f"({shown}{more}); `evim3 data check` lists every problem")
