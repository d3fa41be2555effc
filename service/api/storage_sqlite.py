"""The SQLite store, the single-machine default: one database file under the storage directory, and the
artifacts and code files beside it (storage_dir/artifacts/<sha256>.pgolf|.ptz, code-<sha256>.py).

All calls come from the event loop thread and are short statements; the lock only guards against callers from
other threads. A statement that cannot get the database within `BUSY_TIMEOUT_SECONDS` fails at once with
`StorageUnavailable` (the event loop must not sit in SQLite's busy wait), a full disk with `StorageFull`;
callers that must not lose a write retry it with backoff (`retrying`). The file is checked at open
(`PRAGMA quick_check`) and a damaged one is refused with `DatabaseDamaged`, never replaced; a database migrated
by a newer pgolf is refused with `SchemaTooNew`.

Schema migrations are numbered steps (`MIGRATIONS`), each applied in one transaction and recorded in
`schema_version`; a database from before migrations existed is upgraded in place, keeping its history.

Change notifications (`changes()`): writes by this process are announced directly; writes by other processes
(a second service on the same file) are noticed by polling `PRAGMA data_version` and announced as None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from service.api.storage import (
    ArtifactRecord,
    DatabaseDamaged,
    SchemaTooNew,
    StorageError,
    StorageFull,
    StorageUnavailable,
    file_storage_error,
    write_file_atomically,
)
from service.api.storage_sql import Row, SqlJobs, split_statements

BUSY_TIMEOUT_SECONDS = 0.1
DATA_VERSION_POLL_SECONDS = 0.2

# The schema as it was before migrations were numbered; step 1 brings any such database (or none) to it.
_ORIGINAL_SCHEMA = """
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


def _original_schema(db: sqlite3.Connection) -> None:
    for statement in split_statements(_ORIGINAL_SCHEMA):
        db.execute(statement)
    columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
    if "owner" not in columns:  # a database from before users existed
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")


def _job_leases(db: sqlite3.Connection) -> None:
    for statement in split_statements("""
        ALTER TABLE jobs ADD COLUMN worker_id TEXT;
        ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
        ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX jobs_by_lease ON jobs(status, lease_expires_at)
    """):
        db.execute(statement)


# (version, what it does, the step). Append only: a released step never changes.
MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "artifacts, jobs and events (the schema from before numbered migrations)", _original_schema),
    (2, "job leases: worker_id, lease_expires_at, attempts, cancel_requested", _job_leases),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def storage_error(error: sqlite3.Error) -> StorageError:
    """The service's name for an SQLite failure."""
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return StorageFull(f"the service's storage is full ({text})")
    return StorageUnavailable(f"the job database is unavailable ({text})")


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._db.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._db.execute(sql, params)


