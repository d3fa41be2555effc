"""The job logic of both stores, written once in the SQL that SQLite and PostgreSQL both speak.

A backend supplies connections and transactions (`_transaction`, `_reading`), the database clock (`_now`), the
change announcement made inside a writing transaction (`_notify`), and its row-locking clauses. Statements use
`?` placeholders; the Postgres backend translates them.

Concurrency: in SQLite a write transaction (BEGIN IMMEDIATE) holds the database's one write lock, so the clauses
are empty. In PostgreSQL every read-modify-write of a job first locks its row (`FOR UPDATE`), which also keeps
event numbers 0, 1, 2, ... without gaps or duplicates; claims and lease expiry skip rows other nodes hold
(`FOR UPDATE SKIP LOCKED`), so concurrent workers never get the same job and never wait for each other.

Leases: a claim with a lease sets `lease_expires_at = now + lease` on the database clock; the holder renews it.
A lease that ran out is still held until someone calls `expire_leases`: expiry is an action under the row lock,
so exactly one of "the late worker's write" and "the requeue" wins. A running job without a lease counts as
expired (no job may stay running forever); a claim without `lease_seconds` is only for a store on which no one
calls `expire_leases` (the single-machine service, where `mark_interrupted` covers a crash).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from service.api.storage import (
    ACTIVE_STATUSES,
    CANCELLED,
    CANCELLED_WHILE_QUEUED,
    COMPLETED,
    FAILED,
    INTERRUPTED_REASON,
    QUEUED,
    RUNNING,
    TERMINAL_STATUSES,
    WORKER_LOST_REASON,
    CapacityReached,
    JobRecord,
    LeaseLost,
    LeaseState,
    StoredEvent,
    canonical_json,
    service_error_event,
)

Row = Mapping[str, Any]


class Tx(Protocol):
    """Statements inside one transaction (or, for `_reading`, single autocommitted reads)."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> None: ...


