"""Connection-level bounds that uvicorn does not have: a deadline for the request head, and no connection kept
open for the rest of a body the application has stopped reading.

- `HeadDeadlineProtocol` (uvicorn's h11 protocol plus a timer): a connection must deliver each request's line
  and headers within `head_timeout` seconds of connecting, or of the end of its previous response, else it is
  closed. Without it a client sending one header byte every few seconds holds a socket forever.
- `CloseUnfinishedBodies` (ASGI middleware): a response to a request whose body was not read to its end carries
  `Connection: close`, so uvicorn closes the socket after the response instead of waiting for (and discarding)
  the rest of the body. That covers every early answer (401, 403, 408, 413, 429, ...) and a Content-Length larger
  than what the client sends.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    head_timeout: float = 10.0  # set per server by `protocol_with_head_deadline`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def handle_events(self) -> None:
        cycle_before = self.cycle
        super().handle_events()
        if self.cycle is not cycle_before:  # a request head was complete: its cycle started
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        self._arm_head_timer()  # the next request's head has the same deadline
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served; its body has its own bounds
        if not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %.1f s", self.head_timeout)
            self.transport.close()


def protocol_with_head_deadline(head_timeout: float) -> type[HeadDeadlineProtocol]:
    return type("HeadDeadlineProtocolConfigured", (HeadDeadlineProtocol,), {"head_timeout": head_timeout})


class CloseUnfinishedBodies:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        has_body = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
        body_done = not has_body

        async def tracking_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracking_receive, closing_send)
