"""The job queue: admission (with back-pressure), worker loops, one evaluator subprocess per job.

Each evaluation runs as `python -m service evaluate ...` in its own process group, so a crash, an
out-of-memory kill or a hung engine only ever ends that job. Whatever happens to the subprocess, the worker
records a terminal event and a terminal status; a job cannot be left "running" by this process, and one left
by a previous process is marked failed at start (`Store.mark_interrupted`).

Time limits, from the inside out: the engine gets `--max-seconds` and stops cleanly between chunks with a
`timeout` event carrying its figures; the worker kills the process group `kill_grace_seconds` later as a
backstop and then writes the `timeout` event itself from the last chunk it saw.

Storage faults: every job-state write is retried with backoff for `storage_retry_seconds`. An event that still
cannot be stored ends the job (its record would be incomplete): the evaluator is killed and the job fails with
the storage error as its reason. A final status that cannot be written is kept in memory and written by the
watchdog as soon as the database takes it; the watchdog also ends any job marked running that no worker holds.

Shutdown (`begin_shutdown`): no new job starts, every evaluator is killed at once, and the workers record their
jobs as failed with reason `interrupted`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    StorageError,
    Store,
    retrying,
)

TERMINAL_EVENT_STATUS = {"end": COMPLETED, "timeout": TIMEOUT, "error": FAILED}
MAX_EVENT_LINE_BYTES = 1 << 20
LOG_TAIL_LINES = 60
LOG_TAIL_CHARS = 8000
WATCHDOG_SECONDS = 2.0
log = logging.getLogger("pgolf.service")


class QueueFull(Exception):
    def __init__(self, active_jobs: int, retry_after_seconds: int) -> None:
        super().__init__(f"the queue is full ({active_jobs} jobs queued or running); a place frees in at most "
                         f"{retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class JobNotActive(Exception):
    """A cancel request for a job that already finished."""


class EventHub:
    """Wakes followers of a job when it gets a new event. The events themselves are read from the Store.

    A follower notes `version(job_id)` before reading events and then waits for it to change, so an event
    that lands between the read and the wait is never missed (everything runs on the event loop thread).
    """

    def __init__(self) -> None:
        self._versions: dict[str, int] = collections.defaultdict(int)
        self._changed = asyncio.Condition()
        self.closed = False

    def version(self, job_id: str) -> int:
        return self._versions[job_id]

    async def close(self) -> None:
        """At shutdown: every follower wakes up and ends its stream."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def publish(self, job_id: str) -> None:
        async with self._changed:
            self._versions[job_id] += 1
            self._changed.notify_all()

    async def wait_for_change(self, job_id: str, seen_version: int, timeout: float) -> bool:
        """True when the job changed, False after `timeout` seconds without news."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.closed or self._versions[job_id] != seen_version), timeout
                )
            except asyncio.TimeoutError:
                return False
        return True


@dataclass
class _Running:
    """A job's live subprocess, kept so that DELETE can kill it."""

    process: asyncio.subprocess.Process
    cancel_requested: bool = False
    interrupted: bool = False  # killed because the service is shutting down


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


