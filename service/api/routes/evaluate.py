"""`POST /evaluate`: upload an artifact and follow (or not) its evaluation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import StateDep, WriterDep
from service.api.jobs import job_links
from service.api.schemas import JobAccepted
from service.api.streaming import event_stream_response, follow_events, wants_sse
from service.api.submissions import submit_upload

router = APIRouter(tags=["evaluate"])

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["artifact"],
                    "properties": {
                        "artifact": {"type": "string", "format": "binary",
                                     "description": "a .pgolf artifact, or an upstream .ptz with its 'code' "
                                                    "(at most the cap in /limits)"},
                        "code": {"type": "string", "format": "binary",
                                 "description": "upstream .ptz only: the submission's train_gpt.py (read "
                                                "statically, never run; at most 1,000,000 bytes)"},
                        "env": {"type": "string",
                                "description": "upstream .ptz only: the run command's KEY=VALUE settings"},
                        "ttt": {"type": "boolean", "default": False},
                        "ngram": {"type": "string", "enum": ["off", "exact", "hashed-940"], "default": "off"},
                        "max_seconds": {"type": "number", "description": "at most the service limit"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/evaluate",
    openapi_extra=_MULTIPART_BODY,
    responses={
        200: {"description": "NDJSON events of the evaluation, one JSON object per line",
              "content": {"application/x-ndjson": {}, "text/event-stream": {}}},
        202: {"model": JobAccepted, "description": "queued (wait=false)"},
        400: {"description": "not a multipart upload with an 'artifact' part"},
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "a cross-origin write from a browser"},
        408: {"description": "the body stalled, was too slow, or missed its deadline"},
        413: {"description": "artifact (or body) over the cap; nothing was stored"},
        422: {"description": "artifact refused by the reader, tokenizer mismatch, or invalid options"},
        429: {"description": "queue full, or this client has too many uploads in flight; see Retry-After"},
        503: {"description": "shutting down, too many uploads in flight, or the database is busy"},
        507: {"description": "the service's disk is full; nothing was stored"},
    },
)
async def evaluate(
    request: Request,
    state: StateDep,
    user: WriterDep,
    wait: Annotated[bool, Query(description="stream the events (true) or answer 202 with the job id")] = True,
    force: Annotated[bool, Query(description="evaluate again even if this artifact and options were")] = False,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Upload an artifact; the same artifact with the same options returns the stored evaluation."""
    submission = await submit_upload(
        state, request.receive, user=user, client_host=request.client.host if request.client else None,
        content_type=request.headers.get("content-type"), content_length=request.headers.get("content-length"),
        force=force,
    )
    job = submission.job
    headers = {"Location": f"/evaluations/{job.id}", "X-Evaluation-Id": job.id,
               "X-Evaluation-Reused": str(submission.reused).lower()}
    if not wait:
        body = JobAccepted(id=job.id, status=job.status, reused=submission.reused, links=job_links(job))
        return JSONResponse(body.model_dump(), status_code=200 if submission.reused else 202, headers=headers)
    # The stream only follows the job: a client that goes away stops reading, not the evaluation.
    return event_stream_response(follow_events(state.store, state.hub, job.id), sse=wants_sse(accept),
                                 headers=headers)
