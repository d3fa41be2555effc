"""The FastAPI application: `create_app(settings)`.

    PGOLF_DATA_DIR=data/embedded python -m service serve
    curl -N -F artifact=@model.pgolf http://127.0.0.1:8000/evaluate
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.api.errors import ApiError, api_error_handler
from service.api.jobs import EventHub, JobQueue
from service.api.routes import evaluate, evaluations, meta
from service.api.settings import Settings
from service.api.state import ServiceState
from service.api.storage import Store
from service.api.validation import ArtifactValidator, TokenizerIdentity

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
log = logging.getLogger("pgolf.service")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        _clear_scratch(settings.uploads_dir)
        store = Store(settings.database_path)
        interrupted = store.mark_interrupted()
        if interrupted:
            log.warning("marked %d job(s) of the previous run as failed: interrupted", len(interrupted))
        hub = EventHub()
        queue = JobQueue(settings, store, hub)
        validator = ArtifactValidator(max_file_bytes=settings.max_artifact_bytes,
                                      timeout_seconds=settings.validation_timeout_seconds,
                                      limits=settings.validator_limits)
        tokenizer = TokenizerIdentity.of_model_file(settings.tokenizer)
        app.state.service = ServiceState(settings, store, hub, queue, validator, tokenizer)
        await validator.start()
        queue.start()
        try:
            yield
        finally:
            await queue.stop()
            await validator.close()
            store.mark_interrupted()  # now, rather than at the next start: the record is true while we are down
            store.close()

    app = FastAPI(
        title="pgolf evaluation service",
        summary="Upload a Parameter Golf artifact; get its bits per byte on FineWeb val, streamed per chunk.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.include_router(evaluate.router)
    app.include_router(evaluations.router)
    app.include_router(meta.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def _clear_scratch(uploads_dir: Path) -> None:
    """Partial uploads of a previous process are garbage: nothing refers to them."""
    if uploads_dir.is_dir():
        for leftover in uploads_dir.glob("upload-*.part"):
            leftover.unlink(missing_ok=True)
