"""The admission mechanisms in-process, on a real event loop with a scripted ASGI `receive`: which bound ends a
body (idle, rate, deadline, size, shutdown), per-client counting, and path redaction of public events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.api.admission import BodyLimits, UploadRefused, UploadSlots, client_key, guarded_body
from service.api.public_events import NonFiniteValue, PathRedactor, parse_engine_event

LIMITS = BodyLimits(max_bytes=10_000, idle_seconds=0.4, min_bytes_per_second=1_000, deadline_seconds=2.0)


def scripted_receive(steps: list[tuple[float, bytes]]):
    """ASGI receive: after each delay, a chunk; the last chunk ends the body."""
    queue = list(steps)

    async def receive() -> dict:
        delay, chunk = queue.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    return receive


async def _collect(body: AsyncIterator[bytes]) -> int:
    return sum([len(chunk) async for chunk in body])


def read(steps: list[tuple[float, bytes]], limits: BodyLimits = LIMITS, stop_after: float | None = None
         ) -> tuple[int | UploadRefused, float]:
    async def main() -> int | UploadRefused:
        stopping = asyncio.Event()
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stopping.set)
        try:
            return await _collect(guarded_body(scripted_receive(steps), limits, stopping))
        except UploadRefused as refusal:
            return refusal

    started = time.monotonic()
    outcome = asyncio.run(main())
    return outcome, time.monotonic() - started


def test_a_steady_body_within_every_bound_is_read_whole() -> None:
    outcome, _ = read([(0.05, b"x" * 500)] * 8)
    assert outcome == 4000


@pytest.mark.parametrize(
    ("steps", "limits", "status", "words", "ends_within"),
    [
        ([(0.0, b"x" * 100), (0.3, b"x"), (5.0, b"y")], BodyLimits(10_000, 0.4, 0, 2.0), 408,
         "no byte of the body arrived for 0.4 s", (0.65, 1.0)),
        # 300 bytes every 0.35 s is about 860 B/s: under 1,000 B/s, cut once the first idle period is over
        ([(0.0, b"x" * 300)] + [(0.35, b"x" * 300)] * 20, LIMITS, 408, "under the minimum of 1,000 bytes/s",
         (0.3, 1.2)),
        ([(0.1, b"x" * 100)] * 100, BodyLimits(10**6, 1.0, 0, 0.8), 408, "not complete after 0.8 s", (0.75, 1.1)),
        ([(0.0, b"x" * 6000), (0.0, b"x" * 6000)], LIMITS, 413, "passed 10,000 bytes", (0.0, 0.3)),
    ],
)
def test_each_bound_ends_the_body_with_its_own_reason(steps, limits, status, words, ends_within) -> None:
    outcome, elapsed = read(steps, limits)
    assert isinstance(outcome, UploadRefused) and outcome.status == status, outcome
    assert words in str(outcome)
    assert ends_within[0] <= elapsed <= ends_within[1], elapsed


def test_shutdown_refuses_a_body_in_flight_at_once() -> None:
    outcome, elapsed = read([(0.0, b"x"), (10.0, b"y")], BodyLimits(100, 30, 0, 60), stop_after=0.2)
    assert isinstance(outcome, UploadRefused) and (outcome.status, outcome.code) == (503, "shutting_down")
    assert elapsed < 1.0


def test_slots_count_per_client_and_in_total_with_a_retry_after_from_their_deadlines() -> None:
    slots = UploadSlots(per_client=2, total=3, deadline_seconds=50)
    with slots.hold("10.0.0.1"), slots.hold("10.0.0.1"):
        with pytest.raises(UploadRefused) as mine:
            with slots.hold("10.0.0.1"):
                pass
        assert (mine.value.status, mine.value.code) == (429, "too_many_uploads")
        assert 49 <= mine.value.retry_after_seconds <= 50
        with slots.hold("10.0.0.2"):
            with pytest.raises(UploadRefused) as everyone:
                with slots.hold("10.0.0.3"):
                    pass
            assert (everyone.value.status, everyone.value.code) == (503, "uploads_busy")
    assert slots.in_flight() == 0


def test_client_key_groups_an_ipv6_host_by_its_64_and_unwraps_mapped_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(None) == "unknown"


def test_public_events_are_strict_known_and_free_of_server_paths(tmp_path: Path) -> None:
    assert parse_engine_event(b'{"type": "bogus"}') is None
    assert parse_engine_event(b'{"type": "end\\nevent: end"}') is None
    assert parse_engine_event(b"not json") is None
    for line in (b'{"type": "chunk", "running_bpb": NaN}', b'{"type": "end", "x": [1, {"y": -Infinity}]}',
                 b'{"type": "end", "val_bpb": 1e999}'):
        with pytest.raises(NonFiniteValue):
            parse_engine_event(line)
    redactor = PathRedactor([("data", tmp_path / "data"), ("storage", tmp_path / "st")])
    event = {"config": {"data_dir": str(tmp_path / "data"), "artifact": str(tmp_path / "st/artifacts/a.pgolf")},
             "reason": 'File "/usr/lib/python3.11/site.py", line 3; ratio 1/2'}
    assert redactor.event(event) == {"config": {"data_dir": "<data>", "artifact": "<storage>/artifacts/a.pgolf"},
                                     "reason": 'File "…/site.py", line 3; ratio 1/2'}
