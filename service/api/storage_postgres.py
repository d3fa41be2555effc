"""The PostgreSQL store (PGOLF_DATABASE_URL=postgresql://...): one database that API nodes and workers on any
number of machines share, through psycopg 3.

What lives where: jobs, events, artifacts and code files are all rows. Artifacts are `bytea` (content-addressed
by sha256, one row each, written once) rather than files in an object-store directory, because (1) workers and
API nodes share no filesystem, and a directory every node can write would be one more service to deploy and
secure; (2) an artifact is at most 16,000,000 bytes, far below bytea's 1 GB, and its column is stored EXTERNAL
(out of line, uncompressed: the bytes are already compressed), so rows stay small to scan; (3) one `pg_dump` is
the whole backup, and an artifact can never be missing for a job that refers to it (a foreign key guards it).
A worker materialises an artifact once into its local directory, checking its sha256.

Blocking is bounded: the API calls the store from its event loop thread, one connection per store guarded by a
lock (every statement is short). Connecting waits at most `CONNECT_TIMEOUT_SECONDS`; each statement runs under
`statement_timeout`, row-lock waits under `lock_timeout`, a transaction left idle is ended by the server
(`idle_in_transaction_session_timeout`), and `tcp_user_timeout` plus keep-alives end a connection whose peer
vanished (a server or network that stops answering). Whatever goes wrong surfaces as `StorageUnavailable`
(disk full on the server: `StorageFull`), never a hang; the broken connection is dropped and the next call opens
a new one, and a read that meets a connection broken since its last use is retried once on a fresh one.

Concurrency: claims and lease expiry use `FOR UPDATE SKIP LOCKED`; every other job write locks its row first
(see storage_sql.py). Lease times come from the database's clock (`clock_timestamp()`), never the nodes'.

Change notifications: every writing transaction calls `pg_notify('pgolf_jobs', job_id)`, delivered only if it
commits. `changes()` listens on a dedicated connection, and after a lost connection reconnects (with backoff)
and yields None ("anything may have changed").

Schema migrations: numbered steps, each in one transaction under an advisory lock (nodes starting at once apply
each step exactly once), recorded in `schema_version`; a database migrated by a newer pgolf is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from service.api.storage import (
    ArtifactRecord,
    SchemaTooNew,
    StorageError,
    StorageFull,
    StorageUnavailable,
    write_file_atomically,
)
from service.api.storage_sql import Row, SqlJobs, split_statements

CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 5_000
BULK_STATEMENT_TIMEOUT_MS = 60_000  # moving a 16 MB artifact over a slow link
LOCK_TIMEOUT_MS = 2_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
TCP_USER_TIMEOUT_MS = 5_000
CHANNEL = "pgolf_jobs"
MIGRATION_LOCK = 0x70676F6C66  # "pgolf": the advisory lock that serialises migrations across nodes
ADMISSION_LOCK = MIGRATION_LOCK + 1  # ... and the one that serialises capacity-checked job inserts
LISTEN_BACKOFF_MAX_SECONDS = 5.0
log = logging.getLogger("pgolf.service")

_SCHEMA_V1 = """
CREATE TABLE artifacts (
    sha256 TEXT PRIMARY KEY,
    size_bytes BIGINT NOT NULL,
    suffix TEXT NOT NULL,
    manifest TEXT NOT NULL,
    content BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE artifacts ALTER COLUMN content SET STORAGE EXTERNAL;
CREATE TABLE code_files (
    sha256 TEXT PRIMARY KEY,
    content BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE jobs (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id TEXT PRIMARY KEY,
    artifact_sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    result TEXT,
    log_tail TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    owner TEXT,
    worker_id TEXT,
    lease_expires_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX jobs_by_artifact ON jobs(artifact_sha256, options);
CREATE INDEX jobs_by_status ON jobs(status, created_at);
CREATE INDEX jobs_by_lease ON jobs(status, lease_expires_at);
CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""

# (version, what it does, SQL). Append only: a released step never changes. (`jobs.rowid` is the insertion
# order, the name SQLite gives its implicit one, so the shared SQL orders both stores the same way.)
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "artifacts, code files, jobs with leases, events", _SCHEMA_V1),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def storage_error(error: psycopg.Error) -> StorageError | None:
    """The service's name for a PostgreSQL failure; None for errors that are bugs, not outages."""
    if isinstance(error, psycopg.errors.DiskFull):
        return StorageFull(f"the job database's storage is full ({_first_line(error)})")
    if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        # Connection failures, statement/lock timeouts, server shutdown, deadlocks and serialisation failures.
        return StorageUnavailable(f"the job database is unavailable ({_first_line(error)})")
    return None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _connect_kwargs() -> dict[str, Any]:
    return {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "application_name": "pgolf",
    }


class _PgTx:
    def __init__(self, store: PostgresStore, connection: psycopg.Connection[Any], *, reading: bool) -> None:
        self._store = store
        self._connection = connection
        self._reading = reading

    def _execute(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        query = sql.replace("?", "%s")
        try:
            return self._connection.execute(query, params)
        except psycopg.OperationalError:
            # A read on a connection that broke while idle (the server restarted) is retried once on a new one;
            # inside a transaction the caller's retry decides.
            if not self._reading or not self._connection.broken:
                raise
            self._store._drop_connection()
            self._connection = self._store._connection()
            return self._connection.execute(query, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._execute(sql, params)


class PostgresStore(SqlJobs):
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._migrate()

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one (called under the lock)."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop_connection()
        timeouts = (f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
                    f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}")
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, options=timeouts,
                                         **_connect_kwargs())
        except psycopg.Error as error:
            raise StorageUnavailable(f"cannot connect to the job database ({_first_line(error)})") from None
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def _migrate(self) -> None:
        for version, description, script in [(0, "", ""), *MIGRATIONS]:
            with self._transaction() as tx:
                tx.run("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
                tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                       " description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
                row = tx.one("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
                assert row is not None
                current = int(row["v"])
                if current > SCHEMA_VERSION:
                    raise SchemaTooNew(
                        f"the job database has schema version {current}, newer than this pgolf's {SCHEMA_VERSION}: "
                        f"a newer pgolf migrated it. Run that version (or a newer one) on every node, or restore "
                        f"a backup taken before the upgrade; nothing was changed.")
                if script and current < version:
                    for statement in split_statements(script):
                        tx.run(statement)
                    tx.run("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                           (version, description, self._now(tx)))

    def schema_version(self) -> int:
        with self._reading() as tx:
            row = tx.one("SELECT MAX(version) AS v FROM schema_version")
        assert row is not None
        return int(row["v"])

    # ----------------------------------------------------------------------------------------------------------
    # the backend hooks of SqlJobs

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_PgTx]:
        with self._lock:
            connection = self._connection()
            try:
                with connection.transaction():
                    yield _PgTx(self, connection, reading=False)
            except psycopg.Error as error:
                self._fail(error)
                raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[_PgTx]:
        with self._lock:
            try:
                yield _PgTx(self, self._connection(), reading=True)
            except psycopg.Error as error:
                self._fail(error)
                raise

    def _fail(self, error: psycopg.Error) -> None:
        """Raise the service's error for `error` (and drop a broken connection); return for a plain bug."""
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self._drop_connection()
        mapped = storage_error(error)
        if mapped is not None:
            raise mapped from None

    def _now(self, tx: Any) -> float:
        row = tx.one("SELECT extract(epoch FROM clock_timestamp())::float8 AS now")
        return float(row["now"])

    def _lock_admissions(self, tx: Any) -> None:
        tx.run("SELECT pg_advisory_xact_lock(?)", (ADMISSION_LOCK,))

    def _notify(self, tx: Any, job_id: str) -> None:
        tx.run("SELECT pg_notify(?, ?)", (CHANNEL, job_id))

    async def changes(self) -> AsyncIterator[str | None]:
        delay, missed = 0.1, False
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **_connect_kwargs())
            except psycopg.Error as error:
                log.warning("change listener: cannot connect (%s); retrying in %.1f s", _first_line(error), delay)
                missed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_BACKOFF_MAX_SECONDS)
                continue
            try:
                await connection.execute(f"LISTEN {CHANNEL}")
                delay = 0.1
                if missed:  # notifications sent while no one listened are gone: everything may have changed
                    missed = False
                    yield None
                async for notification in connection.notifies():
                    yield notification.payload
            except psycopg.Error as error:
                log.warning("change listener: connection lost (%s); reconnecting", _first_line(error))
                missed = True
            finally:
                with contextlib.suppress(Exception):
                    await connection.close()

    # ----------------------------------------------------------------------------------------------------------
    # artifacts and code files: bytea rows, materialised on demand

    @contextlib.contextmanager
    def _bulk_transaction(self) -> Iterator[_PgTx]:
        with self._transaction() as tx:
            tx.run(f"SET LOCAL statement_timeout = {BULK_STATEMENT_TIMEOUT_MS}")
            yield tx

    def put_artifact(self, sha256: str, size_bytes: int, source: Path, manifest: dict[str, Any], *,
                     suffix: str) -> None:
        data = source.read_bytes()
        _check_content(data, sha256, size_bytes)
        with self._bulk_transaction() as tx:
            tx.run("INSERT INTO artifacts (sha256, size_bytes, suffix, manifest, content, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                   (sha256, size_bytes, suffix, json.dumps(manifest, allow_nan=False), data, self._now(tx)))

    def get_artifact(self, sha256: str) -> ArtifactRecord | None:
        with self._reading() as tx:
            row = tx.one("SELECT sha256, size_bytes, suffix, manifest FROM artifacts WHERE sha256 = ?", (sha256,))
        if row is None:
            return None
        return ArtifactRecord(row["sha256"], int(row["size_bytes"]), json.loads(row["manifest"]), row["suffix"])

    def materialise_artifact(self, sha256: str, dest_dir: Path) -> Path | None:
        """dest_dir/<sha256><suffix>, written (atomically, its sha256 checked) unless a correct copy is there."""
        record = self.get_artifact(sha256)
        if record is None:
            return None
        return self._materialise("artifacts", sha256, dest_dir / f"{sha256}{record.suffix}")

    def put_code(self, sha256: str, code: bytes) -> None:
        _check_content(code, sha256, len(code))
        with self._bulk_transaction() as tx:
            tx.run("INSERT INTO code_files (sha256, content, created_at) VALUES (?, ?, ?)"
                   " ON CONFLICT (sha256) DO NOTHING", (sha256, code, self._now(tx)))

    def materialise_code(self, sha256: str, dest_dir: Path) -> Path | None:
        return self._materialise("code_files", sha256, dest_dir / f"code-{sha256}.py")

    def _materialise(self, table: str, sha256: str, target: Path) -> Path | None:
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
            return target
        with self._bulk_transaction() as tx:
            row = tx.one(f"SELECT content FROM {table} WHERE sha256 = ?", (sha256,))
        if row is None:
            return None
        data = bytes(row["content"])
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StorageError(f"the stored bytes of {target.name} do not match their sha256; the row is damaged")
        write_file_atomically(target, data)
        return target


def _check_content(data: bytes, sha256: str, size_bytes: int) -> None:
    """Content addressing is only as good as the address: the bytes must be what the caller says they are."""
    if len(data) != size_bytes or hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"the bytes given for {sha256} ({len(data)} bytes) do not have that sha256 and size")
