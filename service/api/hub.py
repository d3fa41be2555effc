"""Wake-ups inside one process when a job changes, fed by the store's change notifications.

The store announces every committed change by any process (Postgres: LISTEN/NOTIFY; SQLite: its own writes
directly, other processes' writes by polling), so an API node wakes the followers of a job that a worker on
another machine is running. A notification is only a hint: whoever wakes re-reads the store, so a lost or a
duplicate notification delays a stream but never corrupts it, and a "something changed" hint (None: the
listener reconnected, or another process wrote) wakes everybody.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from service.api.storage import Store

RECONNECT_SECONDS = 1.0
log = logging.getLogger("pgolf.service")

Version = tuple[int, int]


class EventHub:
    """Wakes followers of a job when it changes. The events themselves are read from the Store.

    A follower notes `version(job_id)` before reading and then waits for it to change, so a change that lands
    between the read and the wait is never missed (everything runs on the event loop thread).
    """

    def __init__(self) -> None:
        self._versions: dict[str, int] = collections.defaultdict(int)
        self._everything = 0  # bumped by a hint that names no job: every job may have changed
        self._total = 0  # bumped by every hint: "some job changed" (an idle worker looks for queued work)
        self._changed = asyncio.Condition()
        self.closed = False

    def version(self, job_id: str) -> Version:
        return self._everything, self._versions.get(job_id, 0)

    def total(self) -> int:
        return self._total

    async def close(self) -> None:
        """At shutdown: every follower wakes up and ends its stream."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def publish(self, job_id: str | None) -> None:
        """`job_id` changed; None: anything may have changed."""
        async with self._changed:
            if job_id is None:
                self._everything += 1
            else:
                self._versions[job_id] += 1
            self._total += 1
            self._changed.notify_all()

    async def wait_for_change(self, job_id: str, seen_version: Version, timeout: float) -> bool:
        """True when the job changed (or the hub closed), False after `timeout` seconds without news."""
        return await self._wait(lambda: self.closed or self.version(job_id) != seen_version, timeout)

    async def wait_for_any(self, seen_total: int, timeout: float) -> bool:
        """True when any job changed (or the hub closed), False after `timeout` seconds without news."""
        return await self._wait(lambda: self.closed or self._total != seen_total, timeout)

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except asyncio.TimeoutError:
                return False
        return True


async def relay_store_changes(store: Store, hub: EventHub) -> None:
    """Run for the life of the process: every notification of the store wakes the hub. When the listener fails
    it is started again, and everybody is woken, since changes may have been missed in between."""
    while True:
        try:
            async for job_id in store.changes():
                await hub.publish(job_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # e.g. the LISTEN connection dropped and could not be reopened yet
            log.warning("change notifications interrupted (%s); listening again in %g s", error, RECONNECT_SECONDS)
        await hub.publish(None)
        await asyncio.sleep(RECONNECT_SECONDS)
