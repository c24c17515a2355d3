"""Checkpoints: one safetensors file with the evim3 metadata in its header (+ a JSON sidecar). Round trip
exact, every broken file -> a one-line CheckpointError naming the file, writes atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from evim3.runtime.errors import CheckpointError
from evim3.runtime.meta import META_KEY, ModelMeta, PreprocessSpec
from safetensors.torch import save_file

from evim3 import checkpoint
from evim3.checkpoint import checkpoint_file, load_checkpoint, load_model, read_meta, save_checkpoint
from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3

CFG = ModelConfig(frames=8, time_patch=2, img_size=48, patch=16, dim=16, depth=1, d_state=4, final_dim=32)


def make_meta(preset: str = "evim3-test", **changes) -> ModelMeta:
    fields = {"preset": preset, "model": CFG.to_dict(), "preprocess": PreprocessSpec(size=48, frames=8, mean=30.0, std=40.0),
                  "ef_mean": 56.5, "ef_std": 11.0, "data": {"videos": 12}}
    return ModelMeta(**{**fields, **changes})


@pytest.fixture(scope="module")
def model() -> EViM3:
    torch.manual_seed(0)
    m = EViM3(CFG, ef_mean=56.5, ef_std=11.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def saved(tmp_path: Path, model: EViM3) -> Path:
    path = tmp_path / "run" / "best.safetensors"  # the folder does not exist yet
    save_checkpoint(path, model.state_dict(), make_meta())
    return path


def assert_one_line_error(error: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message  # names the file first
    for word in words:
        assert word in message, message


def test_round_trip_is_exact(saved: Path, model: EViM3) -> None:
    state, meta = load_checkpoint(saved)
    original = model.state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    expected = make_meta()
    expected.version = meta.version  # save_checkpoint stamps the package version
    assert meta == expected and meta.version
    assert read_meta(saved) == meta

    loaded, meta2 = load_model(saved, preset="evim3-test")
    assert not loaded.training and meta2 == meta
    clip = torch.randn(2, 1, 8, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(clip), model(clip))


def test_sidecar_json_is_the_metadata(saved: Path) -> None:
    sidecar = saved.with_suffix(".json")
    assert json.loads(sidecar.read_text()) == json.loads(read_meta(saved).to_json())


def test_folder_and_suffixless_paths(saved: Path) -> None:
    assert checkpoint_file(saved.parent) == str(saved)
    assert checkpoint_file(str(saved)[: -len(".safetensors")]) == str(saved)


def test_preset_mismatch_names_both(saved: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        load_model(saved, preset="evim3-p4")
    assert_one_line_error(error, saved, "'evim3-test'", "'evim3-p4'")


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "nothing.safetensors")
    assert_one_line_error(error, tmp_path / "nothing.safetensors", "not found")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert_one_line_error(error, tmp_path, "no best/last/model.safetensors")


@pytest.mark.parametrize("damage", ["truncated-half", "truncated-tail", "truncated-header", "random", "empty"])
def test_corrupt_file_is_one_line_error(saved: Path, damage: str) -> None:
    data = saved.read_bytes()
    broken = {
        "truncated-half": data[: len(data) // 2],
        "truncated-tail": data[:-10],
        "truncated-header": data[:20],
        "random": os.urandom(len(data)),
        "empty": b"",
    }[damage]
    saved.write_bytes(broken)
    for load in (read_meta, load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as error:
            load(saved)
        assert_one_line_error(error, saved, "safetensors")


def test_safetensors_without_evim3_metadata(tmp_path: Path, model: EViM3) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "no evim3 metadata")


@pytest.mark.parametrize(
    "metadata",
    ["{not json", json.dumps({"format": "evim3", "preset": "x"}), json.dumps({"preset": "x"})],
    ids=["not-json", "missing-fields", "no-format"],
)
def test_invalid_metadata(tmp_path: Path, metadata: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={META_KEY: metadata})
    with pytest.raises(CheckpointError) as error:
        read_meta(path)
    assert_one_line_error(error, path, "metadata is invalid")


@pytest.mark.parametrize("change", [{"bogus": 1}, {"patch": 5}, {"patch": "16"}], ids=["unknown", "geometry", "type"])
def test_invalid_model_config_in_metadata(tmp_path: Path, model: EViM3, change: dict) -> None:
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, model.state_dict(), make_meta(model={**CFG.to_dict(), **change}))
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "model config")


def test_weights_of_another_model(tmp_path: Path) -> None:
    other = EViM3(CFG.replace(dim=24))
    path = tmp_path / "mismatch.safetensors"
    save_checkpoint(path, other.state_dict(), make_meta())
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "do not fit")


def test_no_temporary_left_after_success(saved: Path) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == ["best.json", "best.safetensors"]


def test_failure_mid_write_leaves_no_target(tmp_path: Path, model: EViM3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills half way through the safetensors write: no checkpoint, no sidecar, no temp file;
    an older checkpoint at the same path stays as it was."""

    def half_then_disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    fresh = tmp_path / "fresh.safetensors"
    monkeypatch.setattr(checkpoint, "save_file", half_then_disk_full)
    with pytest.raises(OSError):
        save_checkpoint(fresh, model.state_dict(), make_meta())
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, model.state_dict(), make_meta())
    before = old.read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", half_then_disk_full)
    with pytest.raises(OSError):
        save_checkpoint(old, model.state_dict(), make_meta(preset="other"))
    assert old.read_bytes() == before and read_meta(old).preset == "evim3-test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "old.safetensors"]
