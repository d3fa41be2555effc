"""SQLite persistence: artifacts (by sha256), jobs and every event each job emitted.

One database file under the storage directory is the whole state of the service, so a restart keeps all
history. Events are the source of truth for streaming: a client that connects late, or reconnects, reads them
from here and then follows new ones, and nothing about a job lives only in memory.

All calls come from the event loop thread and are short single-row statements; the lock only guards against a
future caller from a thread. A statement that cannot get the database within `BUSY_TIMEOUT_SECONDS` fails at once
with `StorageUnavailable` (the event loop must not sit in SQLite's busy wait), a full disk with `StorageFull`;
callers that must not lose a write retry it with backoff (`retrying`). The file is checked at open
(`PRAGMA quick_check`) and a damaged one is refused with `DatabaseDamaged`, never replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

QUEUED, RUNNING = "queued", "running"
COMPLETED, FAILED, TIMEOUT, CANCELLED = "completed", "failed", "timeout", "cancelled"
ACTIVE_STATUSES = (QUEUED, RUNNING)
TERMINAL_STATUSES = (COMPLETED, FAILED, TIMEOUT, CANCELLED)
INTERRUPTED_REASON = "interrupted"
BUSY_TIMEOUT_SECONDS = 0.1
log = logging.getLogger("pgolf.service")
T = TypeVar("T")


class StorageError(Exception):
    """The database or the disk under it failed; not the client's fault."""


class StorageFull(StorageError):
    """No space left for a write (HTTP 507)."""


class StorageUnavailable(StorageError):
    """The database is locked by someone else or the disk failed; retrying may help (HTTP 503)."""


class DatabaseDamaged(StorageError):
    """The database file fails its integrity check; the service refuses to start on it."""


def storage_error(error: sqlite3.Error) -> StorageError:
    """The service's name for an SQLite failure."""
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return StorageFull(f"the service's storage is full ({text})")
    return StorageUnavailable(f"the job database is unavailable ({text})")


