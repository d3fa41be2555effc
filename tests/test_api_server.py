"""The service against a real uvicorn on 127.0.0.1, with a scripted fake evaluator in its subprocesses.

The fake (tests/fake_evaluator.py) prints the engine's NDJSON schema on a timetable each test chooses, so the
queue, the limits and the failure paths are exercised through real subprocesses, real signals and real HTTP.
Artifacts are real: the service validates them with the real reader before queueing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    ADMIN_TOKEN,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    files_under,
    process_gone,
    service_data,
    set_fake_behaviour,
    stream_events,
    tiny_artifact,
    upload,
    wait_for_status,
)

TOKEN = ADMIN_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"chunks": 4, "chunk_seconds": 0.15}
SLOW = {"chunks": 200, "chunk_seconds": 0.1}


class FakeService:
    def __init__(self, process: ServiceProcess, script: Path) -> None:
        self.process = process
        self.script = script
        self.client = httpx.Client(base_url=process.url, headers=AUTH, timeout=60)

    def behave(self, **behaviour: object) -> None:
        set_fake_behaviour(self.script, **behaviour)

    def evaluator_pid(self) -> int:
        """The running fake evaluator among the server's children (the other one is the artifact reader)."""
        for pid in self.process.child_pids():
            if b"fake_evaluator" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError("no evaluator subprocess is running")

    def start_slow_job(self, artifact: Path, **fields: str) -> str:
        self.behave(**SLOW)
        response = upload(self.client, artifact, params={"wait": "false", "force": "true"}, data=fields)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while self.client.get(f"/evaluations/{job_id}").json()["progress"] is None:  # first chunk seen
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return job_id


@pytest.fixture(scope="module")
def fake(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeService]:  # noqa: F811
    root = tmp_path_factory.mktemp("fake-service")
    script = root / "behaviour.json"
    # Three uploads at once from this one client: the per-client bound (default 2, tested in test_api_attacks.py)
    # must not be what refuses the third one in the full-queue test, whatever the timing.
    env = {**fake_evaluator_env(script), "PGOLF_QUEUE_BOUND": "1", "PGOLF_WORKERS": "1",
           "PGOLF_EVAL_LIMIT_SECONDS": "30", "PGOLF_KILL_GRACE_SECONDS": "0.5", "PGOLF_UPLOADS_PER_CLIENT": "3"}
    with ServiceProcess(root / "storage", service_data, **env) as process:
        service = FakeService(process, script)
        yield service
        service.client.close()


@pytest.fixture()
def idle(fake: FakeService) -> Iterator[FakeService]:
    """The service with no job active before and after the test, so tests never see each other's jobs."""
    yield fake
    for job in fake.client.get("/evaluations", params={"limit": 20}).json():
        if job["status"] in ("queued", "running"):
            fake.client.delete(f"/evaluations/{job['id']}")
    for job in fake.client.get("/evaluations", params={"limit": 20}).json():
        wait_for_status(fake.client, job["id"], {"completed", "failed", "timeout", "cancelled"})


