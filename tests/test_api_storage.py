"""Both stores, one suite: job life cycle, event order, reuse lookup, what a restart finds, artifacts and code in
the store, claims with leases, guarded writes, cancel, lease expiry, and change notifications between two store
instances (two nodes). Every test runs on SQLite and on a real PostgreSQL server (tests/postgres_server.py);
the concurrency and outage tests use real threads and a real server stop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.api.settings import Settings, SettingsError
from service.api.storage import (
    CANCELLED,
    COMPLETED,
    FAILED,
    INTERRUPTED_REASON,
    QUEUED,
    RUNNING,
    WORKER_LOST_REASON,
    CapacityReached,
    LeaseLost,
    LeaseState,
    SchemaTooNew,
    StorageFull,
    StorageUnavailable,
    Store,
    open_store,
)
from service.api.storage_sqlite import SqliteStore
from tests.postgres_server import PostgresServer

T = TypeVar("T")

OPTIONS = {"ttt": False, "ngram": "off", "max_seconds": 600.0}
ARTIFACT = b"pretend artifact bytes " * 100
SHA = hashlib.sha256(ARTIFACT).hexdigest()
MANIFEST = {"tokenizer": {"sha256": "t", "vocab_size": 1024}}


class Backend:
    """Opens stores on one database: a second instance is a second node (or the store after a restart)."""

    def __init__(self, name: str, opener: Callable[[], Store], tmp_path: Path) -> None:
        self.name = name
        self._opener = opener
        self.tmp_path = tmp_path
        self.opened: list[Store] = []

    def open(self) -> Store:
        store = self._opener()
        self.opened.append(store)
        return store

    def open_with_artifact(self) -> Store:
        store = self.open()
        source = self.tmp_path / f"upload-{len(self.opened)}.part"
        source.write_bytes(ARTIFACT)
        store.put_artifact(SHA, len(ARTIFACT), source, MANIFEST, suffix=".pgolf")
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        def opener() -> Store:
            return SqliteStore(tmp_path / "storage" / "service.sqlite3")
    else:
        url = request.getfixturevalue("postgres_url")

        def opener() -> Store:
            from service.api.storage_postgres import PostgresStore

            return PostgresStore(url)
    chosen = Backend(request.param, opener, tmp_path)
    yield chosen
    for store in chosen.opened:
        store.close()


def test_job_life_cycle_and_events(backend: Backend) -> None:
    store = backend.open_with_artifact()
    first = store.create_job(SHA, OPTIONS)
    second = store.create_job(SHA, {**OPTIONS, "ttt": True})
    assert (store.queue_position(first), store.queue_position(second)) == (1, 2)

    claimed = store.claim_next_queued()
    assert claimed is not None and claimed.id == first.id and claimed.status == RUNNING
    assert (claimed.attempts, claimed.worker_id, claimed.lease_expires_at) == (1, None, None)
    assert store.queue_position(store.get_job(second.id)) == 1  # type: ignore[arg-type]
    assert store.append_event(first.id, {"type": "start"}) == 0
    assert store.append_event(first.id, {"type": "chunk", "index": 0}) == 1
    done = store.finish_job(first.id, status=COMPLETED, terminal_event={"type": "end", "val_bpb": 1.25})
    assert done.status == COMPLETED and done.result == {"type": "end", "val_bpb": 1.25}

    events = store.events_after(first.id, -1)
    assert [(e.seq, e.type) for e in events] == [(0, "start"), (1, "chunk"), (2, "end")]
    assert json.loads(events[1].body) == {"type": "chunk", "index": 0}
    assert [e.seq for e in store.events_after(first.id, 1)] == [2]
    assert store.last_event_of_type(first.id, "chunk") == {"type": "chunk", "index": 0}
    assert store.count_by_status() == {COMPLETED: 1, QUEUED: 1}
    assert [job.id for job in store.list_jobs(limit=10)] == [second.id, first.id]
    assert [job.id for job in store.running_jobs()] == []


def test_first_event_is_written_with_the_job(backend: Backend) -> None:
    store = backend.open_with_artifact()
    store.create_job(SHA, OPTIONS)
    job = store.create_job(SHA, OPTIONS, owner="alice",
                           first_event=lambda job, position: {"type": "queued", "job_id": job.id, "position": position})
    assert job.owner == "alice" and [j.id for j in store.list_jobs(limit=5, owner="alice")] == [job.id]
    (event,) = store.events_after(job.id, -1)
    assert json.loads(event.body) == {"type": "queued", "job_id": job.id, "position": 2}


def test_reuse_only_finished_or_active_jobs_with_equal_options(backend: Backend) -> None:
    store = backend.open_with_artifact()
    failed = store.create_job(SHA, OPTIONS)
    store.finish_job(failed.id, status=FAILED, reason="boom", terminal_event={"type": "error"})
    assert store.find_reusable_job(SHA, OPTIONS) is None

    good = store.create_job(SHA, OPTIONS)
    store.finish_job(good.id, status=COMPLETED, terminal_event={"type": "end"})
    reordered = {"max_seconds": 600.0, "ngram": "off", "ttt": False}  # key order must not matter
    assert store.find_reusable_job(SHA, reordered).id == good.id  # type: ignore[union-attr]
    assert store.find_reusable_job(SHA, {**OPTIONS, "ngram": "exact"}) is None


def test_restart_keeps_history_and_fails_interrupted_jobs(backend: Backend) -> None:
    store = backend.open_with_artifact()
    finished = store.create_job(SHA, OPTIONS)
    store.finish_job(finished.id, status=COMPLETED, terminal_event={"type": "end", "val_bpb": 1.0})
    running = store.create_job(SHA, OPTIONS)
    store.claim_next_queued()
    store.append_event(running.id, {"type": "start"})
    queued = store.create_job(SHA, OPTIONS)
    store.close()

    reopened = backend.open()
    assert sorted(reopened.mark_interrupted()) == sorted([running.id, queued.id])
    for job_id in (running.id, queued.id):
        job = reopened.get_job(job_id)
        assert job is not None and job.status == FAILED and job.reason == INTERRUPTED_REASON
        assert reopened.events_after(job_id, -1)[-1].type == "error"  # followers see an end to the stream
    assert reopened.get_job(finished.id).result == {"type": "end", "val_bpb": 1.0}  # type: ignore[union-attr]
    assert reopened.get_artifact(SHA).size_bytes == len(ARTIFACT)  # type: ignore[union-attr]
    assert reopened.mark_interrupted() == []


def test_artifacts_and_code_live_in_the_store(backend: Backend, tmp_path: Path) -> None:
    store = backend.open_with_artifact()
    record = store.get_artifact(SHA)
    assert record is not None and (record.size_bytes, record.manifest, record.suffix, record.present) == (
        len(ARTIFACT), MANIFEST, ".pgolf", True)
    worker_dir = tmp_path / "worker-cache"  # another machine's local directory
    path = store.materialise_artifact(SHA, worker_dir)
    assert path is not None and path.name == f"{SHA}.pgolf" and path.read_bytes() == ARTIFACT
    assert store.materialise_artifact(SHA, worker_dir) == path  # a correct copy is reused
    assert store.materialise_artifact("0" * 64, worker_dir) is None and store.get_artifact("0" * 64) is None

    again = tmp_path / "again.part"  # idempotent: the same bytes uploaded twice make one artifact
    again.write_bytes(ARTIFACT)
    store.put_artifact(SHA, len(ARTIFACT), again, MANIFEST, suffix=".pgolf")
    assert store.materialise_artifact(SHA, worker_dir).read_bytes() == ARTIFACT  # type: ignore[union-attr]

    code = b"print('train_gpt')\n"
    code_sha = hashlib.sha256(code).hexdigest()
    assert store.materialise_code(code_sha, worker_dir) is None
    store.put_code(code_sha, code)
    store.put_code(code_sha, code)
    code_path = store.materialise_code(code_sha, worker_dir)
    assert code_path is not None and code_path.read_bytes() == code and code_path.name == f"code-{code_sha}.py"
    if backend.name == "postgres":  # a damaged local copy is replaced, never used
        path.write_bytes(b"tampered")
        assert store.materialise_artifact(SHA, worker_dir).read_bytes() == ARTIFACT  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="sha256"):
            store.put_code("1" * 64, code)


def test_claim_with_lease_renewal_and_guarded_writes(backend: Backend) -> None:
    store = backend.open_with_artifact()
    job = store.create_job(SHA, OPTIONS)
    claimed = store.claim_next_queued("worker-a", 30.0)
    assert claimed is not None and claimed.id == job.id and claimed.worker_id == "worker-a"
    assert claimed.attempts == 1 and claimed.lease_expires_at is not None and claimed.started_at is not None
    assert 29.0 < claimed.lease_expires_at - claimed.started_at <= 30.5
    assert store.claim_next_queued("worker-b", 30.0) is None

    assert store.renew_lease(job.id, "worker-a", 60.0) is LeaseState.HELD
    renewed = store.get_job(job.id)
    assert renewed is not None and renewed.lease_expires_at > claimed.lease_expires_at + 25  # type: ignore[operator]
    assert store.renew_lease(job.id, "worker-b", 60.0) is LeaseState.LOST
    assert store.append_event(job.id, {"type": "start"}, worker_id="worker-a") == 0
    with pytest.raises(LeaseLost):
        store.append_event(job.id, {"type": "chunk"}, worker_id="worker-b")
    with pytest.raises(LeaseLost):
        store.finish_job(job.id, status=COMPLETED, terminal_event={"type": "end"}, worker_id="worker-b")
    assert [e.type for e in store.events_after(job.id, -1)] == ["start"]  # nothing of worker-b's was written

    done = store.finish_job(job.id, status=COMPLETED, terminal_event={"type": "end"}, worker_id="worker-a")
    assert done.status == COMPLETED and done.worker_id == "worker-a" and done.lease_expires_at is None
    again = store.finish_job(job.id, status=FAILED, terminal_event={"type": "error"}, worker_id="worker-a")
    assert again.status == COMPLETED  # a retried finish after one that landed adds nothing
    assert store.finish_job(job.id, status=FAILED, terminal_event={"type": "error"}, worker_id="worker-b") == again
    assert [e.type for e in store.events_after(job.id, -1)] == ["start", "end"]
    assert store.renew_lease(job.id, "worker-a", 60.0) is LeaseState.LOST  # the job is over


def test_expired_leases_are_requeued_then_failed(backend: Backend) -> None:
    store = backend.open_with_artifact()
    job = store.create_job(SHA, OPTIONS)
    held = store.create_job(SHA, OPTIONS)
    assert store.claim_next_queued("worker-a", 0.05).id == job.id  # type: ignore[union-attr]
    assert store.claim_next_queued("worker-c", 60).id == held.id  # type: ignore[union-attr]
    assert store.expire_leases(requeue_limit=1) == []  # not yet expired
    time.sleep(0.2)
    assert store.expire_leases(requeue_limit=1) == [(job.id, "requeued")]
    requeued = store.get_job(job.id)
    assert requeued is not None and requeued.status == QUEUED and requeued.worker_id is None
    assert store.queue_position(requeued) == 1
    event = json.loads(store.events_after(job.id, -1)[-1].body)
    assert (event["type"], event["reason"], event["worker_id"], event["attempt"]) == (
        "requeued", WORKER_LOST_REASON, "worker-a", 1)
    # The lost worker comes back: it learns so and can write nothing more.
    assert store.renew_lease(job.id, "worker-a", 30.0) is LeaseState.LOST
    with pytest.raises(LeaseLost):
        store.append_event(job.id, {"type": "chunk"}, worker_id="worker-a")
    with pytest.raises(LeaseLost):
        store.finish_job(job.id, status=COMPLETED, terminal_event={"type": "end"}, worker_id="worker-a")

    again = store.claim_next_queued("worker-b", 0.05)
    assert again is not None and again.id == job.id and again.attempts == 2
    time.sleep(0.2)
    assert store.expire_leases(requeue_limit=1) == [(job.id, "failed")]
    failed = store.get_job(job.id)
    assert failed is not None and failed.status == FAILED and failed.reason == WORKER_LOST_REASON
    assert failed.result is not None and failed.result["code"] == "worker_lost"
    assert [e.type for e in store.events_after(job.id, -1)] == ["requeued", "error"]
    assert store.get_job(held.id).status == RUNNING  # type: ignore[union-attr]  # renewed leases are kept
    assert store.expire_leases(requeue_limit=1) == []

    legacy = store.create_job(SHA, OPTIONS)  # running without a lease: never left running forever
    store.claim_next_queued()
    assert store.expire_leases(requeue_limit=0) == [(legacy.id, "failed")]


def test_cancel_queued_running_and_finished_jobs(backend: Backend) -> None:
    store = backend.open_with_artifact()
    running = store.create_job(SHA, OPTIONS)
    queued = store.create_job(SHA, OPTIONS)
    store.claim_next_queued("worker-a", 30.0)

    cancelled = store.request_cancel(queued.id)
    assert cancelled is not None and cancelled.status == CANCELLED and cancelled.reason == "cancelled while queued"
    assert store.events_after(queued.id, -1)[-1].type == "error"
    flagged = store.request_cancel(running.id)
    assert flagged is not None and flagged.status == RUNNING and flagged.cancel_requested
    assert store.renew_lease(running.id, "worker-a", 30.0) is LeaseState.CANCEL_REQUESTED
    store.finish_job(running.id, status=CANCELLED, terminal_event={"type": "error", "code": "cancelled"},
                     worker_id="worker-a")
    assert store.request_cancel(running.id).status == CANCELLED  # type: ignore[union-attr]  # terminal: unchanged
    assert store.request_cancel("no-such-job") is None

    orphan = store.create_job(SHA, OPTIONS)  # cancel requested, then its worker died: cancelled, not requeued
    store.claim_next_queued("worker-b", 0.05)
    store.request_cancel(orphan.id)
    time.sleep(0.2)
    assert store.expire_leases(requeue_limit=5) == [(orphan.id, "cancelled")]
    assert store.get_job(orphan.id).status == CANCELLED  # type: ignore[union-attr]


def _until_available(call: Callable[[], T]) -> T:
    """`call()`, retried while another node holds SQLite's write lock for a moment (StorageUnavailable)."""
    while True:
        try:
            return call()
        except StorageUnavailable:
            time.sleep(0.01)


