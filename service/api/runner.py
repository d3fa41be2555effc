"""The one job runner: claim a queued job under a lease, run its evaluator subprocess, record what happened.

Both ways of running evaluations use it: the in-process workers of a single-machine service (`JobQueue`) and
`python -m service worker` on each GPU machine of a cluster. A `Worker` runs one job at a time:

- it claims the oldest queued job with a lease (`Store.claim_next_queued`; Postgres: `FOR UPDATE SKIP LOCKED`),
  copies the artifact (and an upstream job's train_gpt.py) from the store into its own directory, and runs
  `python -m service evaluate ...` in its own process group under the evaluator rlimits, so a crash, an
  out-of-memory kill or a hung engine only ever ends that job;
- it stores each event as it comes, guarded by its worker id: a worker that lost its job writes nothing more;
- it renews the lease every third of its length, and at once when the store says the job changed. A renewal
  that answers CANCEL_REQUESTED kills the evaluator and ends the job `cancelled`; LOST (the lease expired and
  the job was requeued or failed elsewhere) kills the evaluator and writes nothing more. A worker that cannot
  renew for a whole lease period knows it has lost the job and stops the same way.

Time limits, from the inside out: the engine gets `--max-seconds` and stops cleanly between chunks with a
`timeout` event carrying its figures; the worker kills the process group `kill_grace_seconds` later as a
backstop and then writes the `timeout` event itself from the last chunk it saw.

Storage faults: every job-state write is retried with backoff for `storage_retry_seconds`. An event that still
cannot be stored ends the job (its record would be incomplete): the evaluator is killed and the job fails with
the storage error as its reason. A final status that cannot be written is kept (`Worker.unrecorded`) and written
by the `Watchdog` as soon as the database takes it.

Interruption (`Worker.interrupt`, at SIGTERM): no new job starts, the evaluator is killed at once, and the job is
recorded as failed with reason `interrupted`.

The `Watchdog` runs on every node: it ends every job whose lease expired (`Store.expire_leases`: `failed: worker
lost`, or requeued while `PGOLF_REQUEUE_LOST_JOBS` allows), so no job stays `running` forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.api.hub import EventHub
from service.api.limits import ResourceLimits, breach_reason, child_setup
from service.api.public_events import NonFiniteValue, PathRedactor, parse_engine_event
from service.api.settings import Settings, subprocess_env
from service.api.storage import (
    CANCELLED,
    COMPLETED,
    FAILED,
    INTERRUPTED_REASON,
    QUEUED,
    TIMEOUT,
    JobRecord,
    LeaseLost,
    LeaseState,
    StorageError,
    Store,
    retrying,
)

TERMINAL_EVENT_STATUS = {"end": COMPLETED, "timeout": TIMEOUT, "error": FAILED}
MAX_EVENT_LINE_BYTES = 1 << 20
LOG_TAIL_LINES = 60
LOG_TAIL_CHARS = 8000
WATCHDOG_SECONDS = 2.0
# An idle worker looks for queued work whenever the store announces a change, and at least this often.
CLAIM_POLL_SECONDS = 1.0
# A change of the running job (a cancel request, or just its own events) triggers a renewal, at most this often.
MIN_RENEW_GAP_SECONDS = 0.25
log = logging.getLogger("pgolf.service")


def new_worker_id() -> str:
    """Stable for the life of the process, unique across machines and restarts: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class _Running:
    """A job's live subprocess and why it may have to stop early."""

    process: asyncio.subprocess.Process | None = None  # None until the evaluator is started
    cancel_requested: bool = False
    interrupted: bool = False  # killed because the worker is shutting down
    lost: bool = False  # the job is no longer this worker's: record nothing more


@dataclass
class _Progress:
    """What the worker learned from the engine's events so far: enough for partial figures after a kill."""

    chunks_done: int = 0
    nll_sum: float = 0.0
    last_chunk: dict[str, Any] | None = None
    terminal: dict[str, Any] | None = None
    storage_failure: str | None = None  # an event could not be stored: the job's record would be incomplete
    log_lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))

    def partial_figures(self) -> dict[str, Any]:
        chunk = self.last_chunk or {}
        targets, scored_bytes = _count(chunk.get("running_targets")), _count(chunk.get("running_bytes"))
        return {
            "targets_scored": targets,
            "bytes": scored_bytes,
            "nll_sum": self.nll_sum,
            "partial_val_loss": self.nll_sum / targets if targets else None,
            "partial_val_bpb": _number(chunk.get("running_bpb")),
            "chunks_done": self.chunks_done,
        }

    def log_tail(self) -> str:
        return "\n".join(self.log_lines)[-LOG_TAIL_CHARS:]


