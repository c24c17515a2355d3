"""The audit log: one JSON object per line, appended and flushed per event. No patient data: SOP
Instance UIDs appear only as ``uid_hash`` (16 hex digits of their SHA-256); no names, IDs or dates of the
patient or study. Fields: time (UTC, ISO 8601), event, and what the event has of job (hashed UID),
calling_aet, state, reason, ef, destination, attempt, error."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def scrub(message: str, limit: int = 300) -> str:
    """An error message from a library, safe for the log: quoted values (which may be an element's value,
    a patient's name or date) replaced by '…', cut to `limit` characters."""
    return QUOTED.sub("'…'", str(message))[:limit]


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> None:
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                 "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = json.dumps(entry, sort_keys=False, default=str)
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except (OSError, ValueError) as e:  # a full disk must not turn a stored dataset into a failure
                print(f"evim3 serve: audit log not written ({e}): {line}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_audit(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
