"""Atomic writes: the user's permissions (not the writer's), fsync of the file and its folder, nothing left
behind on error."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from evim3.runtime import atomic
from evim3.runtime.atomic import atomic_path, current_umask, write_atomic
from evim3.runtime.meta import ModelMeta, PreprocessSpec

from evim3.checkpoint import save_checkpoint


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_of_the_users_umask(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    assert current_umask() == mask
    write_atomic(tmp_path / "a.json", "{}\n")
    with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that creates its file 0600, as safetensors does
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == 0o666 & ~mask


def test_a_checkpoint_is_readable_by_the_group_under_umask_022(tmp_path: Path, umask) -> None:
    umask(0o022)
    meta = ModelMeta(preset="evim3-tiny", model={}, preprocess=PreprocessSpec())
    save_checkpoint(tmp_path / "ckpt.safetensors", {"w": torch.zeros(2)}, meta)
    assert mode(tmp_path / "ckpt.safetensors") == mode(tmp_path / "ckpt.json") == 0o644


def test_the_file_and_its_folder_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "out.txt").exists()))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    write_atomic(tmp_path / "out.txt", "data")
    assert len(synced) == 2
    (file_synced, renamed_before), (folder_synced, renamed_after) = synced
    assert ".tmp-" in file_synced and not renamed_before
    assert folder_synced == str(tmp_path) and renamed_after


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["model.onnx"]
