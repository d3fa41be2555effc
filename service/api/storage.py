"""Persistence of the service: artifacts, code files, jobs and every event each job emitted.

Two stores keep one contract (`Store`), chosen by `open_store(settings)`:
- `SqliteStore` (service/api/storage_sqlite.py), the default: one database file under PGOLF_STORAGE_DIR, the
  artifacts beside it; everything on one machine.
- `PostgresStore` (service/api/storage_postgres.py) when PGOLF_DATABASE_URL=postgresql://...: jobs, events,
  artifacts and code in one PostgreSQL database that API nodes and workers on other machines share.

The job logic both run is written once (service/api/storage_sql.py). Events are the source of truth for
streaming: a client that connects late, or reconnects, reads them from the store and then follows new ones, and
nothing about a job lives only in memory, so a restart keeps all history.

Failures come in the service's terms: `StorageUnavailable` (locked, unreachable, timed out: retrying may help;
HTTP 503), `StorageFull` (HTTP 507), `DatabaseRefused` at open (damaged, or written by a newer version), and
`LeaseLost` for a guarded write by a worker that no longer holds its job (not a storage failure, not retried).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from service.api.settings import Settings

QUEUED, RUNNING = "queued", "running"
COMPLETED, FAILED, TIMEOUT, CANCELLED = "completed", "failed", "timeout", "cancelled"
ACTIVE_STATUSES = (QUEUED, RUNNING)
TERMINAL_STATUSES = (COMPLETED, FAILED, TIMEOUT, CANCELLED)
INTERRUPTED_REASON = "interrupted"
WORKER_LOST_REASON = "worker lost"
CANCELLED_WHILE_QUEUED = "cancelled while queued"
log = logging.getLogger("pgolf.service")
T = TypeVar("T")


class StorageError(Exception):
    """The database or the disk under it failed; not the client's fault."""


class StorageFull(StorageError):
    """No space left for a write (HTTP 507)."""


class StorageUnavailable(StorageError):
    """The database is locked by someone else, unreachable, or its disk failed; retrying may help (HTTP 503)."""


class DatabaseRefused(StorageError):
    """The service does not start on this database (and has not changed it)."""


class DatabaseDamaged(DatabaseRefused):
    """The database file fails its integrity check; the service refuses to start on it."""


class SchemaTooNew(DatabaseRefused):
    """The database was migrated by a newer version of pgolf than this one."""


class LeaseLost(Exception):
    """A guarded write (finish_job / append_event with worker_id) by a worker that no longer holds the job: its
    lease expired and the job was requeued or failed, or it ended otherwise. Nothing was written; retrying cannot
    help, so this is deliberately not a StorageError."""


class CapacityReached(Exception):
    """create_job(max_active=N) found N jobs queued or running already (counted in the inserting transaction, so
    concurrent admissions on any number of API nodes never exceed N). Nothing was written."""

    def __init__(self, active_jobs: int) -> None:
        super().__init__(f"{active_jobs} jobs are queued or running")
        self.active_jobs = active_jobs


class LeaseState(enum.Enum):
    HELD = "held"  # renewed
    CANCEL_REQUESTED = "cancel_requested"  # renewed, and someone asked to cancel: kill the evaluator, finish it
    LOST = "lost"  # no longer this worker's: kill the evaluator and write nothing more


async def retrying(write: Callable[[], T], *, budget_seconds: float, what: str) -> T:
    """Run `write` until it succeeds, backing off from 50 ms to 2 s, for at most `budget_seconds`; then raise the
    last StorageError. Runs on the event loop: each attempt blocks it for at most the store's bound (SQLite's
    busy timeout, Postgres's connect/statement timeouts)."""
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


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    suffix: str  # ".pgolf" or ".ptz": the engine tells the formats apart by the file name
    present: bool = True  # the bytes are still there (SQLite: the file under artifacts/ was not deleted)


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
    worker_id: str | None = None  # who runs (or ran) it; cleared when its lease expired
    lease_expires_at: float | None = None  # database clock; None: not leased (or no longer running)
    attempts: int = 0  # how many times it was claimed (a requeued job is claimed again)
    cancel_requested: bool = False

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def file_storage_error(error: OSError, what: str) -> StorageError:
    """The service's name for a failed file write under the storage directory."""
    if error.errno == errno.ENOSPC:
        return StorageFull(f"the service's storage is full ({what}: {error})")
    return StorageUnavailable(f"{what} failed ({error})")