class _JobLost(Exception):
    """The store says this job is no longer this worker's (its lease expired, or it was requeued)."""


class Worker:
    """Claims and runs one job at a time under `worker_id` until `stopping` is set."""

    def __init__(self, settings: Settings, store: Store, hub: EventHub, redactor: PathRedactor, *,
                 worker_id: str, stopping: asyncio.Event) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.redactor = redactor
        self.worker_id = worker_id
        self.stopping = stopping
        self.job_id: str | None = None  # the job this worker holds, from its claim until its finish is written
        self.unrecorded: dict[str, dict[str, Any]] = {}  # finish_job arguments the database did not take yet
        self._running: _Running | None = None

    # ----------------------------------------------------------------------------------------------------------
    # the loop

    async def run_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                seen = self.hub.total()
                # Every change anywhere wakes an idle worker, mostly other jobs' events; a claim is a write, so it
                # is tried only when a read (an index lookup) sees a queued job.
                job = (self.store.claim_next_queued(self.worker_id, self.settings.lease_seconds)
                       if self.store.list_jobs(limit=1, status=QUEUED) else None)
                if job is None:
                    await self.hub.wait_for_any(seen, CLAIM_POLL_SECONDS)
                    if self.hub.closed:
                        await asyncio.sleep(CLAIM_POLL_SECONDS)
                    continue
                await self.run_job(job)
            except asyncio.CancelledError:
                raise
            except StorageError as error:  # the database is unavailable: wait for it
                log.warning("worker %s: cannot claim a job (%s); trying again", self.worker_id, error)
                await asyncio.sleep(1.0)
            except Exception:  # a bug: log it and keep serving
                log.exception("worker %s: error; continuing", self.worker_id)
                await asyncio.sleep(1.0)

    def interrupt(self) -> None:
        """At SIGTERM: kill the evaluator now; the job is recorded as `interrupted`."""
        running = self._running
        if running is not None:
            running.interrupted = True
            _kill_process_group(running.process)

    async def run_job(self, job: JobRecord) -> None:
        self.job_id = job.id
        log.info("job %s: claimed by worker %s (attempt %d)", job.id, self.worker_id, job.attempts)
        progress = _Progress()
        started = time.monotonic()
        try:
            try:
                status, terminal, reason = await self._evaluate(job, progress, started)
            except _JobLost:
                log.warning("job %s: no longer held by worker %s (lease lost); its evaluator was stopped and "
                            "nothing more is written", job.id, self.worker_id)
                return
            except Exception as error:  # a bug here must still end the job, never leave it running
                status, reason = FAILED, f"internal error in the service: {type(error).__name__}: {error}"
                terminal = service_error("internal", reason, progress.partial_figures())
            terminal.setdefault("elapsed_s", round(time.monotonic() - started, 4))
            terminal = self.redactor.event(terminal)
            log.info("job %s: %s%s", job.id, status, f" ({reason})" if reason else "")
            finish = {"status": status, "reason": reason, "terminal_event": terminal,
                      "log_tail": self.redactor.text(progress.log_tail()) or None, "worker_id": self.worker_id}
            await self._record_finish(job.id, finish)
        finally:
            self.job_id = None

    async def _record_finish(self, job_id: str, finish: dict[str, Any]) -> None:
        try:
            await retrying(lambda: self.store.finish_job(job_id, **finish),
                           budget_seconds=self.settings.storage_retry_seconds, what=f"recording job {job_id}")
        except LeaseLost:
            log.warning("job %s: lease lost before its outcome (%s) could be written", job_id, finish["status"])
        except StorageError as error:
            # The outcome is known but not written: the watchdog writes it once the database takes it.
            log.error("job %s: its final status could not be written (%s); the watchdog keeps trying", job_id, error)
            self.unrecorded[job_id] = finish

    def write_unrecorded(self) -> None:
        """Called by the watchdog: write the outcomes the database refused, as soon as it takes them."""
        for job_id, finish in list(self.unrecorded.items()):
            try:
                self.store.finish_job(job_id, **finish)
            except LeaseLost:
                log.warning("job %s: lease lost before its outcome (%s) could be written", job_id, finish["status"])
            else:
                log.warning("job %s: final status %s written by the watchdog", job_id, finish["status"])
            del self.unrecorded[job_id]

    # ----------------------------------------------------------------------------------------------------------
    # one job

    async def _evaluate(self, job: JobRecord, progress: _Progress, started: float
                        ) -> tuple[str, dict[str, Any], str | None]:
        """The job's outcome; the lease is kept from the claim on, also while the artifact is copied."""
        running = _Running()
        self._running = running
        keeper = asyncio.create_task(self._keep_lease(job.id, running), name=f"pgolf-lease-{job.id}")
        try:
            outcome = await self._materialise_and_run(job, running, progress, started)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            self._running = None
        if running.lost:
            raise _JobLost(job.id)
        if running.interrupted:
            return _interrupted(progress)
        return outcome

    async def _materialise_and_run(self, job: JobRecord, running: _Running, progress: _Progress, started: float
                                   ) -> tuple[str, dict[str, Any], str | None]:
        cache_dir, budget = self.settings.artifacts_dir, self.settings.storage_retry_seconds
        artifact = await retrying(lambda: self.store.materialise_artifact(job.artifact_sha256, cache_dir),
                                  budget_seconds=budget, what=f"copying the artifact of {job.id}")
        if artifact is None or not artifact.is_file():
            reason = "the stored artifact file is missing"
            return FAILED, service_error("artifact_missing", reason, {}), reason
        code: Path | None = None
        if job.options.get("code_sha256"):
            code = await retrying(lambda: self.store.materialise_code(job.options["code_sha256"], cache_dir),
                                  budget_seconds=budget, what=f"copying the train_gpt.py of {job.id}")
            if code is None or not code.is_file():
                reason = "the stored train_gpt.py of this upstream artifact is missing"
                return FAILED, service_error("artifact_missing", reason, {}), reason
        max_seconds = float(job.options["max_seconds"])
        if self.stopping.is_set() or running.lost or running.cancel_requested:  # nothing to start any more
            running.interrupted = running.interrupted or self.stopping.is_set()
            return _outcome(progress, None, hard_killed=False, cancelled=running.cancel_requested,
                            limit_seconds=max_seconds, elapsed=time.monotonic() - started)
        process = await asyncio.create_subprocess_exec(
            *evaluator_argv(self.settings, artifact, job.options, code),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=MAX_EVENT_LINE_BYTES, start_new_session=True, env=subprocess_env(),
            preexec_fn=child_setup(self.settings.evaluator_limits, _die_with_parent),
        )
        log.info("job %s: evaluator pid %d started (%s)", job.id, process.pid, job.options)
        running.process = process
        if self.stopping.is_set() or running.lost or running.cancel_requested:  # while the process was starting
            running.interrupted = running.interrupted or self.stopping.is_set()
            _kill_process_group(process)
        try:
            pumps = asyncio.gather(self._pump_events(job.id, running, progress), _pump_log(process.stderr, progress))
            try:
                await asyncio.wait_for(asyncio.shield(pumps), max_seconds + self.settings.kill_grace_seconds)
                hard_killed = False
            except asyncio.TimeoutError:
                hard_killed = True
                _kill_process_group(process)
            await pumps
            await process.wait()
        finally:
            if process.returncode is None:
                _kill_process_group(process)
                await process.wait()
        return _outcome(progress, process.returncode, hard_killed=hard_killed,
                        cancelled=running.cancel_requested, limit_seconds=max_seconds,
                        elapsed=time.monotonic() - started, limits=self.settings.evaluator_limits)

    async def _keep_lease(self, job_id: str, running: _Running) -> None:
        """Renew the lease every third of its length, and soon after any change of the job (a cancel request
        reaches the worker through the store's notifications); stop the evaluator when the answer says so."""
        lease = self.settings.lease_seconds
        renewed_at = time.monotonic()
        while True:
            seen = self.hub.version(job_id)
            await self.hub.wait_for_change(job_id, seen, lease / 3)
            await asyncio.sleep(max(0.0, renewed_at + MIN_RENEW_GAP_SECONDS - time.monotonic()))
            try:
                state = self.store.renew_lease(job_id, self.worker_id, lease)
            except StorageError as error:
                if time.monotonic() - renewed_at < lease:
                    log.warning("job %s: lease renewal failed (%s); trying again", job_id, error)
                    continue
                log.error("job %s: no lease renewal for %g s (%s): the lease has expired", job_id, lease, error)
                state = LeaseState.LOST
            renewed_at = time.monotonic()
            if state is LeaseState.CANCEL_REQUESTED:
                running.cancel_requested = True
            elif state is LeaseState.LOST:
                running.lost = True
            else:
                continue
            _kill_process_group(running.process)
            return

    async def _pump_events(self, job_id: str, running: _Running, progress: _Progress) -> None:
        """Store each event (see public_events.py) as it comes; anything else on stdout goes to the log tail."""
        process = running.process
        assert process is not None and process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line longer than MAX_EVENT_LINE_BYTES: not an event this service accepts
                progress.log_lines.append(f"[service] evaluator wrote a line over {MAX_EVENT_LINE_BYTES} bytes")
                _kill_process_group(process)
                return
            if not line:
                return
            try:
                event = parse_engine_event(line)
            except NonFiniteValue as error:
                if progress.terminal is None:
                    progress.terminal = service_error("non_finite", f"{error}; the evaluation has no valid score",
                                                       progress.partial_figures())
                _kill_process_group(process)
                continue
            if event is None:
                progress.log_lines.append(line.decode("utf-8", "replace").rstrip())
                continue
            if progress.terminal is not None or progress.storage_failure is not None or running.lost:
                continue  # nothing counts after the terminal event, or once the job is not ours
            event = self.redactor.event(event)
            if event["type"] in TERMINAL_EVENT_STATUS:
                progress.terminal = event  # stored by finish_job together with the final status
                continue
            if event["type"] == "chunk":
                progress.chunks_done += 1
                progress.last_chunk = event
                progress.nll_sum += _number(event.get("nll_sum")) or 0.0
            try:
                await retrying(lambda event=event: self.store.append_event(job_id, event, worker_id=self.worker_id),
                               budget_seconds=self.settings.storage_retry_seconds, what=f"storing an event of {job_id}")
            except LeaseLost:
                running.lost = True
                _kill_process_group(process)
            except StorageError as error:
                progress.storage_failure = str(error)
                _kill_process_group(process)


