"""The synthetic echo generator: layout, labels that agree with the pictures, determinism, EF not in brightness."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from evim3.cli.data import app as data_app
from evim3.runtime.errors import DatasetError
from evim3.runtime.video import read_video
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from evim3.data.synth import CHORDS, FILELIST_COLUMNS, TRACING_COLUMNS, generate_dataset

SHORT = (32, 40)  # frames: enough for one traced beat, quick to make


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def tracings_by_video(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """{file name without .avi: {frame: (1 + CHORDS, 4) rows of X1, Y1, X2, Y2}}, long axis first."""
    traced: dict[str, dict[int, list]] = {}
    for row in read_csv(root / "VolumeTracings.csv")[1]:
        rows = traced.setdefault(row["FileName"].removesuffix(".avi"), {}).setdefault(int(row["Frame"]), [])
        rows.append([float(row[key]) for key in ("X1", "Y1", "X2", "Y2")])
    return {name: {frame: np.array(rows) for frame, rows in frames.items()} for name, frames in traced.items()}


def chord_polygon(rows: np.ndarray) -> np.ndarray:
    """The cavity outline as EchoNet builds it: one end of every chord, then the other ends in reverse."""
    chords = rows[1:]
    return np.concatenate([chords[:, :2], chords[::-1, 2:]])


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def window_reduce(image: np.ndarray, radius: int, reduce) -> np.ndarray:
    padded = np.pad(image, radius, mode="edge")
    return reduce(sliding_window_view(padded, (2 * radius + 1,) * 2), axis=(-2, -1))


def otsu_threshold(values: np.ndarray) -> float:
    """The level that best splits `values` into two classes (maximum between-class variance)."""
    levels = np.sort(values)
    cumulative = np.cumsum(levels)
    count = np.arange(1, len(levels))
    mean_low = cumulative[:-1] / count
    mean_high = (cumulative[-1] - cumulative[:-1]) / (len(levels) - count)
    between = count * (len(levels) - count) * (mean_low - mean_high) ** 2
    return float(levels[np.argmax(between)])


def dark_pool_area(frame: np.ndarray, rows: np.ndarray) -> float:
    """Pixels of blood (dark, by Otsu on a 3x3-smoothed frame) within 3 px of the traced cavity outline."""
    outline = Image.new("1", frame.shape[::-1])
    ImageDraw.Draw(outline).polygon([tuple(point) for point in chord_polygon(rows)], fill=1)
    neighbourhood = window_reduce(np.array(outline), 3, np.max)
    smoothed = window_reduce(frame.astype(np.float64), 1, np.mean)[neighbourhood]
    return float((smoothed < otsu_threshold(smoothed)).sum())


def area_length_ratio(area_es: float, rows_es: np.ndarray, area_ed: float, rows_ed: np.ndarray) -> float:
    """ESV / EDV by the area-length method; the long axis is each tracing's first row."""
    def volume(area: float, rows: np.ndarray) -> float:
        return area**2 / np.hypot(*(rows[0, 2:] - rows[0, :2]))

    return volume(area_es, rows_es) / volume(area_ed, rows_ed)


