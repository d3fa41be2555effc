"""Health and limits."""

from __future__ import annotations

import time

from fastapi import APIRouter

from service.api.deps import StateDep
from service.api.schemas import Health, Limits
from service.api.storage import QUEUED, RUNNING
from service.engine.options import NGRAM_MODES, TTT_RECIPE_NAMES, EvalOptions

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
        auth_required=settings.api_token is not None,
        ngram_modes=list(NGRAM_MODES),
        ttt_recipes=list(TTT_RECIPE_NAMES),
        default_options={"ttt": EvalOptions.ttt, "ttt_recipe": EvalOptions.ttt_recipe, "ngram": EvalOptions.ngram},
        tokenizer_sha256=state.tokenizer.sha256,
        vocab_size=state.tokenizer.vocab_size,
    )