def _run_concurrently(target: Callable[[Any], None], args: list[Any], *, timeout: float = 60) -> list[BaseException]:
    """`target(arg)` in one thread per arg, all at once; returns what the threads raised."""
    errors: list[BaseException] = []

    def guarded(arg: Any) -> None:
        try:
            target(arg)
        except BaseException as error:  # noqa: BLE001  (reported to the caller)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return errors


def test_concurrent_claims_take_each_job_exactly_once(backend: Backend) -> None:
    """Four nodes (store instances, each in its own thread) drain 40 jobs: no job twice, none missed."""
    first = backend.open_with_artifact()
    job_ids = {first.create_job(SHA, OPTIONS).id for _ in range(40)}
    nodes = [backend.open() for _ in range(4)]
    claims: list[list[str]] = [[] for _ in nodes]

    def drain(n: int) -> None:
        while True:
            job = _until_available(lambda: nodes[n].claim_next_queued(f"worker-{n}", 30.0))
            if job is not None:
                claims[n].append(job.id)
                nodes[n].append_event(job.id, {"type": "start"}, worker_id=f"worker-{n}")
            elif nodes[n].count_by_status().get(QUEUED, 0) == 0:
                return

    errors = _run_concurrently(drain, list(range(len(nodes))), timeout=120)
    assert not errors, errors
    everything = [job_id for claimed in claims for job_id in claimed]
    assert sorted(everything) == sorted(job_ids)  # each exactly once
    for n, claimed in enumerate(claims):
        for job_id in claimed:
            assert first.get_job(job_id).worker_id == f"worker-{n}"  # type: ignore[union-attr]