@pytest.fixture(scope="module")
def brightness_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 short videos, made by a pool of two workers."""
    root = tmp_path_factory.mktemp("brightness") / "echonet"
    generate_dataset(root, 60, seed=3, workers=2, frame_range=SHORT, other_format_share=0.0)
    return root


def test_layout(synth_dataset: Path) -> None:
    header, rows = read_csv(synth_dataset / "FileList.csv")
    assert tuple(header) == FILELIST_COLUMNS
    assert (synth_dataset / "VolumeTracings.csv").read_text().splitlines()[0] == ",".join(TRACING_COLUMNS)
    assert [sum(row["Split"] == split for row in rows) for split in ("TRAIN", "VAL", "TEST")] == [8, 2, 2]
    assert {(row["FrameHeight"], row["FrameWidth"]) for row in rows} > {("112", "112")}
    assert {row["FPS"] for row in rows} > {"50"}

    traced = tracings_by_video(synth_dataset)
    for row in rows:
        video = read_video(synth_dataset / "Videos" / f"{row['FileName']}.avi")
        frames = video.frames
        assert frames.shape == (int(row["NumberOfFrames"]), int(row["FrameHeight"]), int(row["FrameWidth"]))
        assert video.fps == float(row["FPS"])
        assert frames[:, 0, 0].max() < 10  # outside the sector is black
        assert {len(rows) for rows in traced[row["FileName"]].values()} == {1 + CHORDS}
        assert len(traced[row["FileName"]]) == 2
        edv, esv, ef = (float(row[key]) for key in ("EDV", "ESV", "EF"))
        assert ef == pytest.approx(100 * (edv - esv) / edv, abs=1e-3)


def test_labels_agree_with_pictures(synth_dataset: Path) -> None:
    """Re-measure the LV blood pool in the decoded ED and ES frames; it must match the tracings and the EF."""
    traced = tracings_by_video(synth_dataset)
    for row in read_csv(synth_dataset / "FileList.csv")[1]:
        frames = read_video(synth_dataset / "Videos" / f"{row['FileName']}.avi").frames
        tracings = traced[row["FileName"]]
        es_frame, ed_frame = tracings  # ES tracing first, as in EchoNet
        measured = {frame: dark_pool_area(frames[frame], rows) for frame, rows in tracings.items()}
        for frame, rows in tracings.items():
            assert measured[frame] == pytest.approx(polygon_area(chord_polygon(rows)), rel=0.15), row["FileName"]
        assert polygon_area(chord_polygon(tracings[ed_frame])) > polygon_area(chord_polygon(tracings[es_frame]))
        ratio = area_length_ratio(measured[es_frame], tracings[es_frame], measured[ed_frame], tracings[ed_frame])
        assert 100 * (1 - ratio) == pytest.approx(float(row["EF"]), abs=8), row["FileName"]


def test_same_seed_same_dataset_whatever_the_workers(tmp_path: Path) -> None:
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    generate_dataset(one, 4, seed=11, frame_range=SHORT)
    generate_dataset(two, 4, seed=11, frame_range=SHORT, workers=2)
    generate_dataset(other, 4, seed=12, frame_range=SHORT)
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    assert (one / "FileList.csv").read_bytes() != (other / "FileList.csv").read_bytes()
    for video in sorted((one / "Videos").iterdir()):
        np.testing.assert_array_equal(read_video(video).frames, read_video(two / "Videos" / video.name).frames)


def test_refuses_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(tmp_path, 2)


def test_ef_spread(brightness_dataset: Path) -> None:
    ef = np.array([float(row["EF"]) for row in read_csv(brightness_dataset / "FileList.csv")[1]])
    assert ef.min() < 25 and ef.max() > 65 and ef.std() > 10


def test_brightness_does_not_predict_ef(brightness_dataset: Path) -> None:
    """A per-video mean-intensity linear fit must do little better than predicting the training mean EF."""
    rows = read_csv(brightness_dataset / "FileList.csv")[1]
    videos = brightness_dataset / "Videos"
    brightness = np.array([read_video(videos / f"{row['FileName']}.avi").frames.mean() for row in rows])
    ef = np.array([float(row["EF"]) for row in rows])
    train = np.array([row["Split"] == "TRAIN" for row in rows])

    design = np.stack([brightness, np.ones_like(brightness)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design[train], ef[train], rcond=None)
    regressor_mae = np.abs(design[~train] @ coefficients - ef[~train]).mean()
    mean_mae = np.abs(ef[train].mean() - ef[~train]).mean()
    assert regressor_mae >= 0.8 * mean_mae


def test_cli_synth(tmp_path: Path) -> None:
    result = CliRunner().invoke(data_app, ["synth", str(tmp_path / "ds"), "--videos", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "TRAIN 1, VAL 1, TEST 1" in result.output
    assert len(list((tmp_path / "ds" / "Videos").iterdir())) == 3

    again = CliRunner().invoke(data_app, ["synth", str(tmp_path / "ds"), "--videos", "3"])
    assert again.exit_code == 1 and "not empty" in again.output


def test_cli_synth_does_not_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from evim3.cli.data import app\n"
        f"app(['synth', {str(tmp_path / 'ds')!r}, '--videos', '1'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
