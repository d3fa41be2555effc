"""Attacks of a hostile user of a public server, each against a real uvicorn on 127.0.0.1.

Slow clients are raw sockets trickling bytes from their own loopback addresses (127.0.0.2, ...), so the
per-client bound sees them as different clients from the honest uploads (127.0.0.1). The service runs with
short admission limits (seconds, not minutes) so that every attack is over in a few seconds.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    ADMIN_TOKEN,
    AUTH,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    files_under,
    service_data,
    set_fake_behaviour,
    stream_events,
    tiny_artifact,
    upload,
    wait_for_status,
)

IDLE_SECONDS, DEADLINE_SECONDS, HEADER_SECONDS = 1.5, 4.0, 1.5
FAST = {"chunks": 3, "chunk_seconds": 0.05}
TERMINAL = {"completed", "failed", "timeout", "cancelled"}
BOUNDARY = "slowclientboundary"


@dataclass
class Service:
    process: ServiceProcess
    script: Path
    client: httpx.Client

    def behave(self, **behaviour: object) -> None:
        set_fake_behaviour(self.script, **behaviour)


@pytest.fixture(scope="module")
def service(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:  # noqa: F811
    root = tmp_path_factory.mktemp("attacked-service")
    script = root / "behaviour.json"
    env = {**fake_evaluator_env(script), "PGOLF_WORKERS": "1", "PGOLF_QUEUE_BOUND": "4",
           "PGOLF_UPLOAD_IDLE_SECONDS": str(IDLE_SECONDS), "PGOLF_UPLOAD_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
           "PGOLF_UPLOAD_MIN_BYTES_PER_SECOND": "1", "PGOLF_HEADER_TIMEOUT_SECONDS": str(HEADER_SECONDS),
           "PGOLF_UPLOADS_PER_CLIENT": "2"}
    with ServiceProcess(root / "storage", service_data, **env) as process, \
            httpx.Client(base_url=process.url, headers=AUTH, timeout=60) as client:
        yield Service(process, script, client)


def multipart_head(artifact_bytes: int) -> tuple[bytes, bytes]:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"artifact\"; filename=\"a.pgolf\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail


def request_head(port: int, content_length: int | None, *, chunked: bool = False) -> bytes:
    lines = ["POST /evaluate?wait=false HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {ADMIN_TOKEN}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def read_response(sock: socket.socket) -> tuple[int | None, dict, bytes, bool]:
    """(status, headers, body, closed): what the server answered, and whether it then closed the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        closed = True
    except (TimeoutError, ConnectionResetError):
        closed = False
    if not data:
        return None, {}, b"", closed
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body, closed


@dataclass
class Trickler:
    """A client sending its upload body one byte every `interval` seconds, from its own address, until the server
    answers or closes; then `answer` holds what it said and `ended_after` when."""

    port: int
    source: str
    interval: float = 0.3
    answer: tuple | None = None
    ended_after: float | None = None
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> Trickler:
        self.sock = connect(self.port, self.source)
        head, _tail = multipart_head(10_000)
        self.sock.sendall(request_head(self.port, 20_000) + head)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.sock.send(b"x")
            except OSError:
                break
            time.sleep(self.interval)
            if _peek(self.sock) is not None:  # an answer, or the connection closed
                break
        self.sock.settimeout(10)
        try:
            self.answer = read_response(self.sock)
        except OSError:
            self.answer = (None, {}, b"", True)
        self.ended_after = time.monotonic() - self.started
        self.sock.close()

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)


