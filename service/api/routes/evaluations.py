"""`/evaluations`: history, status, event streams and cancellation of jobs."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from service.api.auth import User
from service.api.deps import ReaderDep, StateDep, WriterDep, may_cancel, may_read
from service.api.errors import ApiError
from service.api.jobs import JobNotActive
from service.api.schemas import JobView
from service.api.state import ServiceState
from service.api.storage import JobRecord
from service.api.streaming import event_stream_response, follow_events, wants_sse
from service.api.views import job_view

router = APIRouter(prefix="/evaluations", tags=["evaluations"])

StatusFilter = Literal["queued", "running", "completed", "failed", "timeout", "cancelled"]
MAX_EVENT_SEQ = 2**62  # far beyond any job's event count, and inside SQLite's 64-bit integers
_EVENT_ID = re.compile(r"[0-9]{1,18}")


def _readable_job(state: ServiceState, job_id: str, user: User | None) -> JobRecord:
    """The job, or 404 (also for a job the caller may not read: its existence is not theirs to learn)."""
    job = state.store.get_job(job_id) if len(job_id) <= 64 else None
    if job is None or not may_read(state, user, job):
        raise ApiError(404, "not_found", f"no evaluation with id {job_id[:64]!r}")
    return job


@router.get("", response_model=list[JobView])
async def list_evaluations(
    state: StateDep,
    user: ReaderDep,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    mine: Annotated[bool, Query(description="only the caller's own jobs")] = False,
) -> list[JobView]:
    """Jobs, newest first: all of them with public reads, else the caller's own (an admin's: all)."""
    sees_all = state.settings.reads == "public" or (user is not None and user.admin)
    if mine and user is None:
        raise ApiError(401, "unauthorized", "mine=true needs 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    owner = user.name if user is not None and (mine or not sees_all) else None
    return [job_view(state.store, job) for job in state.store.list_jobs(limit=limit, status=status, owner=owner)]


@router.get("/{job_id}", response_model=JobView)
async def read_evaluation(state: StateDep, user: ReaderDep, job_id: str) -> JobView:
    """Status, progress, result and compliance of one job."""
    return job_view(state.store, _readable_job(state, job_id, user))


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}},
                     "description": "stored events, then live ones until the terminal event"}},
)
async def read_evaluation_events(
    state: StateDep,
    user: ReaderDep,
    job_id: str,
    after: Annotated[int, Query(ge=-1, le=MAX_EVENT_SEQ,
                                description="resume after this event number (line n = event n)")] = -1,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Replay then follow the job's events: NDJSON, or server-sent events with `Accept: text/event-stream`."""
    _readable_job(state, job_id, user)
    if last_event_id is not None:  # EventSource reconnecting
        if not _EVENT_ID.fullmatch(last_event_id.strip()):
            raise ApiError(400, "bad_last_event_id", "Last-Event-ID must be an event number (ASCII digits)")
        after = max(after, int(last_event_id.strip()))
    return event_stream_response(follow_events(state.store, state.hub, job_id, after), sse=wants_sse(accept))


@router.delete("/{job_id}", response_model=JobView,
               responses={403: {"description": "not the job's owner (nor an admin)"},
                          409: {"description": "the job already finished"}})
async def cancel_evaluation(state: StateDep, user: WriterDep, job_id: str) -> JobView:
    """Cancel a queued job, or kill a running job's evaluator; the job ends as `cancelled`. Owner or admin only."""
    job = _readable_job(state, job_id, user)
    if not may_cancel(user, job):
        raise ApiError(403, "not_owner", f"evaluation {job_id} belongs to another user; only its owner or an "
                       "admin may cancel it")
    try:
        cancelled = await state.queue.cancel(job_id)
    except JobNotActive:
        raise ApiError(409, "not_active", f"evaluation {job_id} already ended as {job.status}") from None
    return job_view(state.store, cancelled)