def test_capacity_holds_across_concurrent_admissions(backend: Backend) -> None:
    """Four API nodes admit at once against one bound: exactly the bound is admitted, the rest are refused."""
    first = backend.open_with_artifact()
    first.create_job(SHA, OPTIONS)
    first.claim_next_queued("worker-a", 30.0)  # running jobs count too
    nodes = [backend.open() for _ in range(4)]
    admitted: list[str] = []
    refused: list[int] = []

    def admit(store: Store) -> None:
        for _ in range(4):
            try:
                admitted.append(_until_available(lambda: store.create_job(SHA, OPTIONS, max_active=6)).id)
            except CapacityReached as error:
                refused.append(error.active_jobs)

    errors = _run_concurrently(admit, nodes)
    assert not errors, errors
    assert len(admitted) == 5 and refused == [6] * 11
    assert first.count_active_jobs() == 6


def test_concurrent_appends_number_events_without_gaps(backend: Backend) -> None:
    first = backend.open_with_artifact()
    job = first.create_job(SHA, OPTIONS)
    first.claim_next_queued("worker-a", 30.0)
    nodes = [backend.open() for _ in range(3)]

    def append(store: Store) -> None:
        for i in range(15):
            event = {"type": "chunk", "index": i}
            _until_available(lambda event=event: store.append_event(job.id, event, worker_id="worker-a"))

    errors = _run_concurrently(append, nodes)
    assert not errors, errors
    assert [e.seq for e in first.events_after(job.id, -1)] == list(range(45))


