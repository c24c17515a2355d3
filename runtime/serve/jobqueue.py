"""The persistent queue: SQLite in WAL mode, synchronous=FULL (a committed row survives a power cut).

jobs: one row per SOP Instance UID (the same instance received twice is one job), state
    received -> running -> done | skipped (reason) | failed (reason).
deliveries: one row per (job, destination), state pending -> sent | dead, with attempts, the time of the
    next try and the last error.

Restart semantics: a job found `running` was interrupted (SIGKILL, power cut): it goes back to `received`
and is analysed again; its outputs carry deterministic UIDs, so the result is the same objects. A delivery
is marked sent only after the destination acknowledged it; a crash in between sends it again after
restart, with the same UIDs, so the destination keeps one copy.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

JOB_STATES = ("received", "running", "done", "skipped", "failed")
DELIVERY_STATES = ("pending", "sent", "dead")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sop_instance_uid TEXT PRIMARY KEY,
    uid_hash TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_aet TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    ef REAL,
    outputs TEXT,             -- space-separated paths of the objects to send
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    copies INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_at);
"""


@dataclass
class Job:
    sop_instance_uid: str
    uid_hash: str
    path: str
    calling_aet: str | None
    state: str
    reason: str | None
    ef: float | None
    outputs: list[str]


@dataclass
class Delivery:
    sop_instance_uid: str
    destination: str
    attempts: int
    outputs: list[str]
    uid_hash: str


