"""Health and limits."""

from __future__ import annotations

import time

from fastapi import APIRouter

from service.api.deps import CallerDep, StateDep
from service.api.errors import ApiError
from service.api.schemas import Health, Limits, WhoAmI
from service.api.storage import QUEUED, RUNNING

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
async def read_health(state: StateDep) -> Health:
    """Liveness, plus how busy the queue is."""
    counts = state.store.count_by_status()
    return Health(status="ok", running=counts.get(RUNNING, 0), queued=counts.get(QUEUED, 0),
                  capacity=state.queue.capacity,
                  uptime_s=round(time.monotonic() - state.started_monotonic, 3))


@router.get("/limits", response_model=Limits)
async def read_limits(state: StateDep) -> Limits:
    """The limits this service enforces, for clients to check before uploading."""
    settings = state.settings
    return Limits(
        max_artifact_bytes=settings.max_artifact_bytes,
        eval_limit_seconds=settings.eval_limit_seconds,
        kill_grace_seconds=settings.kill_grace_seconds,
        workers=settings.workers,
        queue_bound=settings.queue_bound,
        auth_required=True,
        reads=settings.reads,
        upload_idle_seconds=settings.upload_idle_seconds,
        upload_min_bytes_per_second=settings.upload_min_bytes_per_second,
        upload_deadline_seconds=settings.upload_deadline_seconds,
        uploads_per_client=settings.uploads_per_client,
        ngram_modes=["off", "exact", "hashed-940"],
        tokenizer_sha256=state.tokenizer.sha256,
        vocab_size=state.tokenizer.vocab_size,
    )


@router.get("/whoami", response_model=WhoAmI, responses={401: {"description": "no token, or a wrong one"}})
async def read_whoami(state: StateDep, user: CallerDep) -> WhoAmI:
    """The user the bearer token names (the page checks a token with it)."""
    if user is None:
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return WhoAmI(user=user.name, admin=user.admin, reads=state.settings.reads)