def _peek(sock: socket.socket) -> bytes | None:
    """The first byte waiting on the socket, b"" when the peer closed it, None when nothing has arrived."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    finally:
        sock.setblocking(True)


def _trickle(port: int, source: str) -> Trickler:
    return Trickler(port, source).start()


def test_honest_uploads_are_admitted_while_three_slow_ones_are_open(service: Service, tiny_artifact: Path) -> None:  # noqa: F811
    service.behave(**FAST)
    warm = upload(service.client, tiny_artifact, params={"wait": "false", "force": "true"})  # the reader's imports
    wait_for_status(service.client, warm.json()["id"], TERMINAL)
    slow = [_trickle(service.process.port, f"127.0.0.{n}") for n in (2, 3, 4)]
    admitted, admitted_at = [], []
    for _ in range(3):
        response = upload(service.client, tiny_artifact, params={"wait": "false", "force": "true"})
        assert response.status_code == 202, response.text
        admitted.append(response.json()["id"])
        admitted_at.append(round(time.monotonic() - slow[0].started, 2))
        assert all(t.answer is None for t in slow), (admitted_at, [(t.answer, t.ended_after) for t in slow])
    for job_id in admitted:
        assert wait_for_status(service.client, job_id, TERMINAL)["status"] == "completed"

    for trickler in slow:
        trickler.join(DEADLINE_SECONDS + 10)
        assert trickler.answer is not None
        status, headers, body, closed = trickler.answer
        assert status == 408 and json.loads(body)["code"] == "upload_too_slow"
        assert "deadline" in json.loads(body)["message"]
        assert headers.get("connection") == "close" and closed
        assert DEADLINE_SECONDS - 0.5 <= trickler.ended_after <= DEADLINE_SECONDS + 4
    print(f"3 honest uploads admitted at {admitted_at} s beside 3 slow ones; the slow ones ended after "
          f"{[round(t.ended_after or 0, 1) for t in slow]} s")
    assert files_under(service.process.storage_dir / "uploads") == []


def test_a_body_shorter_than_its_content_length_ends_at_the_idle_limit(service: Service) -> None:
    sock = connect(service.process.port, "127.0.0.7")
    head, _tail = multipart_head(1000)
    started = time.monotonic()
    sock.sendall(request_head(service.process.port, 5_000_000) + head + b"a" * 1000)  # then nothing more
    status, headers, body, closed = read_response(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert status == 408 and "no byte of the body arrived" in json.loads(body)["message"]
    assert closed and headers.get("connection") == "close"
    print(f"Content-Length larger than the body: 408 and closed after {elapsed:.2f} s (idle {IDLE_SECONDS:g} s)")
    assert IDLE_SECONDS - 0.2 <= elapsed <= IDLE_SECONDS + 3


def test_a_request_head_sent_byte_by_byte_is_cut_at_the_header_deadline(service: Service) -> None:
    sock = connect(service.process.port, "127.0.0.8")
    started = time.monotonic()
    closed_after = None
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
        try:
            sock.send(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - started
            break
        time.sleep(0.2)
        if _peek(sock) == b"":
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None, "the server kept a connection that never finished its request head"
    print(f"request head sent byte by byte: closed after {closed_after:.2f} s (deadline {HEADER_SECONDS:g} s)")
    assert HEADER_SECONDS - 0.2 <= closed_after <= HEADER_SECONDS + 3


def test_a_chunked_body_is_cut_at_the_cap_plus_framing(service: Service) -> None:
    before = files_under(service.process.storage_dir / "artifacts")
    sock = connect(service.process.port, "127.0.0.9")
    head, _tail = multipart_head(0)
    sock.sendall(request_head(service.process.port, None, chunked=True))
    sent = 0
    block = b"z" * (1 << 20)
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    try:
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        while sent < 64 << 20:  # far past the cap: the server must stop reading long before
            sock.sendall(chunk)
            sent += len(block)
    except OSError:
        pass
    status, _headers, body, _closed = read_response(sock)
    sock.close()
    assert status == 413 and json.loads(body)["code"] in ("artifact_too_large", "body_too_large")
    print(f"chunked body: {sent:,} bytes sent before the 413 (cap {16_000_000:,} + code + framing)")
    assert sent < 40 << 20, f"the server read {sent:,} bytes of a chunked body"
    assert files_under(service.process.storage_dir / "uploads") == []
    assert files_under(service.process.storage_dir / "artifacts") == before


def test_uploads_in_flight_are_bounded_per_client_with_a_computed_retry_after(
    service: Service, tiny_artifact: Path  # noqa: F811
) -> None:
    service.behave(**FAST)
    mine = [_trickle(service.process.port, "127.0.0.5") for _ in range(2)]
    time.sleep(0.3)
    third = connect(service.process.port, "127.0.0.5")
    third.sendall(request_head(service.process.port, 20_000))
    status, headers, body, closed = read_response(third)
    third.close()
    assert status == 429 and json.loads(body)["code"] == "too_many_uploads"
    assert 1 <= int(headers["retry-after"]) <= DEADLINE_SECONDS  # when the first of the two ends at the latest
    assert closed  # the unread body does not keep the socket
    other = upload(service.client, tiny_artifact, params={"wait": "false", "force": "true"})
    assert other.status_code == 202  # another client is not affected
    for trickler in mine:
        trickler.join(DEADLINE_SECONDS + 10)
        assert trickler.answer is not None and trickler.answer[0] == 408
    wait_for_status(service.client, other.json()["id"], TERMINAL)


def test_anonymous_bodies_are_refused_before_a_byte_is_read_and_the_socket_closed(service: Service) -> None:
    sock = connect(service.process.port, "127.0.0.10")
    started = time.monotonic()
    sock.sendall(request_head(service.process.port, 16_000_000).replace(f"Bearer {ADMIN_TOKEN}".encode(),
                                                                        b"Bearer wrong-token-000000000"))
    status, headers, _body, closed = read_response(sock)
    sock.close()
    assert status == 401 and closed and headers.get("connection") == "close"
    assert time.monotonic() - started < 2


# --- malformed requests: each a 4xx with {code, message} ------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["message"]
    return body


def test_malformed_requests_get_a_4xx_with_code_and_message(service: Service, tiny_artifact: Path) -> None:  # noqa: F811
    service.behave(**FAST)
    long_boundary = "b" * 300
    body = f"--{long_boundary}\r\nContent-Disposition: form-data; name=\"artifact\"\r\n\r\nx\r\n--{long_boundary}--\r\n"
    response = service.client.post("/evaluate", content=body.encode(),
                                   headers={"Content-Type": f"multipart/form-data; boundary={long_boundary}"})
    assert _error(response, 400)["code"] == "bad_upload"

    job_id = upload(service.client, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    wait_for_status(service.client, job_id, TERMINAL)
    events = f"/evaluations/{job_id}/events"
    for spelling in ("²".encode("latin-1"), "²".encode(), b"1e3", b"99999999999999999999999"):
        response = service.client.get(events, headers={"Last-Event-ID": spelling})
        assert _error(response, 400)["code"] == "bad_last_event_id"
    assert _error(service.client.get(events, params={"after": str(10**20)}), 422)["code"] == "invalid_request"
    assert _error(service.client.get(events, params={"after": "-5"}), 422)["code"] == "invalid_request"
    assert _error(service.client.get("/evaluations", params={"limit": "0"}), 422)["code"] == "invalid_request"
    assert _error(service.client.get("/no/such/route"), 404)["code"] == "not_found"
    assert _error(service.client.put("/evaluate"), 405)["code"] == "method_not_allowed"
    assert _error(service.client.get("/evaluations/" + "x" * 5000), 404)["code"] == "not_found"
    assert service.client.get("/healthz").status_code == 200


def _strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the output: not JSON")

    return json.loads(text, parse_constant=refuse)


def test_forged_event_types_non_finite_scores_and_server_paths_never_reach_a_stream(
    service: Service, tiny_artifact: Path  # noqa: F811
) -> None:
    forged = json.dumps({"type": "end\nevent: end\ndata: {\"val_bpb\": 0.0001}", "x": 1})
    unknown = json.dumps({"type": "bogus", "note": "not an engine event"})
    service.behave(**FAST, raw_lines=[forged, unknown], raw_end='{"type": "end", "val_bpb": NaN, "val_loss": 1.0}')
    job_id = upload(service.client, tiny_artifact, params={"wait": "false", "force": "true"}).json()["id"]
    job = wait_for_status(service.client, job_id, TERMINAL)
    assert job["status"] == "failed" and job["result"]["code"] == "non_finite"
    assert "val_bpb" in job["reason"]

    ndjson = service.client.get(f"/evaluations/{job_id}/events").text
    events = [_strict_json(line) for line in ndjson.splitlines()]
    assert [e["type"] for e in events] == ["queued", "start", "chunk", "chunk", "chunk", "error"]
    with service.client.stream("GET", f"/evaluations/{job_id}/events",
                               headers={"Accept": "text/event-stream"}) as response:
        sse = response.read().decode()
    names = re.findall(r"^event: (.*)$", sse, re.MULTILINE)
    assert names == ["queued", "start", "chunk", "chunk", "chunk", "error"]
    for data in re.findall(r"^data: (.*)$", sse, re.MULTILINE):
        _strict_json(data)
    assert "0.0001" not in sse

    storage = str(service.process.storage_dir)
    public = ndjson + json.dumps(service.client.get(f"/evaluations/{job_id}").json())
    assert storage not in public and str(Path(storage).resolve()) not in public
    start = events[1]
    assert start["config"]["artifact"] == f"<storage>/artifacts/{job['artifact_sha256']}.pgolf"
    assert start["config"]["data_dir"] == "<data>"
    leaked = re.findall(r'"(?!/evaluations/)(?:/[\w.-]+){2,}', public)  # API links are fine
    assert not leaked, f"absolute paths in public events: {leaked}"
