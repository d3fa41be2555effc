"""The job queue of an API node: admission (with back-pressure), cancellation, and the node's own workers.

Every node of a deployment shares one store, and the store is the queue: an upload becomes a queued job there,
and whichever worker claims it first runs it (service/api/runner.py). A node runs `PGOLF_WORKERS` workers of its
own; with `PGOLF_WORKERS=0` it is an API node only (a cluster: `python -m service worker` on the GPU machines).

Single-machine mode (the default: the SQLite store and in-process workers) keeps the guarantees of a service
that is the only runner of its store: at start, and again at shutdown, every job still queued or running is
ended as `failed: interrupted` (`Store.mark_interrupted`); the watchdog ends a running job that none of its
workers holds at once. A cluster node never does either, since other machines run jobs: there a job whose
worker is gone ends when its lease expires (`failed: worker lost`, or requeued), and queued jobs stay queued
while nodes restart.

Cancel works through any node: `Store.request_cancel` ends a queued job at once and flags a running one; the
worker that runs it sees the flag at its next lease renewal (at once, through the store's notifications) and
kills its evaluator; the node answers when the store shows the terminal status.

Shutdown (`begin_shutdown`): no new job starts, this node's evaluators are killed at once, and its workers record
their jobs as failed with reason `interrupted`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from service.api.hub import EventHub
from service.api.public_events import PathRedactor
from service.api.runner import Watchdog, Worker, new_worker_id
from service.api.settings import Settings
from service.api.storage import RUNNING, CapacityReached, JobRecord, Store, retrying

log = logging.getLogger("pgolf.service")


class QueueFull(Exception):
    def __init__(self, active_jobs: int, retry_after_seconds: int) -> None:
        super().__init__(f"the queue is full ({active_jobs} jobs queued or running); a place frees in at most "
                         f"{retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class JobNotActive(Exception):
    """A cancel request for a job that already finished."""


class JobQueue:
    """Admits validated uploads into the store's queue, cancels on request, runs this node's workers."""

    def __init__(self, settings: Settings, store: Store, hub: EventHub, redactor: PathRedactor) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        # The only runner of its store: SQLite with in-process workers (a cluster's store is Postgres, and its
        # API nodes run PGOLF_WORKERS=0).
        self.sole_runner = settings.workers > 0 and settings.database_url is None
        self.stopping = asyncio.Event()
        node_id = new_worker_id()
        self.workers = [Worker(settings, store, hub, redactor, worker_id=f"{node_id}/{n}", stopping=self.stopping)
                        for n in range(settings.workers)]
        self.watchdog = Watchdog(settings, store, hub, self.workers, sole_runner=self.sole_runner)
        self._tasks: list[asyncio.Task[None]] = []

    # ----------------------------------------------------------------------------------------------------------
    # admission

    @property
    def capacity(self) -> int:
        """Jobs that may be queued or running at once. A node with workers counts its own; an API node cannot
        know how many workers a cluster has, so each job running anywhere counts as one busy worker."""
        if self.settings.workers > 0:
            return self.settings.workers + self.settings.queue_bound
        return self.store.count_by_status().get(RUNNING, 0) + self.settings.queue_bound

    def check_capacity(self) -> None:
        """Raise QueueFull when no job could be queued now (also asked before reading an upload's body)."""
        active = self.store.count_active_jobs()
        if active >= self.capacity:
            raise QueueFull(active, self.retry_after_seconds())

    def submit(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None) -> JobRecord:
        """Queue a validated upload, or raise QueueFull. The store counts the active jobs inside the inserting
        transaction, so no two uploads take the last place, even on two API nodes; the first event tells the
        client where to find it. The store announces the new job, which wakes an idle worker on any machine."""
        capacity = self.capacity

        def queued_event(job: JobRecord, position: int) -> dict[str, Any]:
            return {"type": "queued", "source": "service", "job_id": job.id, "queue_position": position,
                    "links": job_links(job)}

        try:
            return self.store.create_job(artifact_sha256, options, owner=owner, first_event=queued_event,
                                         max_active=capacity)
        except CapacityReached as full:
            raise QueueFull(full.active_jobs, self.retry_after_seconds()) from None

    def retry_after_seconds(self) -> int:
        """When the queue will have a free place at the latest: a place frees when any running job ends, and
        each ends by its own hard limit (its time budget plus the kill grace)."""
        now = time.time()
        grace = self.settings.kill_grace_seconds
        ends = [job.started_at + float(job.options.get("max_seconds", self.settings.eval_limit_seconds)) + grace
                for job in self.store.running_jobs() if job.started_at is not None]
        if not ends:  # nothing running yet (a worker is about to claim one): at most one full job away
            return max(1, math.ceil(self.settings.eval_limit_seconds + grace))
        return max(1, math.ceil(min(ends) - now))

    # ----------------------------------------------------------------------------------------------------------
    # workers

    def start(self) -> None:
        """Start this node's workers and its watchdog. A single-machine service first ends the jobs its previous
        process left queued or running: nothing else could ever run them."""
        if self.sole_runner:
            interrupted = self.store.mark_interrupted()
            if interrupted:
                log.warning("marked %d job(s) of the previous run as failed: interrupted", len(interrupted))
        self._tasks = [asyncio.create_task(worker.run_forever(), name=f"pgolf-worker-{n}")
                       for n, worker in enumerate(self.workers)]
        self._tasks.append(asyncio.create_task(self.watchdog.run_forever(), name="pgolf-watchdog"))

    def begin_shutdown(self) -> None:
        """At SIGTERM: start nothing new and kill this node's evaluators now; the workers record `interrupted`."""
        self.stopping.set()
        for worker in self.workers:
            worker.interrupt()

    async def stop(self, wait_seconds: float = 3.0) -> None:
        """Let the workers record their interrupted jobs (briefly), then stop them and the watchdog."""
        self.begin_shutdown()
        worker_tasks = self._tasks[:len(self.workers)]
        if worker_tasks:
            await asyncio.wait(worker_tasks, timeout=wait_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.watchdog.flush()

    async def cancel(self, job_id: str, wait_seconds: float = 10.0) -> JobRecord:
        """Cancel a job, whichever node or worker has it: a queued job ends at once; for a running one the store
        is asked, and the answer waits (at most `wait_seconds`) until its worker has recorded the end."""
        job = self.store.get_job(job_id)
        if job is None or job.is_terminal:
            raise JobNotActive(job_id)
        job = await retrying(lambda: self.store.request_cancel(job_id),
                             budget_seconds=min(self.settings.storage_retry_seconds, 5.0),
                             what=f"cancelling job {job_id}")
        deadline = time.monotonic() + wait_seconds
        while not job.is_terminal and (remaining := deadline - time.monotonic()) > 0:
            seen = self.hub.version(job_id)
            job = self.store.get_job(job_id) or job
            if not job.is_terminal:  # a notification is a hint: the store is read again at least every second
                await self.hub.wait_for_change(job_id, seen, min(remaining, 1.0))
        return job


def job_links(job: JobRecord) -> dict[str, str]:
    return {"self": f"/evaluations/{job.id}", "events": f"/evaluations/{job.id}/events",
            "artifact_sha256": job.artifact_sha256}