def test_concurrent_expiry_handles_each_job_once(backend: Backend) -> None:
    first = backend.open_with_artifact()
    job_ids = [first.create_job(SHA, OPTIONS).id for _ in range(10)]
    for n in range(10):
        first.claim_next_queued(f"worker-{n}", 0.05)
    time.sleep(0.2)
    nodes = [backend.open() for _ in range(3)]
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def expire(store: Store) -> None:
        for _ in range(50):
            found = _until_available(lambda: store.expire_leases(requeue_limit=1))
            with lock:
                outcomes.extend(found)

    errors = _run_concurrently(expire, nodes)
    assert not errors, errors
    assert sorted(outcomes) == sorted((job_id, "requeued") for job_id in job_ids)
    for job_id in job_ids:
        assert [e.type for e in first.events_after(job_id, -1)] == ["requeued"]


async def _next_change(changes: object, timeout: float = 5.0) -> str | None:
    return await asyncio.wait_for(changes.__anext__(), timeout)  # type: ignore[attr-defined]


def test_changes_reach_another_store_instance(backend: Backend) -> None:
    """Node A follows changes; node B writes. Postgres names the job (NOTIFY); SQLite notices another process's
    commit through data_version and says "re-read" (None). A's own writes always name the job."""
    node_a = backend.open_with_artifact()
    node_b = backend.open()

    async def scenario() -> None:
        changes = node_a.changes()
        try:
            pending = asyncio.ensure_future(_next_change(changes))
            await asyncio.sleep(0.5)  # the listener is connected (Postgres) and has read data_version (SQLite)
            job = node_b.create_job(SHA, OPTIONS)
            hint = await pending
            assert hint == (job.id if backend.name == "postgres" else None)
            node_a.append_event(job.id, {"type": "start"})
            assert await _next_change(changes) == job.id
            if backend.name == "postgres":  # a refused write announces nothing; the next change is the next hint
                other = node_b.create_job(SHA, OPTIONS)
                assert await _next_change(changes) == other.id
                with pytest.raises(LeaseLost):
                    node_b.append_event(job.id, {"type": "chunk"}, worker_id="nobody")
                node_b.request_cancel(other.id)
                assert await _next_change(changes) == other.id
        finally:
            await changes.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_cancelling_the_follower_task_stops_listening(backend: Backend) -> None:
    store = backend.open_with_artifact()

    def listeners() -> int:
        if isinstance(store, SqliteStore):
            return len(store._subscribers)
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as raw:  # type: ignore[attr-defined]
            return raw.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                               " AND datname = current_database()").fetchone()[0]

    async def scenario() -> None:
        seen: list[str | None] = []

        async def follow() -> None:
            async for change in store.changes():
                seen.append(change)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        job = store.create_job(SHA, OPTIONS)
        deadline = time.monotonic() + 5
        while job.id not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert job.id in seen and listeners() == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        deadline = time.monotonic() + 5
        while listeners() and time.monotonic() < deadline:  # a server backend exits a moment after its client
            await asyncio.sleep(0.05)
        assert listeners() == 0

    asyncio.run(scenario())


