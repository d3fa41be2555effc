"""Upload admission that slow or hostile clients cannot starve.

Three rules, each bounding what one client can hold:

- A body must keep moving: `guarded_body` refuses it (408) when no byte arrives for `idle_seconds`, when after
  that first idle period its average rate falls below `min_bytes_per_second`, or when it is not complete after
  `deadline_seconds`; and it refuses (413) any body, chunked or not, longer than the artifact cap plus the
  multipart framing. A body that stops short of its Content-Length is therefore ended too.
- Bodies in flight are counted per client address (an IPv6 address counts as its /64) and in total
  (`UploadSlots`); the next one over either bound is refused at once with 429 and a Retry-After taken from the
  deadlines of the uploads that hold the slots.
- A queue slot is taken only after the body is complete and the artifact validated (`JobQueue.submit`), so a
  client that never finishes its upload never holds a place in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from starlette.types import Receive


class UploadRefused(Exception):
    """An upload that is not admitted (now): HTTP `status` with a stable `code`."""

    def __init__(self, status: int, code: str, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    idle_seconds: float
    min_bytes_per_second: float
    deadline_seconds: float


def client_key(host: str | None) -> str:
    """The unit the per-client bound counts: the address, or its /64 for IPv6 (one host usually owns a /64)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Hold:
    client: str
    deadline: float  # monotonic time by which this upload is over, one way or another


@dataclass
class UploadSlots:
    """Counts bodies in flight, per client and in total."""

    per_client: int
    total: int
    deadline_seconds: float
    _holds: list[_Hold] = field(default_factory=list)

    def in_flight(self, client: str | None = None) -> int:
        return sum(1 for hold in self._holds if client is None or hold.client == client)

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        mine = [h for h in self._holds if h.client == client]
        if len(mine) >= self.per_client:
            raise UploadRefused(429, "too_many_uploads",
                                f"this client already has {len(mine)} upload(s) in flight (at most "
                                f"{self.per_client}); finish one first", _retry_after(mine))
        if len(self._holds) >= self.total:
            raise UploadRefused(503, "uploads_busy",
                                f"{len(self._holds)} uploads are in flight, the service's bound; retry shortly",
                                _retry_after(self._holds))
        hold = _Hold(client, time.monotonic() + self.deadline_seconds)
        self._holds.append(hold)
        try:
            yield
        finally:
            self._holds.remove(hold)


def _retry_after(holds: list[_Hold]) -> int:
    """Seconds until the first of these uploads is over at the latest (its deadline)."""
    soonest = min(hold.deadline for hold in holds)
    return max(1, math.ceil(soonest - time.monotonic()))


async def guarded_body(receive: Receive, limits: BodyLimits, stopping: asyncio.Event) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, under `limits`; raises UploadRefused when a limit is broken, when the
    client disconnects, or when the service starts shutting down."""
    started = time.monotonic()
    received = 0
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            elapsed = time.monotonic() - started
            # Which bound ends the wait for the next chunk first: the idle time, the deadline, or the moment the
            # average rate falls below the minimum with no further byte (never within the first idle period: a
            # connection needs a moment to ramp up).
            bounds = [(limits.idle_seconds, "idle"), (limits.deadline_seconds - elapsed, "deadline")]
            if limits.min_bytes_per_second > 0:
                rate_fails_at = max(limits.idle_seconds, received / limits.min_bytes_per_second)
                bounds.append((rate_fails_at - elapsed, "rate"))
            wait, bound = min(bounds)
            if wait <= 0:
                raise _too_slow(bound, limits, received, elapsed)
            next_message = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({next_message, stop_wait}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if next_message not in done:
                next_message.cancel()
                if stop_wait in done:
                    raise UploadRefused(503, "shutting_down", "the service is shutting down; upload refused")
                raise _too_slow(bound, limits, received, time.monotonic() - started)
            message = next_message.result()
            if message["type"] == "http.disconnect":
                raise UploadRefused(400, "client_disconnected", "the client went away before the body was complete")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limits.max_bytes:
                raise UploadRefused(413, "body_too_large",
                                    f"the request body passed {limits.max_bytes:,} bytes (the artifact cap plus "
                                    "the multipart framing); upload cut off and discarded")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        stop_wait.cancel()


def _too_slow(bound: str, limits: BodyLimits, received: int, elapsed: float) -> UploadRefused:
    if bound == "deadline":
        why = f"the body was not complete after {limits.deadline_seconds:g} s (the upload deadline)"
    elif bound == "idle":
        why = f"no byte of the body arrived for {limits.idle_seconds:g} s"
    else:
        why = (f"the body arrived at {received / max(elapsed, 1e-9):,.0f} bytes/s, under the minimum of "
               f"{limits.min_bytes_per_second:,.0f} bytes/s")
    return UploadRefused(408, "upload_too_slow", f"{why}; {received:,} bytes received in {elapsed:.1f} s, upload "
                         "discarded")