class JobQueue:
    """Admits validated uploads, hands queued jobs to `settings.workers` worker loops, cancels on request."""

    def __init__(self, settings: Settings, store: Store, hub: EventHub, redactor: PathRedactor) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.redactor = redactor
        self.capacity = settings.workers + settings.queue_bound
        self.stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._running: dict[str, _Running] = {}
        self._held: set[str] = set()  # jobs a worker has claimed and not yet recorded as finished
        self._unrecorded: dict[str, dict[str, Any]] = {}  # finish_job arguments the database did not take yet
        self._workers: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------------------------------
    # admission

    def check_capacity(self) -> None:
        """Raise QueueFull when no job could be queued now (also asked before reading an upload's body)."""
        active = self.store.count_active_jobs()
        if active >= self.capacity:
            raise QueueFull(active, self.retry_after_seconds())

    def submit(self, artifact_sha256: str, options: dict[str, Any], *, owner: str | None) -> JobRecord:
        """Queue a validated upload, or raise QueueFull. The check and the insert run without an await between
        them, so no two uploads can take the last place; the first event tells the client where to find it."""
        self.check_capacity()

        def queued_event(job: JobRecord, position: int) -> dict[str, Any]:
            return {"type": "queued", "source": "service", "job_id": job.id, "queue_position": position,
                    "links": job_links(job)}

        job = self.store.create_job(artifact_sha256, options, owner=owner, first_event=queued_event)
        self._wakeup.set()
        return job

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
        self._workers = [asyncio.create_task(self._worker_loop(), name=f"pgolf-worker-{n}")
                         for n in range(self.settings.workers)]
        self._watchdog = asyncio.create_task(self._watchdog_loop(), name="pgolf-watchdog")

    def begin_shutdown(self) -> None:
        """At SIGTERM: start nothing new and kill every evaluator now; the workers record `interrupted`."""
        self.stopping.set()
        self._wakeup.set()
        for running in self._running.values():
            running.interrupted = True
            _kill_process_group(running.process)

    async def stop(self, wait_seconds: float = 3.0) -> None:
        """Let the workers record their interrupted jobs (briefly), then stop them and the watchdog."""
        self.begin_shutdown()
        await asyncio.wait(self._workers, timeout=wait_seconds)
        tasks = [*self._workers, *([self._watchdog] if self._watchdog else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id, finish in list(self._unrecorded.items()):
            with contextlib.suppress(StorageError):
                self.store.finish_job(job_id, **finish)

    async def cancel(self, job_id: str, wait_seconds: float = 10.0) -> JobRecord:
        """Cancel a queued job at once, or kill a running job's subprocess and wait for its worker to record it."""
        running = self._running.get(job_id)
        if running is None:
            job = self.store.get_job(job_id)
            if job is None or job.status != QUEUED:
                raise JobNotActive(job_id)
            job = await retrying(
                lambda: self.store.finish_job(job_id, status=CANCELLED, reason="cancelled while queued",
                                              terminal_event=_service_error("cancelled", "cancelled while queued",
                                                                            {})),
                budget_seconds=min(self.settings.storage_retry_seconds, 5.0), what=f"cancelling job {job_id}")
            await self.hub.publish(job_id)
            return job
        running.cancel_requested = True
        _kill_process_group(running.process)
        deadline = time.monotonic() + wait_seconds
        while True:
            seen = self.hub.version(job_id)
            job = self.store.get_job(job_id)
            assert job is not None
            remaining = deadline - time.monotonic()
            if job.is_terminal or remaining <= 0:
                return job
            await self.hub.wait_for_change(job_id, seen, remaining)

    async def _worker_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.store.claim_next_queued()
                if job is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._held.add(job.id)
                await self.hub.publish(job.id)
                await self._run_job(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the database is locked: log it and keep serving; a dead worker stalls the queue
                log.exception("worker error; continuing")
                await asyncio.sleep(1.0)

    async def _run_job(self, job: JobRecord) -> None:
        progress = _Progress()
        started = time.monotonic()
        try:
            status, terminal, reason = await self._run_subprocess(job, progress, started)
        except Exception as error:  # a bug here must still end the job, never leave it running
            status, reason = FAILED, f"internal error in the service: {type(error).__name__}: {error}"
            terminal = _service_error("internal", reason, progress.partial_figures())
        terminal.setdefault("elapsed_s", round(time.monotonic() - started, 4))
        terminal = self.redactor.event(terminal)
        log.info("job %s: %s%s", job.id, status, f" ({reason})" if reason else "")
        finish = {"status": status, "reason": reason, "terminal_event": terminal,
                  "log_tail": self.redactor.text(progress.log_tail()) or None}
        await self._record_finish(job.id, finish)

    async def _record_finish(self, job_id: str, finish: dict[str, Any]) -> None:
        try:
            await retrying(lambda: self.store.finish_job(job_id, **finish),
                           budget_seconds=self.settings.storage_retry_seconds, what=f"recording job {job_id}")
        except StorageError as error:
            # The outcome is known but not written: the watchdog writes it once the database takes it.
            log.error("job %s: its final status could not be written (%s); the watchdog keeps trying", job_id, error)
            self._unrecorded[job_id] = finish
        else:
            await self.hub.publish(job_id)
        finally:
            self._held.discard(job_id)

    async def _watchdog_loop(self) -> None:
        """Every few seconds: write the final statuses the database refused, and end every job marked running
        that no worker holds (its process is gone: a worker crashed, or its record was left behind)."""
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            try:
                for job_id, finish in list(self._unrecorded.items()):
                    self.store.finish_job(job_id, **finish)
                    del self._unrecorded[job_id]
                    log.warning("job %s: final status %s written by the watchdog", job_id, finish["status"])
                    await self.hub.publish(job_id)
                for job in self.store.running_jobs():
                    if job.id in self._held or job.id in self._unrecorded or job.id in self._running:
                        continue
                    reason = "the job's evaluator process is gone and no worker holds it"
                    self.store.finish_job(job.id, status=FAILED, reason=reason,
                                          terminal_event=_service_error("process_gone", reason, {}))
                    log.warning("job %s: %s; marked failed", job.id, reason)
                    await self.hub.publish(job.id)
            except StorageError as error:
                log.warning("watchdog: the database is still unavailable (%s)", error)
            except Exception:
                log.exception("watchdog error; continuing")

    async def _run_subprocess(
        self, job: JobRecord, progress: _Progress, started: float
    ) -> tuple[str, dict[str, Any], str | None]:
        artifact_path = self.store.materialise_artifact(job.artifact_sha256, self.settings.artifacts_dir)
        if artifact_path is None:
            reason = "the stored artifact file is missing"
            return FAILED, _service_error("artifact_missing", reason, {}), reason
        if self.stopping.is_set():
            return _interrupted(progress)
        max_seconds = float(job.options["max_seconds"])
        process = await asyncio.create_subprocess_exec(
            *self.evaluator_argv(artifact_path, job.options),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=MAX_EVENT_LINE_BYTES, start_new_session=True, env=subprocess_env(),
            preexec_fn=child_setup(self.settings.evaluator_limits, _die_with_parent),
        )
        log.info("job %s: evaluator pid %d started (%s)", job.id, process.pid, job.options)
        running = _Running(process)
        self._running[job.id] = running
        if self.stopping.is_set():  # SIGTERM arrived while the process was starting
            running.interrupted = True
            _kill_process_group(process)
        try:
            pumps = asyncio.gather(self._pump_events(job.id, process, progress),
                                   _pump_log(process.stderr, progress))
            try:
                await asyncio.wait_for(asyncio.shield(pumps), max_seconds + self.settings.kill_grace_seconds)
                hard_killed = False
            except asyncio.TimeoutError:
                hard_killed = True
                _kill_process_group(process)
            await pumps
            await process.wait()
        finally:
            self._running.pop(job.id, None)
            if process.returncode is None:
                _kill_process_group(process)
                await process.wait()
        elapsed = time.monotonic() - started
        if running.interrupted:
            return _interrupted(progress)
        return _outcome(progress, process.returncode, hard_killed=hard_killed,
                        cancelled=running.cancel_requested, limit_seconds=max_seconds, elapsed=elapsed,
                        limits=self.settings.evaluator_limits)

    def upstream_args(self, options: dict[str, Any]) -> list[str]:
        """An upstream .ptz job: the stored train_gpt.py and the run env it was validated with."""
        if not options.get("code_sha256"):
            return []
        code = self.store.materialise_code(options["code_sha256"], self.settings.artifacts_dir)
        if code is None:
            raise FileNotFoundError(f"the stored code file {options['code_sha256']} of this job is missing")
        env_args = [arg for item in options.get("env", []) for arg in ("--env", item)]
        return ["--code", str(code), *env_args]

    def evaluator_argv(self, artifact_path: Path, options: dict[str, Any]) -> list[str]:
        settings = self.settings
        return [
            *settings.evaluator_command, str(artifact_path),
            "--data", str(settings.data_dir), "--tokenizer", str(settings.tokenizer),
            "--ttt" if options["ttt"] else "--no-ttt", "--ngram", options["ngram"],
            # Jobs stored before the recipe was an option ran the engine's default recipe.
            *(["--ttt-recipe", options["ttt_recipe"]] if options.get("ttt_recipe") else []),
            "--max-seconds", f"{options['max_seconds']:g}",
            *self.upstream_args(options),
            *settings.evaluator_extra_args,
        ]

    async def _pump_events(self, job_id: str, process: asyncio.subprocess.Process, progress: _Progress) -> None:
        """Store and announce each event (see public_events.py); anything else on stdout goes to the log tail."""
        assert process.stdout is not None
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
                    progress.terminal = _service_error("non_finite", f"{error}; the evaluation has no valid score",
                                                       progress.partial_figures())
                _kill_process_group(process)
                continue
            if event is None:
                progress.log_lines.append(line.decode("utf-8", "replace").rstrip())
                continue
            if progress.terminal is not None or progress.storage_failure is not None:
                continue  # nothing counts after the terminal event
            event = self.redactor.event(event)
            if event["type"] in TERMINAL_EVENT_STATUS:
                progress.terminal = event  # stored by finish_job together with the final status
                continue
            if event["type"] == "chunk":
                progress.chunks_done += 1
                progress.last_chunk = event
                progress.nll_sum += _number(event.get("nll_sum")) or 0.0
            try:
                await retrying(lambda event=event: self.store.append_event(job_id, event),
                               budget_seconds=self.settings.storage_retry_seconds, what=f"storing an event of {job_id}")
            except StorageError as error:
                progress.storage_failure = str(error)
                _kill_process_group(process)
                continue
            await self.hub.publish(job_id)


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
        return CANCELLED, _service_error("cancelled", reason, partial), reason
    if progress.storage_failure is not None:
        reason = f"storage: an event of this job could not be recorded, so the evaluator was stopped: " \
                 f"{progress.storage_failure}"
        return FAILED, _service_error("storage", reason, partial), reason
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
        return FAILED, _service_error("resource_limit", reason, partial), reason
    if returncode is not None and returncode < 0:
        signal_name = signal.Signals(-returncode).name
        reason = f"the evaluator was killed by {signal_name}"
        if -returncode == signal.SIGKILL:
            reason += " (out of memory, or killed from outside)"
        return FAILED, _service_error("killed", reason, partial), reason
    last_log = progress.log_lines[-1] if progress.log_lines else "no output"
    if returncode:
        reason = f"the evaluator exited with status {returncode}: {last_log}"
    else:
        reason = f"the evaluator exited without a final event: {last_log}"
    return FAILED, _service_error("crashed", reason, partial), reason


def _interrupted(progress: _Progress) -> tuple[str, dict[str, Any], str | None]:
    message = "the service shut down while this job was running; the evaluator was killed"
    event = _service_error(INTERRUPTED_REASON, INTERRUPTED_REASON, progress.partial_figures())
    return FAILED, {**event, "message": message}, INTERRUPTED_REASON


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _service_error(code: str, reason: str, partial: dict[str, Any]) -> dict[str, Any]:
    """An `error` event in the engine's schema, written by the service because the engine could not."""
    return {"type": "error", "source": "service", "code": code, "reason": reason, **partial}


def job_links(job: JobRecord) -> dict[str, str]:
    return {"self": f"/evaluations/{job.id}", "events": f"/evaluations/{job.id}/events",
            "artifact_sha256": job.artifact_sha256}


def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the evaluator and anything it started (torchrun ranks, data loaders)."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: if the API process dies (even by SIGKILL), the kernel kills the evaluator.

    Without this an evaluation would keep a GPU busy after a crash, invisible to the restarted service, which
    has already marked its job interrupted.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