def test_a_newer_schema_is_refused(backend: Backend) -> None:
    store = backend.open_with_artifact()
    job = store.create_job(SHA, OPTIONS)
    if isinstance(store, SqliteStore):
        store.close()
        raw = sqlite3.connect(store.path)
        raw.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
        raw.commit()
        raw.close()
    else:
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as raw:  # type: ignore[attr-defined]
            raw.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        backend.open()
    if isinstance(store, SqliteStore):  # unchanged: the job is still there
        raw = sqlite3.connect(store.path)
        assert raw.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone() == (QUEUED,)
        raw.close()


def test_a_database_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    """The schema as pgolf wrote it before numbered migrations (and before users): history survives."""
    path = tmp_path / "service.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE artifacts (sha256 TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, path TEXT NOT NULL,
                                manifest TEXT NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE jobs (id TEXT PRIMARY KEY, artifact_sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
                           options TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, result TEXT, log_tail TEXT,
                           created_at REAL NOT NULL, started_at REAL, finished_at REAL);
        CREATE TABLE events (job_id TEXT NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL, type TEXT NOT NULL,
                             body TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (job_id, seq));
    """)
    artifact = tmp_path / "artifacts" / f"{'a' * 64}.pgolf"
    artifact.parent.mkdir()
    artifact.write_bytes(b"old bytes")
    old.execute("INSERT INTO artifacts VALUES (?, 9, ?, '{}', 1.0)", ("a" * 64, str(artifact)))
    old.execute("INSERT INTO jobs VALUES ('old-job', ?, '{}', 'completed', NULL, '{\"type\":\"end\"}', NULL,"
                " 2.0, 3.0, 4.0)", ("a" * 64,))
    old.execute("INSERT INTO events VALUES ('old-job', 0, 'start', '{\"type\":\"start\"}', 3.0)")
    old.execute("INSERT INTO events VALUES ('old-job', 1, 'end', '{\"type\":\"end\"}', 4.0)")
    old.commit()
    old.close()

    store = SqliteStore(path)
    assert store.schema_version() == 2
    job = store.get_job("old-job")
    assert job is not None and job.status == COMPLETED and job.owner is None and job.attempts == 0
    assert not job.cancel_requested and job.worker_id is None and job.result == {"type": "end"}
    assert [e.type for e in store.events_after("old-job", -1)] == ["start", "end"]
    assert store.materialise_artifact("a" * 64, tmp_path / "elsewhere") == artifact
    store.close()
    raw = sqlite3.connect(path)
    assert [row[0] for row in raw.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    raw.close()
    SqliteStore(path).close()  # opening again applies nothing


def test_the_database_url_picks_the_store(tmp_path: Path, postgres_url: str) -> None:
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    env = {"PGOLF_DATA_DIR": str(tmp_path), "PGOLF_STORAGE_DIR": str(tmp_path / "storage")}
    sqlite_store = open_store(Settings.from_env(env))
    assert isinstance(sqlite_store, SqliteStore)
    sqlite_store.close()
    postgres_store = open_store(Settings.from_env({**env, "PGOLF_DATABASE_URL": postgres_url}))
    assert type(postgres_store).__name__ == "PostgresStore" and postgres_store.count_by_status() == {}
    postgres_store.close()
    with pytest.raises(SettingsError, match="mysql"):
        Settings.from_env({**env, "PGOLF_DATABASE_URL": "mysql://db/pgolf"})


def test_a_postgres_outage_is_storage_unavailable_not_a_hang(postgres_server: PostgresServer, postgres_url: str,
                                                            tmp_path: Path) -> None:
    """The server stops mid-run: every call fails fast with StorageUnavailable; once it is back, the same store
    works again, and a change listener reconnects and says "re-read" (None)."""
    from service.api.storage_postgres import PostgresStore

    store = PostgresStore(postgres_url)
    source = tmp_path / "upload.part"
    source.write_bytes(ARTIFACT)
    store.put_artifact(SHA, len(ARTIFACT), source, MANIFEST, suffix=".pgolf")
    job = store.create_job(SHA, OPTIONS)

    async def scenario() -> None:
        changes = store.changes()
        try:
            pending = asyncio.ensure_future(_next_change(changes, timeout=60))
            await asyncio.sleep(0.5)
            postgres_server.stop()
            try:
                for call in (lambda: store.get_job(job.id), lambda: store.append_event(job.id, {"type": "x"}),
                             lambda: store.claim_next_queued("worker-a", 30.0)):
                    started = time.monotonic()
                    with pytest.raises(StorageUnavailable):
                        call()
                    assert time.monotonic() - started < 10
            finally:
                postgres_server.start()
            assert await pending is None  # the listener lost its connection, came back, and says "re-read"
        finally:
            await changes.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())
    assert store.get_job(job.id).status == QUEUED  # type: ignore[union-attr]  # the same store works again
    assert store.append_event(job.id, {"type": "back"}) == 0  # the write during the outage left nothing
    postgres_server.stop()  # a restart between two calls: the idle connection is dead, and a read survives it
    postgres_server.start()
    assert store.events_after(job.id, -1)[0].type == "back"
    store.close()


def test_a_full_postgres_disk_is_storage_full(postgres_server: PostgresServer, postgres_url: str,
                                              tmp_path: Path) -> None:
    """The artifacts table lives on a 2 MB tmpfs (a tablespace): a bigger artifact fills the server's disk, and
    the store says StorageFull (HTTP 507) with nothing written, then keeps working for everything else."""
    import os
    import pwd
    import subprocess

    import psycopg

    from service.api.storage_postgres import PostgresStore

    mount = postgres_server.root / f"small-disk-{tmp_path.name}"  # where the server's user can reach it
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        if postgres_server.run_as is not None:
            account = pwd.getpwnam(postgres_server.run_as)
            os.chown(mount, account.pw_uid, account.pw_gid)
        store = PostgresStore(postgres_url)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            tablespace = f"small_{os.getpid()}"
            admin.execute(f"CREATE TABLESPACE {tablespace} LOCATION '{mount}'")
            admin.execute(f"ALTER TABLE artifacts SET TABLESPACE {tablespace}")
        small = tmp_path / "small.part"
        small.write_bytes(ARTIFACT)
        store.put_artifact(SHA, len(ARTIFACT), small, MANIFEST, suffix=".pgolf")
        big = os.urandom(3_000_000)  # incompressible, and stored uncompressed anyway
        source = tmp_path / "big.part"
        source.write_bytes(big)
        with pytest.raises(StorageFull, match="full"):
            store.put_artifact(hashlib.sha256(big).hexdigest(), len(big), source, MANIFEST, suffix=".pgolf")
        assert store.get_artifact(hashlib.sha256(big).hexdigest()) is None
        assert store.create_job(SHA, OPTIONS).status == QUEUED  # the jobs live elsewhere: still writable
        store.close()
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # free the mount before unmounting
            admin.execute("ALTER TABLE artifacts SET TABLESPACE pg_default")
            admin.execute(f"DROP TABLESPACE {tablespace}")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()
