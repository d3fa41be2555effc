"""`/comparisons`: two finished jobs on the same artifact side by side (table data and the per-chunk bpb picture).

The page uses it for any pair of jobs, typically the compliant default and the `hashed-940` reproduction of one
artifact. The C1–C4 verdicts here are the engine's self-checks from each job's end event; the verifier's probes
run in `python -m verifier compare`, not in the service.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from service.api.auth import User
from service.api.deps import ReaderDep, StateDep, may_read
from service.api.errors import ApiError
from service.api.state import ServiceState
from service.compare import ComparisonError, compare_reports, render_plot, summarize, table_rows

router = APIRouter(prefix="/comparisons", tags=["comparisons"])

JobId = Annotated[str, Query(description="id of a finished job", min_length=1, max_length=64)]
EVENT_PAGE = 500


def _job_events(state: ServiceState, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = -1
    while page := state.store.events_after(job_id, after, limit=EVENT_PAGE):
        events += [json.loads(stored.body) for stored in page]
        after = page[-1].seq
    return events


def _comparison(state: ServiceState, user: User | None, a: str, b: str) -> dict[str, Any]:
    jobs = [state.store.get_job(job_id) for job_id in (a, b)]
    for job_id, job in zip((a, b), jobs, strict=True):
        # The read policy of /evaluations: a job the caller may not read does not exist for them.
        if job is None or not may_read(state, user, job):
            raise ApiError(404, "not_found", f"no evaluation with id {job_id!r}")
    # The service's own record of which artifact each job evaluated (the sha256 of the stored upload).
    if jobs[0].artifact_sha256 != jobs[1].artifact_sha256:  # type: ignore[union-attr]
        raise ApiError(422, "not_comparable", f"jobs {a} and {b} evaluated different artifacts; a comparison "
                       "needs one artifact")
    try:
        sides = [summarize(_job_events(state, job_id), f"job {job_id}") for job_id in (a, b)]
        comparison = compare_reports(*sides)
    except ComparisonError as error:
        code = "not_finished" if "no terminal" in str(error) else "not_comparable"
        raise ApiError(409 if code == "not_finished" else 422, code, str(error)) from None
    comparison["jobs"] = [a, b]
    comparison["artifact_sha256"] = jobs[0].artifact_sha256  # type: ignore[union-attr]
    comparison["rows"] = [list(row) for row in table_rows(comparison)]
    return comparison


@router.get("", responses={404: {"description": "unknown job"}, 409: {"description": "a job has not finished"},
                           422: {"description": "the jobs evaluated different artifacts"}})
def read_comparison(state: StateDep, user: ReaderDep, a: JobId, b: JobId) -> dict[str, Any]:
    """Side-by-side figures of jobs `a` and `b`: per side val_bpb, compliance, measured Σp, C1–C4 self-checks and
    per-chunk bpb; `rows` is the table as the page shows it."""
    return _comparison(state, user, a, b)


@router.get("/plot.{image_format}",
            responses={200: {"content": {"image/png": {}, "image/svg+xml": {}},
                             "description": "per-chunk bpb of both jobs"}})
def read_comparison_plot(state: StateDep, user: ReaderDep, image_format: Literal["png", "svg"], a: JobId,
                         b: JobId) -> Response:
    """The comparison picture (matplotlib): each job's per-chunk bpb against the target position."""
    body = render_plot(_comparison(state, user, a, b), image_format)
    media_type = "image/png" if image_format == "png" else "image/svg+xml"
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-store"})
