"""The durable spool: every file the node keeps, written so that a crash leaves either the whole file or none.

A received dataset is written as received (its bytes, after a file meta header), to a temporary file in
the spool's own folder, fsync'ed, renamed over its final name and the folder fsync'ed; only then may the
C-STORE be acknowledged. Files are created 0600 (the service's user only): they hold patient data.
Names are hashes of the SOP Instance UID (``uid_hash``), so no UID appears in a file name.

Test hook: ``EVIM3_SERVE_SPOOL_LIMIT`` (bytes) makes a received dataset's write that would take the
spool's files past that total fail as a full disk does (ENOSPC), so "disk full" can be tested without
privileges. Unset, nothing is emulated.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
LIMIT_ENV = "EVIM3_SERVE_SPOOL_LIMIT"


def uid_hash(uid: str) -> str:
    """A UID as 16 hex digits of its SHA-256: names files and audit entries without revealing the UID."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:16]


class Spool:
    """Folders under `root`: received/ (datasets as received), out/ (SRs and captures to send), tmp/."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.received = self.root / "received"
        self.out = self.root / "out"
        self.tmp = self.root / "tmp"
        for folder in (self.root, self.received, self.out, self.tmp):
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, DIR_MODE)
        limit = os.environ.get(LIMIT_ENV)
        self._limit = int(limit) if limit else None
        self._lock = threading.Lock()

    def received_path(self, sop_instance_uid: str) -> Path:
        return self.received / f"{uid_hash(sop_instance_uid)}.dcm"

    def out_path(self, sop_instance_uid: str, kind: str) -> Path:
        return self.out / f"{uid_hash(sop_instance_uid)}.{kind}.dcm"

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for folder in (self.received, self.out) for p in folder.iterdir()
                   if p.is_file())

    def write(self, path: Path, data: bytes) -> None:
        """Write `data` durably at `path` (temp file, fsync, rename, folder fsync), mode 0600.
        Raises OSError (ENOSPC on a full disk) and leaves nothing behind on failure."""
        with self._lock:  # also keeps the emulated limit exact under concurrent associations
            if (self._limit is not None and path.parent == self.received
                    and self.used_bytes() + len(data) > self._limit):
                raise OSError(errno.ENOSPC, f"no space left in the spool ({LIMIT_ENV}={self._limit})")
            fd, tmp = _create_temp(self.tmp, path.name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with _suppress_oserror():
                    os.unlink(tmp)
                raise
            fsync_dir(path.parent)

    def remove_temp_files(self) -> int:
        """Temporary files a crash left behind (never acknowledged): removed at start."""
        count = 0
        for p in self.tmp.iterdir():
            with _suppress_oserror():
                p.unlink()
                count += 1
        return count


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=f".{name}.", dir=folder)  # mkstemp creates 0600


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, OSError)
