"""Atomic file writes: temp file beside the target, fsync, rename. A partial output never looks complete.

The file gets the permissions any new file of the user gets (0666 less the umask), whatever the writer
created the temp file with (safetensors writes 0600).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

NEW_FILE_MODE = 0o666  # before the umask, as open() creates files


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status); elsewhere by
    setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path to write to; on success it gets the user's default permissions, is fsynced and
    renamed onto `path` (and the folder fsynced, so the rename survives a crash); on error it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp-{os.getpid()}{ext}"  # keep the extension: some writers choose the format by it
    try:
        yield tmp
        os.chmod(tmp, NEW_FILE_MODE & ~current_umask())
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename is durable once the folder is synced
            _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