class JobQueue:
    """Thread-safe: one connection, one lock (the node's writes are few and short)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        # 0600 before SQLite opens it: its -wal and -shm files take the database file's permissions
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- jobs ---

    def has_job(self, sop_instance_uid: str) -> bool:
        return bool(self._read("SELECT 1 FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,)))

    def add_job(self, sop_instance_uid: str, uid_hash: str, path: str, calling_aet: str | None) -> bool:
        """Queue a received instance; False when it is already queued (a second copy: counted, not queued)."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO jobs (sop_instance_uid, uid_hash, path, calling_aet, state, received_at, "
                "updated_at) VALUES (?, ?, ?, ?, 'received', ?, ?)",
                (sop_instance_uid, uid_hash, path, calling_aet, now, now))
            if cursor.rowcount == 0:
                self._db.execute("UPDATE jobs SET copies = copies + 1 WHERE sop_instance_uid = ?",
                                 (sop_instance_uid,))
                return False
            return True

    def claim_job(self) -> Job | None:
        """The oldest received job, now running; None when there is none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT sop_instance_uid FROM jobs WHERE state = 'received' ORDER BY received_at LIMIT 1"
                ).fetchone()
                if row is None:
                    self._db.execute("COMMIT")
                    return None
                self._db.execute("UPDATE jobs SET state = 'running', updated_at = ? WHERE sop_instance_uid = ?",
                                 (time.time(), row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.job(row[0])

    def job(self, sop_instance_uid: str) -> Job | None:
        rows = self._read("SELECT sop_instance_uid, uid_hash, path, calling_aet, state, reason, ef, outputs "
                          "FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,))
        if not rows:
            return None
        r = rows[0]
        return Job(r[0], r[1], r[2], r[3], r[4], r[5], r[6], (r[7] or "").split())

    def finish_job(self, sop_instance_uid: str, state: str, reason: str | None = None, ef: float | None = None,
                   outputs: list[str] | None = None, destinations: list[str] = ()) -> None:
        """End a running job; a done job gets one pending delivery per destination, in the same transaction."""
        if state not in ("done", "skipped", "failed", "received"):
            raise ValueError(f"not a final job state: {state}")
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE jobs SET state = ?, reason = ?, ef = ?, outputs = ?, updated_at = ? "
                                 "WHERE sop_instance_uid = ?",
                                 (state, reason, ef, " ".join(outputs or []), now, sop_instance_uid))
                if state == "done":
                    self._db.executemany(
                        "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state, next_at, "
                        "updated_at) VALUES (?, ?, 'pending', ?, ?)",
                        [(sop_instance_uid, d, now, now) for d in destinations])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def requeue_interrupted(self) -> int:
        """At start: jobs left running by a crash or a stop go back to received."""
        return self._write("UPDATE jobs SET state = 'received', updated_at = ? WHERE state = 'running'",
                           (time.time(),)).rowcount

    # --- deliveries ---

    def due_deliveries(self, now: float | None = None, limit: int = 16) -> list[Delivery]:
        now = time.time() if now is None else now
        rows = self._read(
            "SELECT d.sop_instance_uid, d.destination, d.attempts, j.outputs, j.uid_hash FROM deliveries d "
            "JOIN jobs j USING (sop_instance_uid) WHERE d.state = 'pending' AND d.next_at <= ? "
            "ORDER BY d.next_at LIMIT ?", (now, limit))
        return [Delivery(r[0], r[1], r[2], (r[3] or "").split(), r[4]) for r in rows]

    def next_delivery_at(self) -> float | None:
        rows = self._read("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'")
        return rows[0][0] if rows else None

    def delivery_sent(self, sop_instance_uid: str, destination: str) -> None:
        self._write("UPDATE deliveries SET state = 'sent', attempts = attempts + 1, last_error = NULL, "
                    "updated_at = ? WHERE sop_instance_uid = ? AND destination = ?",
                    (time.time(), sop_instance_uid, destination))

    def delivery_failed(self, sop_instance_uid: str, destination: str, error: str, dead: bool,
                        retry_in_s: float) -> None:
        now = time.time()
        self._write("UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?, "
                    "updated_at = ? WHERE sop_instance_uid = ? AND destination = ?",
                    ("dead" if dead else "pending", error, now + retry_in_s, now, sop_instance_uid, destination))

    # --- reports ---

    def counts(self) -> dict:
        jobs = dict.fromkeys(JOB_STATES, 0)
        jobs.update(dict(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state")))
        deliveries = dict.fromkeys(DELIVERY_STATES, 0)
        deliveries.update(dict(self._read("SELECT state, COUNT(*) FROM deliveries GROUP BY state")))
        return {"jobs": jobs, "deliveries": deliveries}

    def last_error(self) -> dict | None:
        rows = self._read(
            "SELECT updated_at, 'job', uid_hash, reason FROM jobs WHERE state = 'failed' "
            "UNION ALL SELECT d.updated_at, 'delivery ' || d.destination, j.uid_hash, d.last_error "
            "FROM deliveries d JOIN jobs j USING (sop_instance_uid) WHERE d.last_error IS NOT NULL "
            "ORDER BY 1 DESC LIMIT 1")
        if not rows:
            return None
        at, where, uid, error = rows[0]
        return {"time": at, "where": where, "job": uid, "error": error}

    def recent(self, limit: int = 50) -> dict:
        """The latest jobs and their deliveries, UIDs hashed (for /queue)."""
        jobs = [{"job": r[0], "state": r[1], "reason": r[2], "ef": r[3], "received_at": r[4], "updated_at": r[5],
                 "copies": r[6]}
                for r in self._read("SELECT uid_hash, state, reason, ef, received_at, updated_at, copies FROM jobs "
                                    "ORDER BY received_at DESC LIMIT ?", (limit,))]
        deliveries = [{"job": r[0], "destination": r[1], "state": r[2], "attempts": r[3], "next_at": r[4],
                       "last_error": r[5]}
                      for r in self._read("SELECT j.uid_hash, d.destination, d.state, d.attempts, d.next_at, "
                                          "d.last_error FROM deliveries d JOIN jobs j USING (sop_instance_uid) "
                                          "ORDER BY d.updated_at DESC LIMIT ?", (limit,))]
        return {"jobs": jobs, "deliveries": deliveries}
