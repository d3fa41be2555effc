"""A cluster on one machine: API nodes and `python -m service worker` processes sharing one job store.

Real parts throughout: a throwaway PostgreSQL server (tests/postgres_server.py), API nodes as real uvicorn
subprocesses on 127.0.0.1 with `PGOLF_WORKERS=0`, workers as real subprocesses, each process with a storage
directory of its own (they share nothing but the database), and the scripted fake evaluator
(tests/fake_evaluator.py) as the evaluator, since the engine is not what is tested here. A short lease
(PGOLF_LEASE_SECONDS) keeps the lost-worker case quick.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    AUTH,
    REPO_ROOT,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    process_gone,
    service_data,
    set_fake_behaviour,
    stream_events,
    tiny_artifact,
    upload,
    wait_for_status,
)

LEASE_SECONDS = 3.0
WATCHDOG_SECONDS = 2.0  # service/api/runner.py: how often every node expires leases
TERMINAL = {"completed", "failed", "timeout", "cancelled"}
FAST = {"chunks": 5, "chunk_seconds": 0.4}  # ~2 s a job: six of them keep both workers busy
SLOW = {"chunks": 300, "chunk_seconds": 0.1}


class WorkerProcess:
    """`python -m service worker` in a subprocess, with its own storage directory."""

    def __init__(self, storage_dir: Path, data: ServiceData, **env: str) -> None:
        self.storage_dir = storage_dir
        self.env = {**os.environ, "PGOLF_DATA_DIR": str(data.data_dir), "PGOLF_TOKENIZER": str(data.tokenizer),
                    "PGOLF_STORAGE_DIR": str(storage_dir), **env}
        self.env.pop("PGOLF_API_TOKEN", None)  # a worker needs no token of the API
        self.log_path = storage_dir.parent / f"{storage_dir.name}-worker.log"
        self._log_start = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen([sys.executable, "-m", "service", "worker"], cwd=REPO_ROOT, env=self.env,
                                        stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if "ready" in self.log()[self._log_start:]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker did not start within {timeout} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def evaluator_pid(self) -> int | None:
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                if b"fake_evaluator" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
        return None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return None if self.process is None else self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    def __init__(self, root: Path, data: ServiceData, database_url: str, script: Path) -> None:
        env = {**fake_evaluator_env(script), "PGOLF_DATABASE_URL": database_url,
               "PGOLF_LEASE_SECONDS": str(LEASE_SECONDS), "PGOLF_QUEUE_BOUND": "16"}
        self.apis = [ServiceProcess(root / f"api-{n}", data, **env, PGOLF_WORKERS="0") for n in "ab"]
        self.workers = [WorkerProcess(root / f"worker-{n}", data, **env) for n in "12"]
        self.clients: list[httpx.Client] = []

    def start(self) -> Cluster:
        starters = [threading.Thread(target=node.start) for node in (*self.apis, *self.workers)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        self.clients = [httpx.Client(base_url=api.url, headers=AUTH, timeout=60) for api in self.apis]
        return self

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for node in (*self.workers, *self.apis):
            node.stop()

    def worker_running(self, job: dict) -> WorkerProcess:
        pid = int(job["worker_id"].split(":")[1])
        return next(worker for worker in self.workers if worker.pid == pid)


def running_with_a_chunk(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    """The job once its evaluator runs and its first chunk is stored."""
    deadline = time.monotonic() + timeout
    while not (job := client.get(f"/evaluations/{job_id}").json())["progress"]:
        assert time.monotonic() < deadline and job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    return job


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def read_stream(client: httpx.Client, job_id: str, out: dict[str, list[dict]]) -> None:
    out[job_id] = list(stream_events(client, "GET", f"/evaluations/{job_id}/events"))


@pytest.fixture()
def cluster(postgres_url: str, service_data: ServiceData, tmp_path: Path) -> Iterator[Cluster]:  # noqa: F811
    cluster = Cluster(tmp_path, service_data, postgres_url, tmp_path / "behaviour.json")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_two_api_nodes_and_two_workers_share_one_postgres_store(
    cluster: Cluster, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    script = tmp_path / "behaviour.json"
    a, b = cluster.clients

    # 1. Six uploads, alternating between the API nodes; each stream is followed live through the OTHER node.
    set_fake_behaviour(script, **FAST)
    jobs: list[tuple[str, httpx.Client, httpx.Client]] = []
    streams: dict[str, list[dict]] = {}
    readers = []
    for n in range(6):
        here, other = (a, b) if n % 2 == 0 else (b, a)
        response = upload(here, tiny_artifact, params={"wait": "false", "force": "true"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        jobs.append((job_id, here, other))
        reader = threading.Thread(target=read_stream, args=(other, job_id, streams))
        reader.start()
        readers.append(reader)
    for reader in readers:
        reader.join(60)
    workers_used = set()
    for job_id, here, _other in jobs:
        job = here.get(f"/evaluations/{job_id}").json()
        assert job["status"] == "completed", job
        workers_used.add(job["worker_id"])
        assert "database url visible: False" in job["log_tail"]  # the evaluator never gets the credential
        events = streams[job_id]
        assert [e["type"] for e in events] == ["queued", "start", *["chunk"] * FAST["chunks"], "end"], events
        assert [e["index"] for e in events if e["type"] == "chunk"] == list(range(FAST["chunks"]))
        assert list(stream_events(here, "GET", f"/evaluations/{job_id}/events")) == events  # the stored record
    views = [here.get(f"/evaluations/{job_id}").json() for job_id, here, _other in jobs]
    span = iso_seconds(max(v["finished_at"] for v in views)) - iso_seconds(min(v["created_at"] for v in views))
    print(f"6 jobs ({FAST['chunks'] * FAST['chunk_seconds']:g} s of chunks each) on 2 workers: {span:.1f} s from the "
          f"first upload stored to the last job finished; workers: {sorted(workers_used)}")
    assert len(workers_used) == 2, "both workers should have run some of the jobs"
    assert {w.split(":")[1] for w in workers_used} == {str(w.pid) for w in cluster.workers}

    # 2. kill -9 of the worker running a job: the job ends within the lease (+ one watchdog period), the kernel
    # takes its evaluator down, and the other worker carries on.
    set_fake_behaviour(script, **SLOW)
    lost_id = upload(a, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    job = running_with_a_chunk(b, lost_id)
    lost_worker_id = job["worker_id"]
    victim = cluster.worker_running(job)
    survivor = next(w for w in cluster.workers if w is not victim)
    evaluator = victim.evaluator_pid()
    assert evaluator is not None
    assert victim.process is not None
    victim.process.kill()
    killed_at = time.monotonic()
    victim.process.wait()
    assert process_gone(evaluator)
    job = wait_for_status(b, lost_id, TERMINAL, timeout=LEASE_SECONDS + WATCHDOG_SECONDS + 10)
    ended_after = time.monotonic() - killed_at
    print(f"kill -9 of a worker: its job ended after {ended_after:.1f} s (lease {LEASE_SECONDS:g} s)")
    assert (job["status"], job["reason"]) == ("failed", "worker lost"), job
    assert ended_after <= LEASE_SECONDS + WATCHDOG_SECONDS + 2.0
    last = list(stream_events(a, "GET", f"/evaluations/{lost_id}/events"))[-1]
    assert last["code"] == "worker_lost" and last["worker_id"] == lost_worker_id
    set_fake_behaviour(script, **FAST)
    after_id = upload(b, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    job = wait_for_status(a, after_id, TERMINAL)
    assert job["status"] == "completed" and job["worker_id"].split(":")[1] == str(survivor.pid)

    # 3. Cancel through the other API node stops the job on the worker that runs it.
    set_fake_behaviour(script, **SLOW)
    cancel_id = upload(a, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    running_with_a_chunk(a, cancel_id)
    evaluator = survivor.evaluator_pid()
    assert evaluator is not None
    asked = time.monotonic()
    answer = b.delete(f"/evaluations/{cancel_id}")
    cancel_took = time.monotonic() - asked
    print(f"cancel through the other API node: answered {answer.json()['status']} in {cancel_took:.2f} s")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    assert process_gone(evaluator)
    events = list(stream_events(a, "GET", f"/evaluations/{cancel_id}/events"))
    assert events[-1]["code"] == "cancelled" and events[-1]["chunks_done"] >= 1
    assert b.delete(f"/evaluations/{cancel_id}").status_code == 409

    # 4. SIGTERM of a worker mid-job: its job ends `failed: interrupted` at once, the worker exits 0.
    sigterm_id = upload(b, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    wait_for_status(a, sigterm_id, {"running"})
    assert survivor.stop() == 0, survivor.log()
    job = a.get(f"/evaluations/{sigterm_id}").json()
    assert (job["status"], job["reason"]) == ("failed", "interrupted"), job

    # 5. With no worker left, an upload stays queued; restart of everything keeps the history, and the queued
    # job runs once a worker is back.
    set_fake_behaviour(script, **FAST)
    queued_id = upload(a, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    before = {job["id"]: job for job in b.get("/evaluations").json()}
    assert before[queued_id]["status"] == "queued"
    records = {job_id: list(stream_events(a, "GET", f"/evaluations/{job_id}/events")) for job_id in before
               if job_id != queued_id}
    cluster.stop()
    for node in (*cluster.apis, *cluster.workers):  # from now on a lost worker's job is queued again, once
        node.env["PGOLF_REQUEUE_LOST_JOBS"] = "1"
    cluster.start()
    a, b = cluster.clients
    after = {job["id"]: job for job in a.get("/evaluations").json()}
    assert after.keys() == before.keys()
    for job_id, job in before.items():
        if job_id != queued_id:
            assert after[job_id] == job
            assert list(stream_events(b, "GET", f"/evaluations/{job_id}/events")) == records[job_id]
    job = wait_for_status(b, queued_id, TERMINAL)
    assert job["status"] == "completed"
    assert [e["type"] for e in stream_events(a, "GET", f"/evaluations/{queued_id}/events")][-1] == "end"

    # 6. With PGOLF_REQUEUE_LOST_JOBS=1, kill -9 of the worker running a job puts the job back in the queue, and
    # the other worker runs it to the end; its stream (through the other node) shows both attempts.
    set_fake_behaviour(script, **SLOW)
    requeued_id = upload(a, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    victim = cluster.worker_running(running_with_a_chunk(b, requeued_id))
    set_fake_behaviour(script, **FAST)  # read by the evaluator of the second attempt
    assert victim.process is not None
    victim.process.kill()
    victim.process.wait()
    job = wait_for_status(b, requeued_id, TERMINAL, timeout=LEASE_SECONDS + WATCHDOG_SECONDS + 30)
    assert (job["status"], job["attempts"]) == ("completed", 2), job
    assert job["worker_id"].split(":")[1] != str(victim.pid)
    types = [e["type"] for e in stream_events(b, "GET", f"/evaluations/{requeued_id}/events")]
    first_attempt = types[:types.index("requeued")]
    assert first_attempt[:3] == ["queued", "start", "chunk"] and set(first_attempt[2:]) == {"chunk"}
    assert types[len(first_attempt):] == ["requeued", "start", *["chunk"] * FAST["chunks"], "end"]



def test_a_worker_process_runs_the_jobs_of_an_sqlite_api_node(
    service_data: ServiceData, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The same split on one machine without Postgres: the worker opens the API's SQLite store, and changes
    reach the other process through SQLite's data_version polling."""
    script = tmp_path / "behaviour.json"
    storage = tmp_path / "storage"
    env = {**fake_evaluator_env(script), "PGOLF_LEASE_SECONDS": str(LEASE_SECONDS)}
    api = ServiceProcess(storage, service_data, **env, PGOLF_WORKERS="0").start()
    worker = WorkerProcess(storage, service_data, **env).start()
    try:
        with httpx.Client(base_url=api.url, headers=AUTH, timeout=60) as client:
            set_fake_behaviour(script, **FAST)
            response = upload(client, tiny_artifact, params={"wait": "false"})
            job_id = response.json()["id"]
            events = list(stream_events(client, "GET", f"/evaluations/{job_id}/events"))
            assert [e["type"] for e in events] == ["queued", "start", *["chunk"] * FAST["chunks"], "end"]
            job = client.get(f"/evaluations/{job_id}").json()
            assert job["status"] == "completed" and job["worker_id"].split(":")[1] == str(worker.pid)

            set_fake_behaviour(script, **SLOW)
            slow_id = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
            wait_for_status(client, slow_id, {"running"})
            answer = client.delete(f"/evaluations/{slow_id}")
            assert answer.json()["status"] == "cancelled", answer.text
    finally:
        assert worker.stop() == 0, worker.log()
        api.stop()
