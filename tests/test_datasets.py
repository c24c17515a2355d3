"""EchoNetDataset, VideoClassificationDataset and compute_mean_std on the synthetic dataset."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from evim3.runtime.errors import DatasetError
from evim3.runtime.meta import PreprocessSpec
from evim3.runtime.preprocess import sample_clip_indices, sliding_clip_starts, video_to_input
from evim3.runtime.video import read_video
from torch.utils.data import DataLoader

from evim3.data.classification import VideoClassificationDataset
from evim3.data.echonet import EchoNetDataset
from evim3.data.stats import compute_mean_std

SPEC = PreprocessSpec(size=112, fps=50.0, frames=16, period=2, mean=30.0, std=50.0)


def filelist(root: Path) -> list[dict[str, str]]:
    with open(root / "FileList.csv", newline="") as f:
        return list(csv.DictReader(f))


def tracing_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "VolumeTracings.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_names(root: Path) -> list[str]:
    return [row["FileName"] for row in filelist(root) if row["Split"] == "TRAIN"]


def reference_clip(path: str, start: int) -> np.ndarray:
    """The inference path: decode, preprocess, cut a clip."""
    frames = video_to_input(read_video(path), SPEC)
    return frames[sample_clip_indices(len(frames), SPEC, start)]


def derived_dataset(source: Path, target: Path, tracing_rows_kept=lambda row: True, videos_kept=None) -> Path:
    """A copy of `source` with some VolumeTracings rows dropped and, if `videos_kept` is given, only those
    videos present (linked, not copied)."""
    target.mkdir()
    shutil.copy(source / "FileList.csv", target / "FileList.csv")
    rows = tracing_rows(source)
    with open(target / "VolumeTracings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if tracing_rows_kept(row))
    if videos_kept is None:
        (target / "Videos").symlink_to(source / "Videos")
    else:
        (target / "Videos").mkdir()
        for name in videos_kept:
            (target / "Videos" / f"{name}.avi").symlink_to(source / "Videos" / f"{name}.avi")
    return target


def test_split_lengths(synth_dataset: Path) -> None:
    lengths = {split: len(EchoNetDataset(synth_dataset, split, SPEC)) for split in ("TRAIN", "val", "Test", "all")}
    assert lengths == {"TRAIN": 8, "val": 2, "Test": 2, "all": 12}


def test_item_shapes_and_labels(synth_dataset: Path) -> None:
    dataset = EchoNetDataset(synth_dataset, "VAL", SPEC)
    item = dataset[0]
    assert item["x"].shape == (1, SPEC.frames, SPEC.size, SPEC.size) and item["x"].dtype == torch.float32
    assert item["ef"].dtype == torch.float32 and item["ef"].shape == ()
    row = next(row for row in filelist(synth_dataset) if row["FileName"] == item["file"])
    assert item["ef"].item() == pytest.approx(float(row["EF"]))
    assert item["edv"].item() == pytest.approx(float(row["EDV"])) and item["esv"].item() == pytest.approx(float(row["ESV"]))

    three = EchoNetDataset(synth_dataset, "VAL", SPEC, clips=3)[0]
    assert three["x"].shape == (3, 1, SPEC.frames, SPEC.size, SPEC.size) and len(three["starts"]) == 3

    every = EchoNetDataset(synth_dataset, "VAL", SPEC, clips="all")[0]
    num_frames = len(video_to_input(read_video(dataset.paths[0]), SPEC))
    expected_starts = sliding_clip_starts(num_frames, SPEC, SPEC.clip_span // 2)
    assert every["starts"].tolist() == expected_starts
    assert every["x"].shape == (len(expected_starts), 1, SPEC.frames, SPEC.size, SPEC.size)

    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["x"].shape == (2, 1, SPEC.frames, SPEC.size, SPEC.size) and len(batch["file"]) == 2


def test_dataset_item_equals_inference_path(synth_dataset: Path) -> None:
    """Every video, other sizes and rates included: the dataset's pixels are exactly the runtime's."""
    dataset = EchoNetDataset(synth_dataset, "ALL", SPEC, clips="first", pad=0)
    for index in range(len(dataset)):
        np.testing.assert_array_equal(dataset[index]["x"][0].numpy(), reference_clip(dataset.paths[index], 0))


def test_cached_items_equal_decoded_items_without_the_files(synth_dataset: Path, tmp_path: Path) -> None:
    """cache=True: preload decodes every video once; items (padding crop and random starts included, same
    seeds) are exactly those of the uncached dataset, and no longer need the files."""
    copy = tmp_path / "data"
    shutil.copytree(synth_dataset, copy)
    plain = EchoNetDataset(copy, "TRAIN", SPEC, clips="random", pad=4)
    cached = EchoNetDataset(copy, "TRAIN", SPEC, clips="random", pad=4, cache=True)
    size = cached.preload()
    assert len(cached.cache) == len(cached) and size == sum(v.nbytes for v in cached.cache.values())
    assert all(v.dtype == np.uint8 and v.shape[1:] == (SPEC.size, SPEC.size) for v in cached.cache.values())
    expected = []
    for index in range(len(plain)):
        torch.manual_seed(index)
        expected.append(plain[index])
    shutil.rmtree(copy / "Videos")
    for index, want in enumerate(expected):
        torch.manual_seed(index)
        got = cached[index]
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["starts"], want["starts"])
    with pytest.raises(RuntimeError, match="cache=True"):
        plain.preload()


def test_first_is_fixed_random_varies(synth_dataset: Path) -> None:
    first = EchoNetDataset(synth_dataset, "VAL", SPEC, clips="first")
    assert first[1]["starts"].tolist() == [0]
    assert torch.equal(first[1]["x"], first[1]["x"])

    torch.manual_seed(0)
    random = EchoNetDataset(synth_dataset, "VAL", SPEC, clips="random")
    items = [random[1] for _ in range(8)]
    assert len({item["starts"].item() for item in items}) > 1
    for item in items[:2]:
        np.testing.assert_array_equal(item["x"][0].numpy(), reference_clip(random.paths[1], item["starts"].item()))


def test_evenly_spaced_clips_span_the_video(synth_dataset: Path) -> None:
    dataset = EchoNetDataset(synth_dataset, "TEST", SPEC, clips=4)
    num_frames = len(video_to_input(read_video(dataset.paths[0]), SPEC))
    starts = dataset[0]["starts"].tolist()
    assert starts[0] == 0 and starts[-1] == max(0, num_frames - SPEC.clip_span) and starts == sorted(starts)


def test_padding_augments_train_only(synth_dataset: Path) -> None:
    torch.manual_seed(1)
    augmented = EchoNetDataset(synth_dataset, "TRAIN", SPEC, clips="first", pad=4)
    x = augmented[0]["x"]
    assert x.shape == (1, SPEC.frames, SPEC.size, SPEC.size)
    padded = torch.nn.functional.pad(torch.from_numpy(reference_clip(augmented.paths[0], 0)), (4,) * 4)
    crops = [(top, left) for top in range(9) for left in range(9)
             if torch.equal(x[0], padded[:, top : top + SPEC.size, left : left + SPEC.size])]
    assert len(crops) == 1

    held_out = EchoNetDataset(synth_dataset, "VAL", SPEC, clips="first", pad=4)
    np.testing.assert_array_equal(held_out[0]["x"][0].numpy(), reference_clip(held_out.paths[0], 0))


def test_keep_ratio_keeps_the_first_rows(synth_dataset: Path) -> None:
    half = EchoNetDataset(synth_dataset, "TRAIN", SPEC, keep_ratio=0.5)
    assert half.files == train_names(synth_dataset)[:4]
    assert half.ef_mean == pytest.approx(float(np.mean(half.ef)))
    assert EchoNetDataset(synth_dataset, "TRAIN", SPEC, max_videos=3).files == train_names(synth_dataset)[:3]
    with pytest.raises(ValueError, match="keep_ratio"):
        EchoNetDataset(synth_dataset, "TRAIN", SPEC, keep_ratio=0)


def test_ef_mean_is_the_training_mean(synth_dataset: Path) -> None:
    train_ef = [float(row["EF"]) for row in filelist(synth_dataset) if row["Split"] == "TRAIN"]
    for split in ("TRAIN", "TEST"):
        assert EchoNetDataset(synth_dataset, split, SPEC).ef_mean == pytest.approx(np.mean(train_ef), abs=1e-4)


def test_drop_untraced(synth_dataset: Path, tmp_path: Path) -> None:
    untraced, one_frame = train_names(synth_dataset)[:2]
    es_frame = next(row["Frame"] for row in tracing_rows(synth_dataset) if row["FileName"] == f"{one_frame}.avi")

    def kept(row: dict[str, str]) -> bool:
        name = row["FileName"].removesuffix(".avi")
        return name != untraced and not (name == one_frame and row["Frame"] == es_frame)

    root = derived_dataset(synth_dataset, tmp_path / "partly_traced", kept)
    dropped = EchoNetDataset(root, "TRAIN", SPEC)
    assert dropped.files == train_names(synth_dataset)[2:]
    assert len(EchoNetDataset(root, "TRAIN", SPEC, drop_untraced=False)) == 8


def test_missing_videos_is_one_error(synth_dataset: Path, tmp_path: Path) -> None:
    names = train_names(synth_dataset)
    root = derived_dataset(synth_dataset, tmp_path / "incomplete", videos_kept=names[3:])
    with pytest.raises(DatasetError, match=f"3 of 8 listed videos are missing: {names[0]}.avi, {names[1]}.avi"):
        EchoNetDataset(root, "TRAIN", SPEC)


def test_wrong_header_names_the_file(synth_dataset: Path, tmp_path: Path) -> None:
    root = derived_dataset(synth_dataset, tmp_path / "renamed")
    (root / "FileList.csv").write_text((root / "FileList.csv").read_text().replace("EF,", "Ejection,", 1))
    with pytest.raises(DatasetError, match=r"FileList\.csv: header lacks EF"):
        EchoNetDataset(root, "TRAIN", SPEC)
    with pytest.raises(DatasetError, match="not an EchoNet-Dynamic folder"):
        EchoNetDataset(tmp_path, "TRAIN", SPEC)


def test_mean_std(synth_dataset: Path) -> None:
    mean, std = compute_mean_std(synth_dataset, SPEC)
    paths = EchoNetDataset(synth_dataset, "TRAIN", SPEC).paths
    pixels = np.concatenate([read_video(path).frames.ravel() for path in paths]).astype(np.float64)
    assert mean == pytest.approx(pixels.mean(), rel=0.1) and std == pytest.approx(pixels.std(), rel=0.1)
    assert compute_mean_std(paths, SPEC) == pytest.approx((mean, std))
    assert compute_mean_std(paths, SPEC, num_videos=2) != pytest.approx((mean, std), rel=1e-6)


def test_classification_dataset(synth_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "clips").symlink_to(synth_dataset / "Videos")
    rows = filelist(synth_dataset)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for row in rows:
            label = "reduced" if float(row["EF"]) < 50 else "normal"
            writer.writerow([f"clips/{row['FileName']}.avi", label, row["Split"].lower()])

    train = VideoClassificationDataset(tmp_path / "labels.csv", "TRAIN", SPEC, clips="first")
    assert train.class_names == ["normal", "reduced"] and len(train) == 8
    item = train[0]
    assert item["x"].shape == (1, SPEC.frames, SPEC.size, SPEC.size) and item["label"].dtype == torch.int64
    first_train = next(row for row in rows if row["Split"] == "TRAIN")
    assert item["label"].item() == int(float(first_train["EF"]) < 50)
    assert item["file"] == f"clips/{first_train['FileName']}.avi"
    assert len(VideoClassificationDataset(tmp_path / "labels.csv", "test", SPEC)) == 2


def test_bad_arguments(synth_dataset: Path) -> None:
    for clips in ("some", 0, True):
        with pytest.raises(ValueError, match="clips"):
            EchoNetDataset(synth_dataset, "TRAIN", SPEC, clips=clips)
    with pytest.raises(ValueError, match="unknown split"):
        EchoNetDataset(synth_dataset, "TRAINING", SPEC)
