"""`/evaluations`: history, status, event streams and cancellation of jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from service.api.deps import StateDep, WriteAccess
from service.api.errors import ApiError
from service.api.jobs import JobNotActive
from service.api.schemas import JobView
from service.api.state import ServiceState
from service.api.storage import JobRecord
from service.api.streaming import event_stream_response, follow_events, wants_sse
from service.api.views import job_view

router = APIRouter(prefix="/evaluations", tags=["evaluations"])

StatusFilter = Literal["queued", "running", "completed", "failed", "timeout", "cancelled"]


def _existing_job(state: ServiceState, job_id: str) -> JobRecord:
    job = state.store.get_job(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no evaluation with id {job_id!r}")
    return job


@router.get("", response_model=list[JobView])
async def list_evaluations(
    state: StateDep,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[JobView]:
    """Jobs, newest first."""
    return [job_view(state.store, job) for job in state.store.list_jobs(limit=limit, status=status)]


@router.get("/{job_id}", response_model=JobView)
async def read_evaluation(state: StateDep, job_id: str) -> JobView:
    """Status, progress, result and compliance of one job."""
    return job_view(state.store, _existing_job(state, job_id))


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}},
                     "description": "stored events, then live ones until the terminal event"}},
)
async def read_evaluation_events(
    state: StateDep,
    job_id: str,
    after: Annotated[int, Query(ge=-1, description="resume after this event number (line n = event n)")] = -1,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Replay then follow the job's events: NDJSON, or server-sent events with `Accept: text/event-stream`."""
    _existing_job(state, job_id)
    if last_event_id is not None and last_event_id.isdigit():  # EventSource reconnecting
        after = max(after, int(last_event_id))
    return event_stream_response(follow_events(state.store, state.hub, job_id, after), sse=wants_sse(accept))


@router.delete("/{job_id}", response_model=JobView, dependencies=[WriteAccess],
               responses={409: {"description": "the job already finished"}})
async def cancel_evaluation(state: StateDep, job_id: str) -> JobView:
    """Cancel a queued job, or kill a running job's evaluator; the job ends as `cancelled`."""
    job = _existing_job(state, job_id)
    try:
        cancelled = await state.queue.cancel(job_id)
    except JobNotActive:
        raise ApiError(409, "not_active", f"evaluation {job_id} already ended as {job.status}") from None
    return job_view(state.store, cancelled)
