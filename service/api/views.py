"""Response bodies built from stored records."""

from __future__ import annotations

from datetime import datetime, timezone

from service.api.jobs import job_links
from service.api.schemas import JobLinks, JobView
from service.api.storage import JobRecord, Store

_PROGRESS_FIELDS = ("index", "running_targets", "running_bytes", "running_bpb", "chunk_bpb", "elapsed_s")


def iso_time(epoch_seconds: float | None) -> str | None:
    if epoch_seconds is None:
        return None
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).isoformat(timespec="milliseconds")


def job_view(store: Store, job: JobRecord) -> JobView:
    artifact = store.get_artifact(job.artifact_sha256)
    last_chunk = store.last_event_of_type(job.id, "chunk")
    progress = None if last_chunk is None else {key: last_chunk.get(key) for key in _PROGRESS_FIELDS}
    result = job.result
    return JobView(
        id=job.id,
        owner=job.owner,
        status=job.status,  # type: ignore[arg-type]  # the Store only writes the statuses JobView lists
        reason=job.reason,
        artifact_sha256=job.artifact_sha256,
        artifact_bytes=None if artifact is None else artifact.size_bytes,
        options=job.options,
        created_at=iso_time(job.created_at) or "",
        started_at=iso_time(job.started_at),
        finished_at=iso_time(job.finished_at),
        queue_position=store.queue_position(job),
        progress=progress,
        result=result,
        compliance=None if result is None else result.get("compliance"),
        log_tail=job.log_tail,
        worker_id=job.worker_id,
        attempts=job.attempts,
        links=JobLinks(**job_links(job)),
    )
