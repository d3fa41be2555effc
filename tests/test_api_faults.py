"""Faults around the service, each against a real uvicorn on 127.0.0.1: SIGTERM while everything is busy, a database
locked by another connection, a full disk (a size-limited tmpfs), a damaged database file, and a job left
running that no process holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    ADMIN_TOKEN,
    AUTH,
    REPO_ROOT,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    files_under,
    process_gone,
    service_data,
    set_fake_behaviour,
    tiny_artifact,
    upload,
    wait_for_status,
    write_tiny_artifact,
)

TERMINAL = {"completed", "failed", "timeout", "cancelled"}
SLOW = {"chunks": 400, "chunk_seconds": 0.1}
RETRY_SECONDS = 1.5


def child_with(process: ServiceProcess, marker: bytes) -> int:
    for pid in process.child_pids():
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no child process with {marker!r}")


def start_running_job(client: httpx.Client, artifact: Path) -> str:
    job_id = upload(client, artifact, params={"wait": "false", "force": "true"}).json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/evaluations/{job_id}").json()["progress"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job_id


def test_sigterm_stops_the_service_within_its_grace_whatever_is_in_flight(
    service_data: ServiceData, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    script = tmp_path / "behaviour.json"
    grace = 4.0
    process = ServiceProcess(tmp_path / "storage", service_data, **fake_evaluator_env(script),
                             PGOLF_SHUTDOWN_GRACE_SECONDS=str(grace), PGOLF_UPLOAD_MIN_BYTES_PER_SECOND="0")
    process.start()
    client = httpx.Client(base_url=process.url, headers=AUTH, timeout=60)
    set_fake_behaviour(script, **SLOW)
    job_id = start_running_job(client, tiny_artifact)
    evaluator = child_with(process, b"fake_evaluator")
    validator = child_with(process, b"service.api.validation")

    answers: dict[str, object] = {}

    def follow() -> None:  # a stream following the running job
        try:
            with httpx.stream("GET", f"{process.url}/evaluations/{job_id}/events", timeout=60) as response:
                answers["stream_lines"] = sum(1 for _ in response.iter_lines())
        except httpx.HTTPError as error:
            answers["stream_lines"] = repr(error)

    def stuck_upload() -> None:  # an upload whose validation never returns (the reader is stopped)
        try:
            answers["stuck"] = upload(client, other_artifact, params={"wait": "false"}).status_code
        except httpx.HTTPError as error:
            answers["stuck"] = repr(error)

    def slow_body() -> None:  # an upload whose body is half sent
        with socket.create_connection(("127.0.0.1", process.port), timeout=30) as raw:
            raw.sendall(b"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n"
                        b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n--b\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
            answers["half"] = answer.split(b"\r\n", 1)[0]

    threads = [threading.Thread(target=f, daemon=True) for f in (follow, slow_body)]
    for thread in threads:
        thread.start()
    os.kill(validator, signal.SIGSTOP)
    other_artifact = write_tiny_artifact(tmp_path / "other.pgolf", service_data.tokenizer, seed=1)
    stuck = threading.Thread(target=stuck_upload, daemon=True)
    stuck.start()
    time.sleep(1.0)

    assert process.process is not None
    sent = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    process.process.wait(grace + 5)
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.2f} s (grace {grace:g} s)")
    assert took <= grace + 1.0
    assert process_gone(evaluator) and process_gone(validator)
    for thread in (*threads, stuck):
        thread.join(10)
    assert answers["half"] == b"HTTP/1.1 503 Service Unavailable", answers  # refused, not left hanging
    assert answers["stuck"] == 503, answers
    assert isinstance(answers["stream_lines"], int), answers  # the follower's stream ended cleanly
    client.close()

    database = sqlite3.connect(tmp_path / "storage" / "service.sqlite3")
    status, reason = database.execute("SELECT status, reason FROM jobs WHERE id = ?", (job_id,)).fetchone()
    (last,) = database.execute("SELECT body FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT 1",
                               (job_id,)).fetchone()
    database.close()
    assert (status, reason) == ("failed", "interrupted")
    assert json.loads(last)["code"] == "interrupted"


@pytest.fixture()
def fault_service(service_data: ServiceData, tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path, httpx.Client]]:  # noqa: F811
    script = tmp_path / "behaviour.json"
    with ServiceProcess(tmp_path / "storage", service_data, **fake_evaluator_env(script),
                        PGOLF_STORAGE_RETRY_SECONDS=str(RETRY_SECONDS)) as process, \
            httpx.Client(base_url=process.url, headers=AUTH, timeout=60) as client:
        yield process, script, client


def test_a_locked_database_fails_the_job_with_a_reason_and_the_api_keeps_answering(
    fault_service: tuple[ServiceProcess, Path, httpx.Client], tiny_artifact: Path  # noqa: F811
) -> None:
    process, script, client = fault_service
    set_fake_behaviour(script, **SLOW)
    job_id = start_running_job(client, tiny_artifact)
    evaluator = child_with(process, b"fake_evaluator")

    locker = sqlite3.connect(process.storage_dir / "service.sqlite3", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock, for longer than every retry
    try:
        slowest = 0.0
        deadline = time.monotonic() + RETRY_SECONDS * 2 + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert client.get(f"/evaluations/{job_id}").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.2)
        assert process_gone(evaluator), "a job whose events cannot be stored must not keep running"
        refused = upload(client, tiny_artifact, params={"wait": "false", "force": "true"})
        assert (refused.status_code, refused.json()["code"]) == (503, "storage_unavailable")
        assert "retry-after" in refused.headers
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    print(f"slowest read while the database was locked: {slowest * 1000:.0f} ms")
    assert slowest < 1.0
    job = wait_for_status(client, job_id, TERMINAL, timeout=20)  # the watchdog writes what the lock refused
    assert job["status"] == "failed"
    assert "storage" in job["reason"] and "locked" in job["reason"]
    assert client.get("/healthz").json()["running"] == 0
    set_fake_behaviour(script, chunks=2, chunk_seconds=0.05)
    again = upload(client, tiny_artifact, params={"wait": "false", "force": "true"})
    assert wait_for_status(client, again.json()["id"], TERMINAL)["status"] == "completed"


def test_a_job_marked_running_that_no_process_holds_is_ended_by_the_watchdog(
    fault_service: tuple[ServiceProcess, Path, httpx.Client], tiny_artifact: Path  # noqa: F811
) -> None:
    process, script, client = fault_service
    set_fake_behaviour(script, chunks=1, chunk_seconds=0.01)
    done = upload(client, tiny_artifact, params={"wait": "false"}).json()
    wait_for_status(client, done["id"], TERMINAL)
    # A record left running by something else (another instance, a manual edit): no worker holds it.
    database = sqlite3.connect(process.storage_dir / "service.sqlite3", isolation_level=None)
    database.execute("INSERT INTO jobs (id, artifact_sha256, options, status, created_at, started_at)"
                     " SELECT 'orphan00orphan00', artifact_sha256, options, 'running', ?, ? FROM jobs LIMIT 1",
                     (time.time(), time.time()))
    database.close()
    job = wait_for_status(client, "orphan00orphan00", TERMINAL, timeout=15)
    assert job["status"] == "failed" and "process is gone" in job["reason"]


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("ab") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_a_full_disk_is_507_for_uploads_and_a_failed_job_for_running_ones(
    small_disk: Path, service_data: ServiceData, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    script = tmp_path / "behaviour.json"
    with ServiceProcess(small_disk / "storage", service_data, **fake_evaluator_env(script),
                        PGOLF_STORAGE_RETRY_SECONDS=str(RETRY_SECONDS)) as process, \
            httpx.Client(base_url=process.url, headers=AUTH, timeout=60) as client:
        set_fake_behaviour(script, **SLOW)
        job_id = start_running_job(client, tiny_artifact)
        filler = fill(small_disk, leave_bytes=tiny_artifact.stat().st_size // 4)
        refused = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}, data={"ngram": "exact"})
        assert (refused.status_code, refused.json()["code"]) == (507, "storage_full"), refused.text
        assert "full" in refused.json()["message"]
        assert files_under(process.storage_dir / "uploads") == []  # the scratch file is gone

        evaluator = child_with(process, b"fake_evaluator")
        with filler.open("ab") as handle:  # now truly full: the next event cannot be stored
            handle.write(b"\0" * shutil.disk_usage(small_disk).free)
        assert client.get("/healthz").status_code == 200
        assert process_gone(evaluator, timeout=RETRY_SECONDS * 2 + 10), "the job kept running on a full disk"
        assert client.get(f"/evaluations/{job_id}").status_code == 200
        filler.unlink()  # room again: the watchdog writes the outcome the full disk refused
        job = wait_for_status(client, job_id, TERMINAL, timeout=20)
        assert job["status"] == "failed" and "full" in job["reason"], job["reason"]


def test_a_damaged_database_is_refused_with_instructions_and_left_untouched(
    service_data: ServiceData, tmp_path: Path  # noqa: F811
) -> None:
    from service.api.storage_sqlite import SqliteStore

    storage = tmp_path / "storage"
    store = SqliteStore(storage / "service.sqlite3")
    (tmp_path / "a.part").write_bytes(b"a")
    store.put_artifact("a" * 64, 1, tmp_path / "a.part", {}, suffix=".pgolf")
    for _ in range(200):
        store.create_job("a" * 64, {"ttt": False})
    store.close()
    path = storage / "service.sqlite3"
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    data = bytearray(path.read_bytes())
    data[4096 * 2:4096 * 2 + 2000] = os.urandom(2000)  # a page in the middle of the jobs table
    path.write_bytes(bytes(data))
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    env = {**os.environ, "PGOLF_DATA_DIR": str(service_data.data_dir), "PGOLF_TOKENIZER": str(service_data.tokenizer),
           "PGOLF_STORAGE_DIR": str(storage), "PGOLF_API_TOKEN": ADMIN_TOKEN, "PGOLF_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "service", "serve"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "is damaged" in result.stderr and ".recover" in result.stderr and "restore a backup" in result.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # never silently replaced or repaired
    assert sorted(p.name for p in storage.iterdir() if p.name.startswith("service.sqlite3")) in (
        ["service.sqlite3"], ["service.sqlite3", "service.sqlite3-shm", "service.sqlite3-wal"])

    path.write_bytes(b"this is not a database at all" * 100)
    result = subprocess.run([sys.executable, "-m", "service", "serve"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "is damaged" in result.stderr
