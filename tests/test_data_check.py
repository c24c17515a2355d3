"""`evim3 data check` on the synthetic dataset, clean and with one defect of each kind planted."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from evim3.cli.main import app
from typer.testing import CliRunner


def rewrite_filelist(root: Path, change) -> None:
    with open(root / "FileList.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for index, row in enumerate(rows):
        change(index, row)
    with open(root / "FileList.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_clean_dataset_passes_in_one_line(synth_dataset: Path) -> None:
    # 2 workers: the spawned decoding pool (the planted test below decodes in-process).
    result = CliRunner().invoke(app, ["data", "check", str(synth_dataset), "--workers", "2"])
    assert result.exit_code == 0, result.output
    expected = f"{synth_dataset}: 12 videos decoded; labels in range; every video traced: no problems"
    assert result.output.strip().splitlines() == [expected]


def test_every_planted_defect_is_listed_and_fails(synth_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(synth_dataset, root)
    with open(root / "FileList.csv", newline="") as f:
        names = [row["FileName"] for row in csv.DictReader(f)]

    def plant(index: int, row: dict[str, str]) -> None:
        if index == 0:
            row["EF"] = "nan"
        elif index == 1:
            row["EF"] = "104.5"
        elif index == 2:
            row["ESV"], row["EDV"] = row["EDV"], row["ESV"]  # ESV above EDV
        elif index == 3:
            row["EDV"] = ""
        elif index == 4:
            row["Split"] = "TRAINING"

    rewrite_filelist(root, plant)
    avi = root / "Videos" / f"{names[5]}.avi"
    avi.write_bytes(avi.read_bytes()[:300])  # cut inside the first frame
    (root / "Videos" / f"{names[6]}.avi").unlink()
    with open(root / "VolumeTracings.csv", newline="") as f:
        tracings = list(csv.DictReader(f))
    with open(root / "VolumeTracings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(tracings[0]))
        writer.writeheader()
        writer.writerows(row for row in tracings if row["FileName"] not in (names[7], f"{names[7]}.avi"))

    result = CliRunner().invoke(app, ["data", "check", str(root), "--workers", "1"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["file", "problem"]
    table = [line.split(maxsplit=1) for line in lines[1:-1]]
    assert [name for name, _ in table] == names[:8], result.output  # one row per defect, in file order, no others
    problems = dict(table)
    assert problems[names[0]] == "EF 'nan' is not a number from 0 to 100"
    assert problems[names[1]] == "EF '104.5' is not a number from 0 to 100"
    assert problems[names[2]].startswith("ESV ") and "is not below EDV" in problems[names[2]]
    assert problems[names[3]] == "EDV '' is not a positive number"
    assert problems[names[4]] == "split 'TRAINING' is not one of TRAIN, VAL, TEST"
    assert problems[names[5]].startswith("cannot be decoded: ")
    assert problems[names[6]] == f"video file Videos/{names[6]}.avi is missing"
    assert problems[names[7]].startswith("0 traced frames in VolumeTracings.csv")
    assert lines[-1] == f"{root}: 8 problems in 8 files (12 videos listed)"


def test_not_a_dataset_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1 and "no FileList.csv" in result.output
    assert len(result.output.strip().splitlines()) == 1