class SqlJobs:
    """Jobs and events over a backend's transactions. Subclasses set the locking clauses and the hooks."""

    _for_update = ""  # appended to a SELECT of rows the transaction will change
    _skip_locked = ""  # ... of rows to take only if no one else holds them

    def _transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _reading(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _now(self, tx: Tx) -> float:
        raise NotImplementedError

    def _lock_admissions(self, tx: Tx) -> None:
        """Serialise capacity-checked inserts until the transaction ends (SQLite's write lock already does)."""

    def _notify(self, tx: Tx, job_id: str) -> None:
        """Announce a change of `job_id` to every process once the transaction commits."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # jobs

    def create_job(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None = None,
                   first_event: Callable[[JobRecord, int], dict[str, Any]] | None = None,
                   max_active: int | None = None) -> JobRecord:
        """Insert a queued job, and its first event (built from the new record and its queue position) in the same
        transaction. With `max_active`: only while fewer jobs are queued or running, else CapacityReached."""
        job_id = uuid.uuid4().hex[:16]
        with self._transaction() as tx:
            if max_active is not None:
                self._lock_admissions(tx)
                active = tx.one("SELECT COUNT(*) AS n FROM jobs WHERE status IN (?, ?)", ACTIVE_STATUSES)
                assert active is not None
                if int(active["n"]) >= max_active:
                    raise CapacityReached(int(active["n"]))
            now = self._now(tx)
            row = tx.one("INSERT INTO jobs (id, artifact_sha256, options, status, created_at, owner)"
                         " VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
                         (job_id, artifact_sha256, canonical_json(options), QUEUED, now, owner))
            assert row is not None
            job = job_from_row(row)
            if first_event is not None:
                ahead = tx.one("SELECT COUNT(*) AS n FROM jobs WHERE status = ? AND created_at < ?",
                               (QUEUED, job.created_at))
                assert ahead is not None
                self._append(tx, job_id, first_event(job, int(ahead["n"]) + 1), now)
            self._notify(tx, job_id)
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._reading() as tx:
            row = tx.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else job_from_row(row)

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
        with self._reading() as tx:
            rows = tx.all(query, params)
        return [job_from_row(row) for row in rows]

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
        with self._reading() as tx:
            row = tx.one(query, params)
        return None if row is None else job_from_row(row)

    def count_by_status(self) -> dict[str, int]:
        with self._reading() as tx:
            rows = tx.all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: int(row["n"]) for row in rows}

    def count_active_jobs(self) -> int:
        counts = self.count_by_status()
        return sum(counts.get(status, 0) for status in ACTIVE_STATUSES)

    def queue_position(self, job: JobRecord) -> int | None:
        """1 for the next job to start, None when the job is not waiting."""
        if job.status != QUEUED:
            return None
        with self._reading() as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM jobs WHERE status = ? AND created_at < ?",
                         (QUEUED, job.created_at))
        assert row is not None
        return int(row["n"]) + 1

    def running_jobs(self) -> list[JobRecord]:
        with self._reading() as tx:
            rows = tx.all("SELECT * FROM jobs WHERE status = ?", (RUNNING,))
        return [job_from_row(row) for row in rows]

    # ----------------------------------------------------------------------------------------------------------
    # claims and leases

    def claim_next_queued(self, worker_id: str | None = None, lease_seconds: float | None = None
                          ) -> JobRecord | None:
        """Move the oldest queued job to running for `worker_id` and return it (first in, first out; a requeued
        job keeps its place). With `lease_seconds` the claim lasts that long unless renewed (renew_lease)."""
        with self._transaction() as tx:
            now = self._now(tx)
            row = tx.one(
                "UPDATE jobs SET status = ?, started_at = ?, worker_id = ?, lease_expires_at = ?,"
                " attempts = attempts + 1 WHERE id = (SELECT id FROM jobs WHERE status = ?"
                f" ORDER BY created_at, rowid LIMIT 1{self._skip_locked}) AND status = ? RETURNING *",
                (RUNNING, now, worker_id, None if lease_seconds is None else now + lease_seconds, QUEUED, QUEUED),
            )
            if row is not None:
                self._notify(tx, row["id"])
        return None if row is None else job_from_row(row)

    def renew_lease(self, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState:
        with self._transaction() as tx:
            now = self._now(tx)
            row = tx.one("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND worker_id = ? AND status = ?"
                         " RETURNING cancel_requested", (now + lease_seconds, job_id, worker_id, RUNNING))
        if row is None:
            return LeaseState.LOST
        return LeaseState.CANCEL_REQUESTED if row["cancel_requested"] else LeaseState.HELD

    def expire_leases(self, requeue_limit: int) -> list[tuple[str, str]]:
        """End every lease that ran out: the job goes back to the queue while it was claimed at most
        `requeue_limit` times, else it fails with `worker lost`; a job whose cancel was requested is cancelled.
        A running job without a lease (claimed without one, or from before leases) counts as expired: no job
        stays running forever. Safe to call from every node at once (each expired job is handled by one)."""
        outcomes = []
        with self._transaction() as tx:
            now = self._now(tx)
            rows = tx.all("SELECT * FROM jobs WHERE status = ? AND (lease_expires_at IS NULL OR lease_expires_at < ?)"
                          f" ORDER BY created_at{self._skip_locked}", (RUNNING, now))
            for row in rows:
                job = job_from_row(row)
                lost = {"worker_id": job.worker_id, "attempt": job.attempts, "lease_expired_s_ago":
                        None if job.lease_expires_at is None else round(now - job.lease_expires_at, 3)}
                message = f"worker {job.worker_id} stopped renewing its lease"
                if job.cancel_requested:
                    reason = "cancelled by request; the worker running it was lost"
                    self._finish(tx, job.id, now, CANCELLED, service_error_event("cancelled", reason, **lost),
                                 reason, None)
                    outcomes.append((job.id, "cancelled"))
                elif job.attempts <= requeue_limit:
                    self._append(tx, job.id, {"type": "requeued", "source": "service", "reason": WORKER_LOST_REASON,
                                              "message": f"{message}; the job is queued again", **lost}, now)
                    tx.run("UPDATE jobs SET status = ?, worker_id = NULL, lease_expires_at = NULL,"
                           " started_at = NULL WHERE id = ?", (QUEUED, job.id))
                    self._notify(tx, job.id)
                    outcomes.append((job.id, "requeued"))
                else:
                    event = service_error_event("worker_lost", WORKER_LOST_REASON, message=message, **lost)
                    self._finish(tx, job.id, now, FAILED, event, WORKER_LOST_REASON, None)
                    outcomes.append((job.id, "failed"))
        return outcomes

    # ----------------------------------------------------------------------------------------------------------
    # ending jobs

    def finish_job(self, job_id: str, *, status: str, terminal_event: dict[str, Any], reason: str | None = None,
                   log_tail: str | None = None, worker_id: str | None = None) -> JobRecord:
        """Append the terminal event and set the final status in one transaction; a retried finish after one
        that did land adds nothing.

        Followers read the status before the events, so seeing a terminal status guarantees that every event,
        the terminal one included, is already readable. With `worker_id`, an active job is finished only while
        that worker holds it (else nothing is written and LeaseLost is raised); a terminal job is returned
        unchanged whoever asks (compare its worker_id and result to learn whose outcome it holds).
        """
        assert status in TERMINAL_STATUSES
        with self._transaction() as tx:
            row = self._locked_job(tx, job_id)
            if row["status"] not in TERMINAL_STATUSES:
                if worker_id is not None and row["worker_id"] != worker_id:
                    raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
                self._finish(tx, job_id, self._now(tx), status, terminal_event, reason, log_tail)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Queued: cancelled at once. Running: flagged (its worker sees it at its next lease renewal, kills the
        evaluator and finishes the job). Terminal: unchanged. None for an unknown job."""
        with self._transaction() as tx:
            row = tx.one(f"SELECT * FROM jobs WHERE id = ?{self._for_update}", (job_id,))
            if row is None:
                return None
            if row["status"] == QUEUED:
                self._finish(tx, job_id, self._now(tx), CANCELLED,
                             service_error_event("cancelled", CANCELLED_WHILE_QUEUED), CANCELLED_WHILE_QUEUED, None)
            elif row["status"] == RUNNING and not row["cancel_requested"]:
                tx.run("UPDATE jobs SET cancel_requested = ? WHERE id = ?", (True, job_id))
                self._notify(tx, job_id)
        return self.get_job(job_id)

    def mark_interrupted(self) -> list[str]:
        """At start of a single-machine service: no job may stay queued or running from a previous process,
        which is gone. (A cluster never calls this: its workers' jobs end through expire_leases.)"""
        with self._reading() as tx:
            rows = tx.all("SELECT id FROM jobs WHERE status IN (?, ?)", ACTIVE_STATUSES)
        job_ids = [row["id"] for row in rows]
        for job_id in job_ids:
            message = "the service stopped while this job was queued or running"
            self.finish_job(job_id, status=FAILED, reason=INTERRUPTED_REASON,
                            terminal_event=service_error_event(INTERRUPTED_REASON, INTERRUPTED_REASON,
                                                               message=message))
        return job_ids

    def _finish(self, tx: Tx, job_id: str, now: float, status: str, terminal_event: dict[str, Any],
                reason: str | None, log_tail: str | None) -> None:
        self._append(tx, job_id, terminal_event, now)
        tx.run("UPDATE jobs SET status = ?, reason = ?, result = ?, log_tail = ?, finished_at = ?,"
               " lease_expires_at = NULL WHERE id = ?",
               (status, reason, json.dumps(terminal_event, allow_nan=False), log_tail, now, job_id))
        self._notify(tx, job_id)

    def _locked_job(self, tx: Tx, job_id: str) -> Row:
        row = tx.one(f"SELECT status, worker_id FROM jobs WHERE id = ?{self._for_update}", (job_id,))
        if row is None:
            raise LookupError(f"no job {job_id}")
        return row

    # ----------------------------------------------------------------------------------------------------------
    # events

    def append_event(self, job_id: str, event: dict[str, Any], worker_id: str | None = None) -> int:
        """Store the job's next event; its sequence number. With `worker_id`, only while that worker holds the
        running job (else nothing is written and LeaseLost is raised)."""
        with self._transaction() as tx:
            row = self._locked_job(tx, job_id)
            if worker_id is not None and (row["worker_id"] != worker_id or row["status"] != RUNNING):
                raise LeaseLost(f"job {job_id} is no longer held by worker {worker_id}")
            seq = self._append(tx, job_id, event, self._now(tx))
            self._notify(tx, job_id)
        return seq

    def _append(self, tx: Tx, job_id: str, event: dict[str, Any], now: float) -> int:
        """Under the job's row lock (Postgres) or the write lock (SQLite), so the next number is free."""
        row = tx.one("SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM events WHERE job_id = ?", (job_id,))
        assert row is not None
        next_seq = int(row["next"])
        tx.run("INSERT INTO events (job_id, seq, type, body, created_at) VALUES (?, ?, ?, ?, ?)",
               (job_id, next_seq, str(event.get("type")), json.dumps(event, allow_nan=False), now))
        return next_seq

    def events_after(self, job_id: str, after_seq: int, *, limit: int = 500) -> list[StoredEvent]:
        """The job's events with seq > after_seq, oldest first, as stored JSON text."""
        with self._reading() as tx:
            rows = tx.all("SELECT seq, type, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                          (job_id, after_seq, limit))
        return [StoredEvent(int(row["seq"]), row["type"], row["body"]) for row in rows]

    def last_event_of_type(self, job_id: str, event_type: str) -> dict[str, Any] | None:
        with self._reading() as tx:
            row = tx.one("SELECT body FROM events WHERE job_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
                         (job_id, event_type))
        return None if row is None else json.loads(row["body"])


def job_from_row(row: Row) -> JobRecord:
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
        worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"],
        attempts=int(row["attempts"]),
        cancel_requested=bool(row["cancel_requested"]),
    )


def split_statements(script: str) -> Iterator[str]:
    """The statements of a migration script (no `;` inside them), for backends that run one at a time."""
    for statement in script.split(";"):
        if statement.strip():
            yield statement.strip()
