"""SIGTERM (or SIGINT) stops the service within `grace_seconds`, whatever a request is doing.

uvicorn's own shutdown waits for open connections and only then for the lifespan; a request stuck in a
validation, a stream following a long job, or a half-sent upload would hold it. So the first signal also:
- tells the application at once (`on_signal`): uploads in flight are refused, streams end, the validator and
  every evaluator are killed, and the workers record their running jobs as failed with reason `interrupted`;
- starts a backstop thread that ends the process after `grace_seconds` even if the event loop is blocked.
uvicorn's graceful-shutdown timeout is set to a part of the grace, so the ordinary path finishes first.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

BACKSTOP_EXIT_STATUS = 70  # EX_SOFTWARE: the orderly shutdown did not finish in time


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, on_signal: Callable[[], None], grace_seconds: float) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._grace_seconds = grace_seconds
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if not first:
            return
        threading.Thread(target=self._backstop, name="pgolf-shutdown-backstop", daemon=True).start()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_signal)

    def _backstop(self) -> None:
        time.sleep(self._grace_seconds)
        sys.stderr.write(f"pgolf serve: shutdown did not finish within {self._grace_seconds:g} s; exiting now\n")
        sys.stderr.flush()
        os._exit(BACKSTOP_EXIT_STATUS)