class Watchdog:
    """Every few seconds, on every node: write the outcomes the database refused, and end every job whose lease
    expired. A single-machine service (the only runner of its SQLite store) also ends every job marked running
    that none of its workers holds, at once rather than after a lease: its process is gone."""

    def __init__(self, settings: Settings, store: Store, hub: EventHub, workers: Sequence[Worker], *,
                 sole_runner: bool) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.workers = workers
        self.sole_runner = sole_runner

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            try:
                self.check_once()
            except StorageError as error:
                log.warning("watchdog: the database is still unavailable (%s)", error)
            except Exception:
                log.exception("watchdog error; continuing")

    def check_once(self) -> None:
        for worker in self.workers:
            worker.write_unrecorded()
        if self.sole_runner:  # first: such a job is known to be orphaned now, whatever its lease says
            held = {job_id for worker in self.workers for job_id in (worker.job_id, *worker.unrecorded) if job_id}
            for job in self.store.running_jobs():
                if job.id in held:
                    continue
                reason = "the job's evaluator process is gone and no worker holds it"
                self.store.finish_job(job.id, status=FAILED, reason=reason,
                                      terminal_event=service_error("process_gone", reason, {}))
                log.warning("job %s: %s; marked failed", job.id, reason)
        for job_id, outcome in self.store.expire_leases(self.settings.requeue_lost_jobs):
            log.warning("job %s: the lease of its worker ran out (worker lost): %s", job_id, outcome)

    def flush(self) -> None:
        """At shutdown: one last try at the outcomes the database refused."""
        for worker in self.workers:
            with contextlib.suppress(StorageError):
                worker.write_unrecorded()


