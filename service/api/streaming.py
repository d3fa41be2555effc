"""Event streams of a job as NDJSON or server-sent events: replay what is stored, then follow live.

Line n of a job's stream (counting from 0) is its event with sequence number n, whichever endpoint serves it;
SSE messages carry that number as their `id`, so a browser's EventSource resumes after a reconnect with
`Last-Event-ID`, and NDJSON clients resume with `?after=n`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from service.api.hub import EventHub
from service.api.public_events import EVENT_TYPES
from service.api.storage import TERMINAL_STATUSES, Store, StoredEvent

NDJSON_MEDIA_TYPE = "application/x-ndjson"
SSE_MEDIA_TYPE = "text/event-stream"
KEEPALIVE_SECONDS = 15.0
_PAGE = 500


async def follow_events(store: Store, hub: EventHub, job_id: str, after_seq: int = -1
                        ) -> AsyncIterator[StoredEvent | None]:
    """Yield the job's events from `after_seq + 1` until its terminal event; None as a keep-alive tick.

    The status is read before the events: a job is marked terminal only after its last event is stored, so
    once the status says terminal, the events read right after it are complete.
    """
    while True:
        seen_version = hub.version(job_id)
        job = store.get_job(job_id)
        terminal = job is None or job.status in TERMINAL_STATUSES
        events = store.events_after(job_id, after_seq, limit=_PAGE)
        for event in events:
            yield event
            after_seq = event.seq
        if len(events) == _PAGE:
            continue
        if terminal or hub.closed:  # done, or the service is shutting down (the client can resume later)
            return
        if not await hub.wait_for_change(job_id, seen_version, KEEPALIVE_SECONDS):
            yield None


async def _ndjson(events: AsyncIterator[StoredEvent | None]) -> AsyncIterator[bytes]:
    async for event in events:
        if event is not None:  # NDJSON has no comment syntax for a keep-alive; the connection stays open anyway
            yield event.body.encode() + b"\n"


async def _sse(events: AsyncIterator[StoredEvent | None]) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    async for event in events:
        if event is None:
            yield b": keep-alive\n\n"
        else:
            yield sse_frame(event)


def sse_frame(event: StoredEvent) -> bytes:
    """One SSE message. The name is one of EVENT_TYPES (anything else is sent as the default `message`) and the
    data is the stored JSON with any line break escaped, so no stored text can end or forge a frame."""
    name = event.type if event.type in EVENT_TYPES else "message"
    data = event.body.replace("\r", "\\r").replace("\n", "\\n")  # stored JSON has none; kept out regardless
    return f"id: {event.seq}\nevent: {name}\ndata: {data}\n\n".encode()


def event_stream_response(events: AsyncIterator[StoredEvent | None], *, sse: bool,
                          headers: dict[str, str] | None = None) -> StreamingResponse:
    all_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
    return StreamingResponse(_sse(events) if sse else _ndjson(events),
                             media_type=SSE_MEDIA_TYPE if sse else NDJSON_MEDIA_TYPE, headers=all_headers)


def wants_sse(accept: str | None) -> bool:
    return accept is not None and SSE_MEDIA_TYPE in accept.lower()
