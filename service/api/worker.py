"""`python -m service worker`: run evaluations on this machine for a cluster that shares one job store.

    PGOLF_DATABASE_URL=postgresql://pgolf@db-host/pgolf PGOLF_DATA_DIR=/data PGOLF_STORAGE_DIR=/var/lib/pgolf \\
        PGOLF_EVAL_ARGS="--device cuda" python -m service worker

One job at a time (an evaluation takes the whole machine): claim the oldest queued job under a lease, copy its
artifact from the store into PGOLF_STORAGE_DIR, run the evaluator exactly as a single-machine service does
(service/api/runner.py), and write its events to the store as they come; the API nodes serve them. The worker
needs no shared filesystem with the API, only the database and the validation data.

SIGTERM or SIGINT: the running evaluator is killed at once and its job ends `failed: interrupted` (a deliberate
stop says so at once, rather than leaving the job to a lease that would only expire later); then the worker
exits with status 0. A worker that dies without that (kill -9, power loss) takes its evaluator with it
(PR_SET_PDEATHSIG), and its job ends when the lease expires: `failed: worker lost`, or requeued
(PGOLF_REQUEUE_LOST_JOBS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

from service.api.settings import Settings, SettingsError

BACKSTOP_EXIT_STATUS = 70  # EX_SOFTWARE: the orderly stop did not finish in time
log = logging.getLogger("pgolf.service")


def add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker", help="run evaluations from the shared job store (one machine of a cluster)",
        description="Claim queued jobs from the job store (PGOLF_DATABASE_URL, or the SQLite store under "
                    "PGOLF_STORAGE_DIR) one at a time and run their evaluations on this machine. Configuration "
                    "comes from PGOLF_* environment variables (PGOLF_DATA_DIR is required).",
    )
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from service.api.storage import DatabaseDamaged, StorageError

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"pgolf worker: {error}", file=sys.stderr)
        return 2
    logging.getLogger("pgolf").setLevel(logging.INFO)
    try:
        return asyncio.run(_serve(settings))
    except (DatabaseDamaged, StorageError) as error:
        print(f"pgolf worker: {error}", file=sys.stderr)
        return 2


async def _serve(settings: Settings) -> int:
    from service.api.hub import EventHub, relay_store_changes
    from service.api.public_events import PathRedactor
    from service.api.runner import Watchdog, Worker, new_worker_id
    from service.api.storage import open_store

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    hub = EventHub()
    stopping = asyncio.Event()
    redactor = PathRedactor([("data", settings.data_dir), ("tokenizer", settings.tokenizer),
                             ("storage", settings.storage_dir)])
    worker = Worker(settings, store, hub, redactor, worker_id=new_worker_id(), stopping=stopping)
    watchdog = Watchdog(settings, store, hub, [worker], sole_runner=False)

    def stop() -> None:
        if stopping.is_set():
            return
        log.warning("worker %s: stopping (signal)", worker.worker_id)
        stopping.set()
        worker.interrupt()
        threading.Thread(target=_backstop, args=(settings.shutdown_grace_seconds,), daemon=True).start()
        asyncio.ensure_future(hub.close())  # an idle worker wakes from its wait for work

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    tasks = [asyncio.create_task(relay_store_changes(store, hub), name="pgolf-store-changes"),
             asyncio.create_task(watchdog.run_forever(), name="pgolf-watchdog")]
    where = "PostgreSQL (PGOLF_DATABASE_URL)" if settings.database_url else f"SQLite {settings.database_path}"
    print(f"pgolf worker {worker.worker_id}: ready; store {where}, lease {settings.lease_seconds:g} s", flush=True)
    try:
        await worker.run_forever()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        watchdog.flush()
        with contextlib.suppress(Exception):
            store.close()
    print(f"pgolf worker {worker.worker_id}: stopped", flush=True)
    return 0


def _backstop(grace_seconds: float) -> None:
    """End the process after the grace even if the event loop is stuck (a database call that hangs)."""
    threading.Event().wait(grace_seconds)
    sys.stderr.write(f"pgolf worker: stop did not finish within {grace_seconds:g} s; exiting now\n")
    sys.stderr.flush()
    os._exit(BACKSTOP_EXIT_STATUS)