def upstream_args(options: dict[str, Any], code: Path | None) -> list[str]:
    """An upstream .ptz job: its train_gpt.py (copied from the store) and the run env it was validated with."""
    if code is None:
        return []
    env_args = [arg for item in options.get("env", []) for arg in ("--env", item)]
    return ["--code", str(code), *env_args]


def evaluator_argv(settings: Settings, artifact_path: Path, options: dict[str, Any], code: Path | None) -> list[str]:
    return [
        *settings.evaluator_command, str(artifact_path),
        "--data", str(settings.data_dir), "--tokenizer", str(settings.tokenizer),
        "--ttt" if options["ttt"] else "--no-ttt", "--ngram", options["ngram"],
        # Jobs stored before the recipe was an option ran the engine's default recipe.
        *(["--ttt-recipe", options["ttt_recipe"]] if options.get("ttt_recipe") else []),
        "--max-seconds", f"{options['max_seconds']:g}",
        *upstream_args(options, code),
        *settings.evaluator_extra_args,
    ]


async def _pump_log(stream: asyncio.StreamReader | None, progress: _Progress) -> None:
    assert stream is not None
    while line := await stream.readline():
        progress.log_lines.append(line.decode("utf-8", "replace").rstrip())


def _outcome(
    progress: _Progress, returncode: int | None, *, hard_killed: bool, cancelled: bool, limit_seconds: float,
    elapsed: float, limits: ResourceLimits | None = None,
) -> tuple[str, dict[str, Any], str | None]:
    """Final (status, terminal event, reason) of a finished subprocess, most specific cause first."""
    partial = progress.partial_figures()
    if cancelled:
        reason = "cancelled by request; the evaluator was killed"
        return CANCELLED, service_error("cancelled", reason, partial), reason
    if progress.storage_failure is not None:
        reason = f"storage: an event of this job could not be recorded, so the evaluator was stopped: " \
                 f"{progress.storage_failure}"
        return FAILED, service_error("storage", reason, partial), reason
    if progress.terminal is not None:
        terminal = progress.terminal
        status = TERMINAL_EVENT_STATUS[terminal["type"]]
        reason = None if status == COMPLETED else str(terminal.get("reason") or terminal.get("code") or status)
        return status, terminal, reason
    if hard_killed:
        reason = (f"evaluation limit of {limit_seconds:g} s reached; the evaluator did not stop by itself and "
                  f"was killed after {elapsed:.1f} s")
        return TIMEOUT, {"type": "timeout", "source": "service", "reason": reason, **partial}, reason
    breach = breach_reason(returncode, limits or ResourceLimits(), "PGOLF_EVALUATOR")
    if breach is not None:
        reason = f"the evaluator was stopped: {breach}"
        return FAILED, service_error("resource_limit", reason, partial), reason
    if returncode is not None and returncode < 0:
        signal_name = signal.Signals(-returncode).name
        reason = f"the evaluator was killed by {signal_name}"
        if -returncode == signal.SIGKILL:
            reason += " (out of memory, or killed from outside)"
        return FAILED, service_error("killed", reason, partial), reason
    last_log = progress.log_lines[-1] if progress.log_lines else "no output"
    if returncode:
        reason = f"the evaluator exited with status {returncode}: {last_log}"
    else:
        reason = f"the evaluator exited without a final event: {last_log}"
    return FAILED, service_error("crashed", reason, partial), reason


def _interrupted(progress: _Progress) -> tuple[str, dict[str, Any], str | None]:
    message = "the worker shut down while this job was running; the evaluator was killed"
    event = service_error(INTERRUPTED_REASON, INTERRUPTED_REASON, progress.partial_figures())
    return FAILED, {**event, "message": message}, INTERRUPTED_REASON


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def service_error(code: str, reason: str, partial: dict[str, Any]) -> dict[str, Any]:
    """An `error` event in the engine's schema, written by the service because the engine could not."""
    return {"type": "error", "source": "service", "code": code, "reason": reason, **partial}


def _kill_process_group(process: asyncio.subprocess.Process | None) -> None:
    """SIGKILL the evaluator and anything it started (torchrun ranks, data loaders)."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: if the worker's process dies (even by SIGKILL), the kernel kills the evaluator.

    Without this an evaluation would keep a GPU busy after a crash, invisible to the rest of the service, which
    has already ended its job (interrupted at a restart, or worker lost when the lease expired).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
