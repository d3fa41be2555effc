"""The FastAPI application: `create_app(settings)`.

    PGOLF_DATA_DIR=data/embedded python -m service serve
    curl -N -H "Authorization: Bearer $PGOLF_TOKEN" -F artifact=@model.pgolf http://127.0.0.1:8000/evaluate
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.api.admission import UploadSlots
from service.api.auth import UserDirectory
from service.api.connections import CloseUnfinishedBodies
from service.api.errors import install_error_handlers
from service.api.hub import EventHub, relay_store_changes
from service.api.jobs import JobQueue
from service.api.public_events import PathRedactor
from service.api.routes import comparisons, evaluate, evaluations, meta
from service.api.settings import Settings
from service.api.state import ServiceState
from service.api.storage import StorageError, open_store
from service.api.validation import ArtifactValidator, TokenizerIdentity

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
log = logging.getLogger("pgolf.service")


def announce(message: str) -> None:
    print(message, flush=True)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        _clear_scratch(settings.uploads_dir)
        store = open_store(settings)  # raises DatabaseRefused rather than touch a damaged or newer database
        users = UserDirectory.load(settings, announce)
        hub = EventHub()
        relay = asyncio.create_task(relay_store_changes(store, hub), name="pgolf-store-changes")
        redactor = PathRedactor([("data", settings.data_dir), ("tokenizer", settings.tokenizer),
                                 ("storage", settings.storage_dir)])
        queue = JobQueue(settings, store, hub, redactor)
        validator = ArtifactValidator(max_file_bytes=settings.max_artifact_bytes,
                                      timeout_seconds=settings.validation_timeout_seconds,
                                      limits=settings.validator_limits)
        tokenizer = TokenizerIdentity.of_model_file(settings.tokenizer)
        uploads = UploadSlots(per_client=settings.uploads_per_client, total=settings.uploads_in_flight,
                              deadline_seconds=settings.upload_deadline_seconds)
        app.state.service = ServiceState(settings, store, hub, queue, validator, tokenizer, users, uploads)
        await validator.start()
        queue.start()
        try:
            yield
        finally:
            await app.state.service.begin_shutdown()
            await queue.stop(wait_seconds=min(3.0, settings.shutdown_grace_seconds / 4))
            await validator.close()
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            if queue.sole_runner:
                try:  # now, rather than at the next start: the record is true while we are down
                    store.mark_interrupted()
                except StorageError as error:  # the next start marks them; shutdown must not wait for the database
                    log.warning("could not mark running jobs interrupted at shutdown (%s)", error)
            store.close()

    app = FastAPI(
        title="pgolf evaluation service",
        summary="Upload a Parameter Golf artifact; get its bits per byte on FineWeb val, streamed per chunk.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(CloseUnfinishedBodies)
    app.include_router(evaluate.router)
    app.include_router(evaluations.router)
    app.include_router(meta.router)
    app.include_router(comparisons.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


async def begin_shutdown(app: FastAPI) -> None:
    """What SIGTERM does first (service/api/shutdown.py); a no-op before the lifespan has started."""
    state = getattr(app.state, "service", None)
    if state is not None:
        await state.begin_shutdown()


def _clear_scratch(uploads_dir: Path) -> None:
    """Partial uploads of a previous process are garbage: nothing refers to them."""
    if uploads_dir.is_dir():
        for leftover in uploads_dir.glob("upload-*.part"):
            leftover.unlink(missing_ok=True)