class SqliteStore(SqlJobs):
    def __init__(self, database_path: Path, *, artifacts_dir: Path | None = None) -> None:
        database_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = database_path
        self.artifacts_dir = artifacts_dir or database_path.parent / "artifacts"
        self._lock = threading.Lock()
        self._pending: list[str] = []  # jobs changed by the transaction in progress
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str | None]]] = []
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
            self._migrate()
        except sqlite3.OperationalError as error:
            self._db.close()
            raise storage_error(error) from None
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

    def _migrate(self) -> None:
        """Apply the missing steps, each in its own transaction; the write lock makes a second process opening
        the same file at once wait (or fail with StorageUnavailable) instead of applying a step twice."""
        for version, description, step in [(0, "", None), *MIGRATIONS]:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                                 " description TEXT NOT NULL, applied_at REAL NOT NULL)")
                (current,) = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
                if current > SCHEMA_VERSION:
                    raise SchemaTooNew(
                        f"the job database {self.path} has schema version {current}, newer than this pgolf's "
                        f"{SCHEMA_VERSION}: a newer pgolf migrated it. Run that version (or a newer one), or "
                        f"restore a backup taken before the upgrade; nothing was changed.")
                if step is not None and current < version:
                    step(self._db)
                    self._db.execute("INSERT INTO schema_version (version, description, applied_at)"
                                     " VALUES (?, ?, ?)", (version, description, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        with self._reading() as tx:
            row = tx.one("SELECT MAX(version) AS v FROM schema_version")
        assert row is not None
        return int(row["v"])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------------------------------------------------
    # the backend hooks of SqlJobs

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_SqliteTx]:
        with self._lock:
            self._pending = []
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise storage_error(error) from None
            try:
                yield _SqliteTx(self._db)
                self._db.execute("COMMIT")
            except BaseException as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(error, sqlite3.OperationalError):
                    raise storage_error(error) from None
                raise
            changed, self._pending = self._pending, []
        self._announce(changed)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[_SqliteTx]:
        with self._lock:
            try:
                yield _SqliteTx(self._db)
            except sqlite3.OperationalError as error:
                raise storage_error(error) from None

    def _now(self, tx: Any) -> float:
        return time.time()  # one machine: its clock is the database's

    def _notify(self, tx: Any, job_id: str) -> None:
        self._pending.append(job_id)

    def _announce(self, job_ids: list[str]) -> None:
        for loop, queue in list(self._subscribers):
            for job_id in dict.fromkeys(job_ids):
                with contextlib.suppress(RuntimeError):  # that loop is closed: its subscriber is gone
                    loop.call_soon_threadsafe(queue.put_nowait, job_id)

    async def changes(self) -> AsyncIterator[str | None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        subscriber = (loop, queue)
        self._subscribers.append(subscriber)
        try:
            version = self._data_version()
            next_poll = loop.time() + DATA_VERSION_POLL_SECONDS
            while True:
                timeout = next_poll - loop.time()
                if timeout > 0:
                    try:
                        job_id = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        pass
                    else:
                        yield job_id
                        continue
                next_poll = loop.time() + DATA_VERSION_POLL_SECONDS
                latest = self._data_version()
                if latest != version:  # another process committed something
                    version = latest
                    yield None
        finally:
            self._subscribers.remove(subscriber)

    def _data_version(self) -> int | None:
        """Changes when another connection commits (this connection's own commits do not change it)."""
        try:
            with self._reading() as tx:
                row = tx.one("PRAGMA data_version")
        except StorageError:
            return None  # unreadable now: compares unequal later, which yields a harmless None
        assert row is not None
        return int(row[0])

    # ----------------------------------------------------------------------------------------------------------
    # artifacts and code files: files beside the database

    def put_artifact(self, sha256: str, size_bytes: int, source: Path, manifest: dict[str, Any], *,
                     suffix: str) -> None:
        target = self.artifacts_dir / f"{sha256}{suffix}"
        moved = False
        if not target.is_file():
            try:
                self.artifacts_dir.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            except OSError as error:
                raise file_storage_error(error, "storing the artifact") from None
            moved = True
        try:
            with self._transaction() as tx:
                tx.run("INSERT INTO artifacts (sha256, size_bytes, path, manifest, created_at)"
                       " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                       (sha256, size_bytes, str(target), json.dumps(manifest, allow_nan=False), time.time()))
        except StorageError:  # no record refers to the file: it must not stay (507/503 say nothing was stored)
            if moved:
                target.unlink(missing_ok=True)
            raise

    def get_artifact(self, sha256: str) -> ArtifactRecord | None:
        with self._reading() as tx:
            row = tx.one("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,))
        if row is None:
            return None
        path = Path(row["path"])
        return ArtifactRecord(row["sha256"], row["size_bytes"], json.loads(row["manifest"]), path.suffix,
                              present=path.is_file())

    def materialise_artifact(self, sha256: str, dest_dir: Path) -> Path | None:
        """The stored file itself (already local); dest_dir is not needed."""
        with self._reading() as tx:
            row = tx.one("SELECT path FROM artifacts WHERE sha256 = ?", (sha256,))
        if row is None or not Path(row["path"]).is_file():
            return None
        return Path(row["path"])

    def _code_path(self, sha256: str) -> Path:
        return self.artifacts_dir / f"code-{sha256}.py"

    def put_code(self, sha256: str, code: bytes) -> None:
        target = self._code_path(sha256)
        if not target.is_file():
            write_file_atomically(target, code)

    def materialise_code(self, sha256: str, dest_dir: Path) -> Path | None:
        target = self._code_path(sha256)
        return target if target.is_file() else None