def test_upload_streams_ndjson_then_replays_the_same_events(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    idle.behave(**FAST)
    with tiny_artifact.open("rb") as handle:
        events = list(stream_events(idle.client, "POST", "/evaluate", params={"force": "true"},
                                    files={"artifact": ("tiny.pgolf", handle)}))
    assert [e["type"] for e in events] == ["queued", "start", "chunk", "chunk", "chunk", "chunk", "end"]
    job_id = events[0]["job_id"]

    job = idle.client.get(f"/evaluations/{job_id}").json()
    assert job["status"] == "completed" and job["reason"] is None
    assert job["result"]["val_bpb"] == pytest.approx(events[-1]["val_bpb"])
    assert job["compliance"] == {"compliant": True, "scored_once": True}
    assert job["artifact_bytes"] == tiny_artifact.stat().st_size
    assert "fake evaluator: started (service token visible: False)" in job["log_tail"]

    assert list(stream_events(idle.client, "GET", f"/evaluations/{job_id}/events")) == events
    assert list(stream_events(idle.client, "GET", f"/evaluations/{job_id}/events", params={"after": 4})) == events[5:]

    with idle.client.stream("GET", f"/evaluations/{job_id}/events",
                            headers={"Accept": "text/event-stream", "Last-Event-ID": "5"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    messages = [block for block in text.split("\n\n") if block.startswith("id:")]
    assert messages == [f"id: 6\nevent: end\ndata: {json.dumps(events[6])}"]


def test_same_artifact_and_options_return_the_stored_result_unless_forced(
    idle: FakeService, tiny_artifact: Path  # noqa: F811
) -> None:
    idle.behave(**FAST)
    first = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"}, data={"ngram": "exact"})
    assert first.status_code == 202 and first.headers["location"] == f"/evaluations/{first.json()['id']}"
    wait_for_status(idle.client, first.json()["id"], {"completed"})

    again = upload(idle.client, tiny_artifact, params={"wait": "false"}, data={"ngram": "exact"})
    assert again.status_code == 200
    assert again.json()["reused"] is True and again.json()["id"] == first.json()["id"]
    streamed = upload(idle.client, tiny_artifact, data={"ngram": "exact", "max_seconds": "30"})  # same, spelled out
    assert streamed.headers["x-evaluation-reused"] == "true"
    assert json.loads(streamed.text.splitlines()[-1])["type"] == "end"

    forced = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"}, data={"ngram": "exact"})
    other = upload(idle.client, tiny_artifact, params={"wait": "false"}, data={"ngram": "hashed-940"})
    assert forced.status_code == 202 and forced.json()["id"] != first.json()["id"]
    wait_for_status(idle.client, forced.json()["id"], {"completed"})
    assert other.status_code == 202 and other.json()["reused"] is False
    finished = wait_for_status(idle.client, other.json()["id"], {"completed"})
    assert finished["compliance"]["compliant"] is False  # the fake marks hashed-940 as never compliant


def test_a_client_that_disconnects_does_not_stop_its_job(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    idle.behave(chunks=6, chunk_seconds=0.2)
    with tiny_artifact.open("rb") as handle, idle.client.stream(
        "POST", "/evaluate", params={"force": "true"}, files={"artifact": ("tiny.pgolf", handle)}
    ) as response:
        job_id = response.headers["x-evaluation-id"]
        for line in response.iter_lines():
            if json.loads(line)["type"] == "chunk":
                break  # leave mid-evaluation
    job = wait_for_status(idle.client, job_id, {"completed", "failed", "timeout", "cancelled"})
    assert job["status"] == "completed"
    assert job["progress"]["index"] == 5


def test_an_upload_one_byte_over_the_cap_is_refused_and_nothing_is_stored(
    idle: FakeService, tmp_path: Path
) -> None:
    storage = idle.process.storage_dir
    before = files_under(storage / "artifacts")
    oversized = tmp_path / "oversized.pgolf"
    with oversized.open("wb") as handle:
        handle.truncate(16_000_001)
    response = upload(idle.client, oversized)
    assert response.status_code == 413
    assert response.json()["code"] == "artifact_too_large"
    assert files_under(storage / "uploads") == []
    assert files_under(storage / "artifacts") == before

    # A body declared far over the cap is refused on its Content-Length alone, before a byte of it is read.
    with socket.create_connection(("127.0.0.1", idle.process.port), timeout=30) as raw:
        raw.sendall(b"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: 18000000\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert idle.client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"ngram": "bogus"}, 422, "invalid_options"),
        ({"max_seconds": "31"}, 422, "invalid_options"),
        ({"temperature": "0.5"}, 422, "invalid_options"),
    ],
)
def test_invalid_options_are_refused(
    idle: FakeService, tiny_artifact: Path, fields: dict, status: int, code: str  # noqa: F811
) -> None:
    response = upload(idle.client, tiny_artifact, params={"force": "true"}, data=fields)
    assert (response.status_code, response.json()["code"]) == (status, code)


def test_uploads_without_an_artifact_part_or_token_are_refused(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    no_part = idle.client.post("/evaluate", files={"model": ("x.pgolf", b"abc")})
    assert (no_part.status_code, no_part.json()["code"]) == (400, "bad_upload")
    with httpx.Client(base_url=idle.process.url) as anonymous:
        assert upload(anonymous, tiny_artifact).status_code == 401
        assert upload(anonymous, tiny_artifact, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.delete("/evaluations/whatever").status_code == 401
        assert anonymous.get("/evaluations").status_code == 200  # reads stay open
        assert anonymous.get("/limits").json()["auth_required"] is True


def test_killing_the_evaluator_fails_the_job_and_the_api_keeps_answering(
    idle: FakeService, tiny_artifact: Path  # noqa: F811
) -> None:
    job_id = idle.start_slow_job(tiny_artifact)
    os.kill(idle.evaluator_pid(), signal.SIGKILL)
    job = wait_for_status(idle.client, job_id, {"completed", "failed", "timeout", "cancelled"})
    assert job["status"] == "failed"
    assert "SIGKILL" in job["reason"]
    assert job["result"]["type"] == "error" and job["result"]["code"] == "killed"
    assert job["result"]["chunks_done"] >= 1
    assert idle.client.get("/healthz").json()["running"] == 0
    events = list(stream_events(idle.client, "GET", f"/evaluations/{job_id}/events"))
    assert events[-1]["type"] == "error"


def test_an_evaluator_that_dies_reports_its_exit_status_and_log(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    idle.behave(chunks=5, chunk_seconds=0.05, exit_after_chunks=2, exit_code=5)
    response = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"})
    job = wait_for_status(idle.client, response.json()["id"], {"completed", "failed", "timeout", "cancelled"})
    assert job["status"] == "failed"
    assert "status 5" in job["reason"]
    assert "dying on purpose" in job["log_tail"]


def test_a_stuck_evaluator_is_killed_at_the_limit_and_reports_partial_figures(
    idle: FakeService, tiny_artifact: Path  # noqa: F811
) -> None:
    idle.behave(chunks=200, chunk_seconds=0.1, ignore_limit=True)
    response = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"},
                      data={"max_seconds": "1.5"})
    job = wait_for_status(idle.client, response.json()["id"], {"completed", "failed", "timeout", "cancelled"})
    assert job["status"] == "timeout"
    assert job["result"]["source"] == "service"  # the backstop, not the engine, ended it
    assert job["result"]["chunks_done"] >= 1
    assert job["result"]["partial_val_bpb"] == pytest.approx(job["progress"]["running_bpb"])
    assert "1.5 s" in job["reason"]


def test_an_engine_that_stops_itself_at_the_limit_keeps_its_own_timeout_event(
    idle: FakeService, tiny_artifact: Path  # noqa: F811
) -> None:
    idle.behave(chunks=200, chunk_seconds=0.1)
    response = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"},
                      data={"max_seconds": "1"})
    job = wait_for_status(idle.client, response.json()["id"], {"completed", "failed", "timeout", "cancelled"})
    assert job["status"] == "timeout"
    assert "source" not in job["result"] and job["result"]["partial_val_bpb"] is not None


def test_cancel_kills_a_running_job_and_drops_a_queued_one(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    running_id = idle.start_slow_job(tiny_artifact)
    evaluator = idle.evaluator_pid()
    queued = upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"})
    queued_id = queued.json()["id"]
    assert idle.client.get(f"/evaluations/{queued_id}").json()["queue_position"] == 1

    cancelled_queued = idle.client.delete(f"/evaluations/{queued_id}")
    assert cancelled_queued.status_code == 200 and cancelled_queued.json()["status"] == "cancelled"
    cancelled_running = idle.client.delete(f"/evaluations/{running_id}")
    assert cancelled_running.json()["status"] == "cancelled"
    assert process_gone(evaluator)
    assert idle.client.delete(f"/evaluations/{running_id}").status_code == 409
    assert idle.client.delete("/evaluations/no-such-job").status_code == 404


def test_a_full_queue_answers_429_with_retry_after(idle: FakeService, tiny_artifact: Path) -> None:  # noqa: F811
    idle.behave(**SLOW)  # capacity is one running + one queued (PGOLF_QUEUE_BOUND=1)
    responses: list[httpx.Response] = []

    def send() -> None:
        responses.append(upload(idle.client, tiny_artifact, params={"wait": "false", "force": "true"}))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and statuses.count(202) >= 1, [(r.status_code, r.text) for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["code"] == "queue_full"
    # A place frees when the running job ends, at the latest at its hard limit: 30 s budget + 0.5 s grace.
    running = next(j for j in idle.client.get("/evaluations").json() if j["status"] == "running")
    assert 1 <= int(refused.headers["retry-after"]) <= 31
    assert running["options"]["max_seconds"] == 30


def test_listing_health_limits_and_docs(idle: FakeService) -> None:
    jobs = idle.client.get("/evaluations", params={"limit": 3}).json()
    assert 1 <= len(jobs) <= 3
    assert jobs == sorted(jobs, key=lambda job: job["created_at"], reverse=True)
    assert all(j["status"] == "completed" for j in idle.client.get("/evaluations?status=completed").json())
    assert idle.client.get("/evaluations/does-not-exist").status_code == 404
    limits = idle.client.get("/limits").json()
    assert (limits["max_artifact_bytes"], limits["eval_limit_seconds"]) == (16_000_000, 30.0)
    assert idle.client.get("/healthz").json()["capacity"] == 2
    schema = idle.client.get("/openapi.json").json()
    assert {"/evaluate", "/evaluations", "/evaluations/{job_id}", "/evaluations/{job_id}/events", "/healthz",
            "/limits"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/evaluate"]["post"]["requestBody"]["content"]
    assert idle.client.get("/docs").status_code == 200


def test_restart_keeps_history_and_fails_the_interrupted_job(
    service_data: ServiceData, tiny_artifact: Path, tmp_path: Path  # noqa: F811
) -> None:
    script = tmp_path / "behaviour.json"
    env = fake_evaluator_env(script)
    storage = tmp_path / "storage"
    first = ServiceProcess(storage, service_data, **env).start()
    try:
        with httpx.Client(base_url=first.url, timeout=60, headers=AUTH) as client:
            set_fake_behaviour(script, **FAST)
            done = upload(client, tiny_artifact, params={"wait": "false"}).json()["id"]
            wait_for_status(client, done, {"completed"})
            events_before = list(stream_events(client, "GET", f"/evaluations/{done}/events"))
            set_fake_behaviour(script, **SLOW)
            interrupted = upload(client, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
            wait_for_status(client, interrupted, {"running"})
            evaluator = next(pid for pid in first.child_pids()
                             if b"fake_evaluator" in Path(f"/proc/{pid}/cmdline").read_bytes())
    finally:
        first.kill()
    assert process_gone(evaluator)  # the kernel took the evaluator down with the service (PR_SET_PDEATHSIG)

    second = ServiceProcess(storage, service_data, **env)
    with second, httpx.Client(base_url=second.url, timeout=60, headers=AUTH) as client:
        job = client.get(f"/evaluations/{interrupted}").json()
        assert (job["status"], job["reason"]) == ("failed", "interrupted")
        assert client.get(f"/evaluations/{done}").json()["status"] == "completed"
        assert list(stream_events(client, "GET", f"/evaluations/{done}/events")) == events_before
        assert [j["id"] for j in client.get("/evaluations").json()] == [interrupted, done]
        reused = upload(client, tiny_artifact, params={"wait": "false"})  # the stored result survives too
        assert reused.status_code == 200 and reused.json()["id"] == done