def write_file_atomically(target: Path, data: bytes) -> None:
    """`target` holds `data` entirely or is left as it was (a crash leaves at most a scratch file beside it)."""
    scratch = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_bytes(data)
        os.replace(scratch, target)
    except OSError as error:
        scratch.unlink(missing_ok=True)
        raise file_storage_error(error, f"writing {target.name}") from None


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value, so equal options compare equal as text in SQL."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def service_error_event(code: str, reason: str, **fields: Any) -> dict[str, Any]:
    """An `error` event in the engine's schema, written by the service because the engine could not."""
    return {"type": "error", "source": "service", "code": code, "reason": reason, **fields}


class Store(Protocol):
    """What the API and the workers need from persistence; both stores pass one test suite against it.

    Times are epoch seconds from the database's clock (SQLite: the one machine's), so the clocks of API nodes
    and workers never matter. Every method that changes a job announces it on `changes()`.
    """

    def close(self) -> None: ...

    # artifacts and code files (content-addressed by sha256; workers share no filesystem with the API)
    def put_artifact(self, sha256: str, size_bytes: int, source: Path, manifest: dict[str, Any], *,
                     suffix: str) -> None:
        """Take the validated upload file at `source` (moved or copied; the caller discards what is left).
        Idempotent per sha256."""

    def get_artifact(self, sha256: str) -> ArtifactRecord | None: ...

    def materialise_artifact(self, sha256: str, dest_dir: Path) -> Path | None:
        """A local file with the artifact's bytes (under dest_dir, or wherever the store keeps it), named
        <sha256><suffix>; None when unknown or its bytes are gone."""

    def put_code(self, sha256: str, code: bytes) -> None: ...

    def materialise_code(self, sha256: str, dest_dir: Path) -> Path | None: ...

    # jobs
    def create_job(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None = None,
                   first_event: Callable[[JobRecord, int], dict[str, Any]] | None = None,
                   max_active: int | None = None) -> JobRecord: ...

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, *, limit: int, status: str | None = None, owner: str | None = None) -> list[JobRecord]: ...

    def find_reusable_job(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None = None
                          ) -> JobRecord | None: ...

    def count_by_status(self) -> dict[str, int]: ...

    def count_active_jobs(self) -> int: ...

    def queue_position(self, job: JobRecord) -> int | None: ...

    def running_jobs(self) -> list[JobRecord]: ...

    def claim_next_queued(self, worker_id: str | None = None, lease_seconds: float | None = None
                          ) -> JobRecord | None: ...

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState: ...

    def finish_job(self, job_id: str, *, status: str, terminal_event: dict[str, Any], reason: str | None = None,
                   log_tail: str | None = None, worker_id: str | None = None) -> JobRecord: ...

    def request_cancel(self, job_id: str) -> JobRecord | None: ...

    def expire_leases(self, requeue_limit: int) -> list[tuple[str, str]]: ...

    def mark_interrupted(self) -> list[str]: ...

    # events
    def append_event(self, job_id: str, event: dict[str, Any], worker_id: str | None = None) -> int: ...

    def events_after(self, job_id: str, after_seq: int, *, limit: int = 500) -> list[StoredEvent]: ...

    def last_event_of_type(self, job_id: str, event_type: str) -> dict[str, Any] | None: ...

    def changes(self) -> AsyncIterator[str | None]:
        """The id of every job changed by any process, as hints (None: anything may have changed; re-read)."""


def open_store(settings: Settings) -> Store:
    """The store the settings name: PGOLF_DATABASE_URL's PostgreSQL database, else SQLite under the storage dir."""
    if settings.database_url:
        from service.api.storage_postgres import PostgresStore

        return PostgresStore(settings.database_url)
    from service.api.storage_sqlite import SqliteStore

    return SqliteStore(settings.database_path, artifacts_dir=settings.artifacts_dir)