async def retrying(write: Callable[[], T], *, budget_seconds: float, what: str) -> T:
    """Run `write` until it succeeds, backing off from 50 ms to 2 s, for at most `budget_seconds`; then raise the
    last StorageError. Runs on the event loop: each attempt blocks it for at most BUSY_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + budget_seconds
    delay = 0.05
    while True:
        try:
            return write()
        except StorageError as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.2f s", what, error, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    sha256 TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    manifest TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    artifact_sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    result TEXT,
    log_tail TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_artifact ON jobs(artifact_sha256, options);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size_bytes: int
    path: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class StoredEvent:
    seq: int  # 0, 1, 2, ... within a job
    type: str
    body: str  # the event as JSON text, streamed as is


@dataclass(frozen=True)
class JobRecord:
    id: str
    artifact_sha256: str
    options: dict[str, Any]
    status: str
    reason: str | None
    result: dict[str, Any] | None  # the terminal event (end, timeout, error or cancelled)
    log_tail: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    owner: str | None = None  # the user who submitted it (None for jobs from before users existed)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value, so equal options compare equal as text in SQL."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Store:
    def __init__(self, database_path: Path) -> None:
        database_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = database_path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database_path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_SECONDS)
        self._db.row_factory = sqlite3.Row
        try:
            self._check_integrity()
            # WAL lets readers (the page, `GET /evaluations`) proceed while a worker appends events, and while
            # anyone else holds the write lock.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # a database from before users existed
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        except BaseException:
            self._db.close()
            raise

    def _check_integrity(self) -> None:
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(20)").fetchall()]
        except sqlite3.DatabaseError as error:
            problems = [str(error)]
        if problems != ["ok"]:
            path = self.path
            raise DatabaseDamaged(
                f"the job database {path} is damaged (quick_check: {'; '.join(problems)[:500]}). The service "
                f"does not start on it and has not changed it. Stop the service, keep a copy "
                f"(cp {path} {path}.damaged), then either restore a backup to {path}, or try to recover it "
                f"(sqlite3 {path} .recover | sqlite3 {path}.recovered, check it, and move it to {path}), or move "
                f"it aside (mv {path} {path}.damaged) to start with an empty history. Stored artifacts under "
                f"{path.parent / 'artifacts'} are kept either way."
            )

    def _write(self, statement: Callable[[], T]) -> T:
        """Run one write under the lock, with SQLite's failures in the service's terms."""
        with self._lock:
            try:
                return statement()
            except sqlite3.OperationalError as error:
                raise storage_error(error) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------------------------------------------------
    # artifacts

    def put_artifact(self, sha256: str, size_bytes: int, path: Path, manifest: dict[str, Any]) -> None:
        self._write(lambda: self._db.execute(
            "INSERT OR IGNORE INTO artifacts (sha256, size_bytes, path, manifest, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (sha256, size_bytes, str(path), json.dumps(manifest, allow_nan=False), time.time()),
        ))

    def get_artifact(self, sha256: str) -> ArtifactRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            return None
        return ArtifactRecord(row["sha256"], row["size_bytes"], Path(row["path"]), json.loads(row["manifest"]))

    # ----------------------------------------------------------------------------------------------------------
    # jobs

    def create_job(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None = None,
                   first_event: Callable[[JobRecord, int], dict[str, Any]] | None = None) -> JobRecord:
        """Insert a queued job, and its first event (built from the new record and its queue position) in the same
        transaction."""
        job_id = uuid.uuid4().hex[:16]

        def insert() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, artifact_sha256, options, status, created_at, owner)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, artifact_sha256, canonical_json(options), QUEUED, time.time(), owner),
                )
                if first_event is not None:
                    job = _job_from_row(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
                    (ahead,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND created_at < ?",
                                                (QUEUED, job.created_at)).fetchone()
                    self._append_event_locked(job_id, first_event(job, int(ahead) + 1))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        self._write(insert)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def list_jobs(self, *, limit: int, status: str | None = None, owner: str | None = None) -> list[JobRecord]:
        """Newest first; only `owner`'s jobs when an owner is given."""
        query, conditions, params = "SELECT * FROM jobs", [], []
        if status is not None:
            conditions.append("status = ?")
            params.append(status)
        if owner is not None:
            conditions.append("owner = ?")
            params.append(owner)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [_job_from_row(row) for row in rows]

    def find_reusable_job(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None = None
                          ) -> JobRecord | None:
        """The newest job for this artifact and these options that finished well or is still under way (only
        `owner`'s jobs when an owner is given).

        Failed, cancelled and timed-out jobs are not reused: running again is the point of uploading again.
        """
        query = ("SELECT * FROM jobs WHERE artifact_sha256 = ? AND options = ? AND status IN (?, ?, ?)"
                 + ("" if owner is None else " AND owner = ?") + " ORDER BY created_at DESC LIMIT 1")
        params: list[Any] = [artifact_sha256, canonical_json(options), COMPLETED, QUEUED, RUNNING]
        if owner is not None:
            params.append(owner)
        with self._lock:
            row = self._db.execute(query, params).fetchone()
        return None if row is None else _job_from_row(row)

    def count_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {row["status"]: int(row["n"]) for row in rows}

    def count_active_jobs(self) -> int:
        counts = self.count_by_status()
        return sum(counts.get(status, 0) for status in ACTIVE_STATUSES)

    def queue_position(self, job: JobRecord) -> int | None:
        """1 for the next job to start, None when the job is not waiting."""
        if job.status != QUEUED:
            return None
        with self._lock:
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND created_at < ?", (QUEUED, job.created_at)
            ).fetchone()
        return int(ahead) + 1

    def running_jobs(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
        return [_job_from_row(row) for row in rows]

    def claim_next_queued(self) -> JobRecord | None:
        """Move the oldest queued job to running and return it (first in, first out)."""
        row = self._write(lambda: self._db.execute(
            "UPDATE jobs SET status = ?, started_at = ? WHERE id = ("
            " SELECT id FROM jobs WHERE status = ? ORDER BY created_at, rowid LIMIT 1) RETURNING *",
            (RUNNING, time.time(), QUEUED),
        ).fetchone())
        return None if row is None else _job_from_row(row)

    def finish_job(
        self,
        job_id: str,
        *,
        status: str,
        terminal_event: dict[str, Any],
        reason: str | None = None,
        log_tail: str | None = None,
    ) -> JobRecord:
        """Append the terminal event and set the final status in one transaction.

        Followers read the status before the events, so seeing a terminal status guarantees that every event,
        the terminal one included, is already readable.
        """
        assert status in TERMINAL_STATUSES

        def finish() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if current not in TERMINAL_STATUSES:  # a retried finish after one that did land adds nothing
                    self._append_event_locked(job_id, terminal_event)
                    self._db.execute(
                        "UPDATE jobs SET status = ?, reason = ?, result = ?, log_tail = ?, finished_at = ?"
                        " WHERE id = ?",
                        (status, reason, json.dumps(terminal_event, allow_nan=False), log_tail, time.time(),
                         job_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        self._write(finish)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def mark_interrupted(self) -> list[str]:
        """At start: no job may stay queued or running from a previous process, which is gone."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status IN (?, ?)", ACTIVE_STATUSES
            ).fetchall()
        job_ids = [row["id"] for row in rows]
        for job_id in job_ids:
            message = "the service stopped while this job was queued or running"
            self.finish_job(
                job_id,
                status=FAILED,
                reason=INTERRUPTED_REASON,
                terminal_event={"type": "error", "source": "service", "code": INTERRUPTED_REASON,
                                "reason": INTERRUPTED_REASON, "message": message},
            )
        return job_ids

    # ----------------------------------------------------------------------------------------------------------
    # events

    def append_event(self, job_id: str, event: dict[str, Any]) -> int:
        return self._write(lambda: self._append_event_locked(job_id, event))

    def _append_event_locked(self, job_id: str, event: dict[str, Any]) -> int:
        (next_seq,) = self._db.execute(
            "SELECT COALESCE(MAX(seq) + 1, 0) FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        self._db.execute(
            "INSERT INTO events (job_id, seq, type, body, created_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, next_seq, str(event.get("type")), json.dumps(event, allow_nan=False), time.time()),
        )
        return int(next_seq)

    def events_after(self, job_id: str, after_seq: int, *, limit: int = 500) -> list[StoredEvent]:
        """The job's events with seq > after_seq, oldest first, as stored JSON text."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            ).fetchall()
        return [StoredEvent(int(row["seq"]), row["type"], row["body"]) for row in rows]

    def last_event_of_type(self, job_id: str, event_type: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM events WHERE job_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
                (job_id, event_type),
            ).fetchone()
        return None if row is None else json.loads(row["body"])


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        artifact_sha256=row["artifact_sha256"],
        options=json.loads(row["options"]),
        status=row["status"],
        reason=row["reason"],
        result=None if row["result"] is None else json.loads(row["result"]),
        log_tail=row["log_tail"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        owner=row["owner"],
    )
