"""`POST /evaluate` behind the route: admit, receive, validate, deduplicate, store, queue.

Order matters for the guarantees of the issue:
1. refusals that need no body come first: a declared length over the cap (413), a service shutting down (503),
   a queue already full (429, Retry-After from the running jobs' limits), and the client's bound on uploads in
   flight (429 / 503, see admission.py);
2. the body is read under its idle, rate, deadline and size bounds (408 / 413) into a scratch file (507 when the
   disk is full, with the scratch file removed);
3. the artifact is validated, and only then is a queue place taken (`JobQueue.submit`, 429 when it filled up in
   the meantime). The scratch file is deleted on every path that does not end in a stored artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.types import Receive

from service.api.admission import BodyLimits, UploadRefused, client_key, guarded_body
from service.api.auth import User
from service.api.errors import ApiError
from service.api.jobs import QueueFull
from service.api.schemas import EvaluationOptions
from service.api.settings import Settings
from service.api.state import ServiceState
from service.api.storage import JobRecord
from service.api.uploads import (
    CodeTooLarge,
    Upload,
    UploadError,
    UploadTooLarge,
    content_length_too_large,
    max_body_bytes,
    receive_upload,
)
from service.api.validation import is_upstream_manifest, tokenizer_mismatch
from service.engine.options import UPSTREAM_SUFFIX
from trainer.upstream_env import parse_env_assignments


@dataclass(frozen=True)
class Submission:
    job: JobRecord
    reused: bool  # an earlier job with the same artifact and options answers this upload


def resolve_options(fields: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Validated options with the defaults filled in: the form that identifies "the same options"."""
    try:
        options = EvaluationOptions.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ApiError(422, "invalid_options", problems) from None
    limit = settings.eval_limit_seconds
    if options.max_seconds is not None and options.max_seconds > limit:
        raise ApiError(422, "invalid_options", f"max_seconds {options.max_seconds:g} exceeds the limit {limit:g}")
    resolved: dict[str, Any] = {"ttt": options.ttt, "ttt_recipe": options.ttt_recipe, "ngram": options.ngram,
                                "max_seconds": options.max_seconds or limit}
    if options.env is not None:
        try:
            env = parse_env_assignments(options.env.split())
        except ValueError as error:
            raise ApiError(422, "bad_run_env", f"env: {error}") from None
        resolved["env"] = [f"{key}={value}" for key, value in sorted(env.items())]
    return resolved


def _queue_full(error: QueueFull) -> ApiError:
    return ApiError(429, "queue_full", str(error), headers={"Retry-After": str(error.retry_after_seconds)})


def _shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the service is shutting down; upload refused")


async def submit_upload(
    state: ServiceState, receive: Receive, *, user: User, client_host: str | None, content_type: str | None,
    content_length: str | None, force: bool,
) -> Submission:
    settings = state.settings
    cap = settings.max_artifact_bytes
    if content_length_too_large(content_length, cap):
        raise ApiError(413, "artifact_too_large", f"the request body declares {content_length} bytes; the "
                       f"artifact cap is {cap:,} bytes")
    if state.queue.stopping.is_set():
        raise _shutting_down()
    limits = BodyLimits(max_bytes=max_body_bytes(cap), idle_seconds=settings.upload_idle_seconds,
                        min_bytes_per_second=settings.upload_min_bytes_per_second,
                        deadline_seconds=settings.upload_deadline_seconds)
    try:
        state.queue.check_capacity()  # no point reading 16 MB for a queue that is full now
        with state.uploads.hold(client_key(client_host)):
            body = guarded_body(receive, limits, state.queue.stopping)
            async with contextlib.aclosing(body):
                upload = await receive_upload(body, content_type, settings.uploads_dir, cap)
        try:
            return await _queue_upload(state, upload, user=user, force=force)
        finally:
            upload.discard()  # no-op once the store moved the file into place
    except CodeTooLarge as error:
        raise ApiError(413, "code_too_large", str(error)) from None
    except QueueFull as error:
        raise _queue_full(error) from None
    except UploadRefused as error:
        headers = None if error.retry_after_seconds is None else {"Retry-After": str(error.retry_after_seconds)}
        raise ApiError(error.status, error.code, str(error), headers=headers) from None
    except UploadTooLarge as error:
        raise ApiError(413, "artifact_too_large", str(error)) from None
    except UploadError as error:
        raise ApiError(400, "bad_upload", str(error)) from None


async def _queue_upload(state: ServiceState, upload: Upload, *, user: User, force: bool) -> Submission:
    store, settings = state.store, state.settings
    options = resolve_options(upload.fields, settings)
    # Reuse only what this user may read: with private reads, another user's job is not theirs to see.
    reuse_owner = None if settings.reads == "public" or user.admin else user.name
    # An upstream .ptz is read with its submission's code and run env, so both are part of "the same options".
    if upload.code is not None:
        options["code_sha256"] = hashlib.sha256(upload.code).hexdigest()
    if not force:
        earlier = store.find_reusable_job(upload.sha256, options, owner=reuse_owner)
        if earlier is not None:
            return Submission(earlier, reused=True)

    known = store.get_artifact(upload.sha256)
    if known is not None and known.present and upload.code is None:
        manifest = known.manifest
    else:
        verdict = await state.validator.validate(upload.path, code=upload.code, env=options.get("env", []))
        if state.queue.stopping.is_set():
            raise _shutting_down()
        if verdict.manifest is None:
            raise ApiError(422, verdict.code, verdict.message)
        manifest = verdict.manifest
    upstream = is_upstream_manifest(manifest)
    if not upstream:  # a .pgolf artifact carries its own config: code and env are ignored (the job says so)
        for key in ("code_sha256", "env"):
            options.pop(key, None)
    mismatch = tokenizer_mismatch(manifest, state.tokenizer)
    if mismatch is not None:
        raise ApiError(422, "tokenizer_mismatch", mismatch)

    state.queue.check_capacity()  # before the artifact is stored: a refused upload leaves nothing behind
    if known is None or not known.present:
        # The store takes the file (and leaves nothing behind when it cannot record it: 507/503 say so).
        store.put_artifact(upload.sha256, upload.size_bytes, upload.path, manifest,
                           suffix=UPSTREAM_SUFFIX if upstream else ".pgolf")
    if upstream and upload.code is not None:
        store.put_code(options["code_sha256"], upload.code)
    return Submission(state.queue.submit(upload.sha256, options, owner=user.name), reused=False)
