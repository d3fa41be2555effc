"""Request options and response bodies of the API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.options import NGRAM_MODES, TTT_RECIPE_NAMES, EvalOptions

# The engine's own lists, so every mode it has is selectable here and in the OpenAPI schema.
NgramMode = Literal[NGRAM_MODES]  # type: ignore[valid-type]
TTTRecipeName = Literal[TTT_RECIPE_NAMES]  # type: ignore[valid-type]


class EvaluationOptions(BaseModel):
    """Form fields of `POST /evaluate` besides the artifact. Unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttt: bool = Field(EvalOptions.ttt, description="score-first test-time training")
    ttt_recipe: TTTRecipeName = Field(EvalOptions.ttt_recipe, description="TTT recipe (used when ttt is true)")
    ngram: NgramMode = Field(EvalOptions.ngram,
                             description="n-gram mixing; 'hashed-940' is for comparison, never compliant")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock budget of this evaluation (at most the service limit, the default)"
    )
    env: str | None = Field(
        None, description="upstream .ptz only: the run command's settings, KEY=VALUE separated by spaces or "
                          "newlines (NUM_LAYERS=11 XSA_LAST_N=11 ...); ignored for .pgolf"
    )


class JobLinks(BaseModel):
    self: str
    events: str
    artifact_sha256: str


class JobView(BaseModel):
    id: str
    owner: str | None = Field(None, description="the user who submitted it")
    status: Literal["queued", "running", "completed", "failed", "timeout", "cancelled"]
    reason: str | None = Field(None, description="why the job failed, timed out or was cancelled")
    artifact_sha256: str
    artifact_bytes: int | None
    options: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None = Field(None, description="1 = next to start; only while queued")
    progress: dict[str, Any] | None = Field(None, description="figures of the last chunk event")
    result: dict[str, Any] | None = Field(None, description="the terminal event (end, timeout or error)")
    compliance: dict[str, Any] | None = None
    log_tail: str | None = Field(None, description="last lines the evaluator wrote to stderr")
    worker_id: str | None = Field(None, description="the worker that runs or ran it (host:pid:random)")
    attempts: int = Field(0, description="how often a worker claimed it (more than 1: requeued after a lost worker)")
    links: JobLinks


class JobAccepted(BaseModel):
    id: str
    status: str
    reused: bool = Field(description="an earlier job with the same artifact and options answers this upload")
    links: JobLinks


class Limits(BaseModel):
    max_artifact_bytes: int
    eval_limit_seconds: float
    kill_grace_seconds: float
    workers: int
    queue_bound: int
    auth_required: bool = Field(description="uploads and cancellations need a bearer token (always true)")
    reads: Literal["public", "private"] = Field(description="public: anyone reads every job; private: own only")
    upload_idle_seconds: float
    upload_min_bytes_per_second: int
    upload_deadline_seconds: float
    uploads_per_client: int
    ngram_modes: list[str]
    ttt_recipes: list[str]
    default_options: dict[str, Any] = Field(description="what POST /evaluate runs when a field is not given")
    tokenizer_sha256: str
    vocab_size: int


class WhoAmI(BaseModel):
    user: str
    admin: bool
    reads: Literal["public", "private"]


class Health(BaseModel):
    status: Literal["ok"]
    running: int
    queued: int
    capacity: int
    uptime_s: float


class ErrorBody(BaseModel):
    code: str
    message: str
