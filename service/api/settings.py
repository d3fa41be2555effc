"""Service configuration, read once from the environment.

Every knob is an environment variable so the same image runs in compose, on a bare host and in tests. The
validation data and tokenizer are required: a service that cannot evaluate should fail at start, not on the
first upload.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.api.limits import ResourceLimits, default_cpu_seconds
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES

ARTIFACT_CAP_BYTES = SUBMISSION_LIMIT_BYTES  # an artifact alone can be no larger than the whole submission
KILL_GRACE_SECONDS = 15.0

# rlimits of the subprocesses that read uploaded files (docs/service.md, "Resource limits"). The validator's CPU
# allowance is per artifact; reading a 16 MB artifact takes about a second. Its address space covers torch's
# imports (~0.7 GiB) plus the decoded tensors of the largest payload the reader admits.
VALIDATOR_LIMITS = ResourceLimits(address_space_bytes=4 << 30, cpu_seconds=60, open_files=256)
EVALUATOR_ADDRESS_SPACE_BYTES = 64 << 30
EVALUATOR_OPEN_FILES = 4096


# Subprocesses read untrusted artifacts; they get no credential of the service (EvalAI keeps its API token out of
# the participant's container for the same reason): neither the API's tokens nor the job database's URL (which
# carries its password) or libpq's own password variables.
SECRET_ENV_VARS = ("PGOLF_API_TOKEN", "PGOLF_TOKENS", "PGOLF_DATABASE_URL", "PGPASSWORD", "PGPASSFILE")
READ_POLICIES = ("public", "private")


def subprocess_env() -> dict[str, str]:
    """The environment for evaluator and reader subprocesses: the service's own, minus its secrets."""
    return {name: value for name, value in os.environ.items() if name not in SECRET_ENV_VARS}


class SettingsError(ValueError):
    """An environment variable is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path  # PGOLF_DATA_DIR: directory holding the *_val_*.bin shards
    tokenizer: Path  # PGOLF_TOKENIZER: SentencePiece model of the data (default DATA_DIR/tokenizer.model)
    storage_dir: Path  # PGOLF_STORAGE_DIR: SQLite database, stored artifacts, upload scratch space
    # PGOLF_DATABASE_URL: postgresql://user@host:port/db puts jobs, events, artifacts and code in that PostgreSQL
    # database, shared by API nodes and workers on other machines; unset: the SQLite store under storage_dir.
    database_url: str | None = None
    max_artifact_bytes: int = ARTIFACT_CAP_BYTES  # PGOLF_MAX_ARTIFACT_BYTES
    eval_limit_seconds: float = EVAL_LIMIT_SECONDS  # PGOLF_EVAL_LIMIT_SECONDS
    # PGOLF_KILL_GRACE_SECONDS: the engine stops itself between chunks at the limit; the hard kill waits this
    # much longer so a clean `timeout` event (with its figures) wins over the backstop whenever possible.
    kill_grace_seconds: float = KILL_GRACE_SECONDS
    # PGOLF_WORKERS: evaluations this node runs at once, one subprocess each; 0: an API node only, whose jobs
    # run on `python -m service worker` machines (a cluster, docs/service.md "Deployment").
    workers: int = 1
    queue_bound: int = 8  # PGOLF_QUEUE_BOUND: validated jobs allowed to wait beyond the workers
    host: str = "127.0.0.1"  # PGOLF_HOST
    port: int = 8000  # PGOLF_PORT
    # PGOLF_EVALUATOR: command prefix of the evaluator; ARTIFACT and the options are appended. Replace it to run
    # evaluations inside a container (e.g. "docker run --rm --network none ... python -m service evaluate").
    evaluator_command: tuple[str, ...] = (sys.executable, "-m", "service", "evaluate")
    # PGOLF_EVAL_ARGS: extra engine arguments fixed by the organiser for every job (e.g. "--device cuda").
    evaluator_extra_args: tuple[str, ...] = ()
    validation_timeout_seconds: float = 120.0  # PGOLF_VALIDATION_TIMEOUT_SECONDS
    # PGOLF_VALIDATOR_{ADDRESS_SPACE_BYTES,CPU_SECONDS,OPEN_FILES} and PGOLF_EVALUATOR_{...}; 0 disables one.
    validator_limits: ResourceLimits = VALIDATOR_LIMITS
    evaluator_limits: ResourceLimits = ResourceLimits(
        EVALUATOR_ADDRESS_SPACE_BYTES,
        default_cpu_seconds(EVAL_LIMIT_SECONDS + KILL_GRACE_SECONDS, os.cpu_count() or 1), EVALUATOR_OPEN_FILES)

    # --- upload admission (service/api/admission.py) ---
    # A connection must deliver its whole request head (request line and headers) within this many seconds.
    header_timeout_seconds: float = 10.0  # PGOLF_HEADER_TIMEOUT_SECONDS
    # An upload body is refused with 408 when no byte arrives for this long ...
    upload_idle_seconds: float = 30.0  # PGOLF_UPLOAD_IDLE_SECONDS
    # ... when, after the first idle period, its average rate falls below this (50 kB/s = 0.4 Mbit/s: a 16 MB
    # artifact in 5.5 minutes) ...
    upload_min_bytes_per_second: int = 50_000  # PGOLF_UPLOAD_MIN_BYTES_PER_SECOND
    # ... or when it is not complete after this long, whatever its rate.
    upload_deadline_seconds: float = 600.0  # PGOLF_UPLOAD_DEADLINE_SECONDS
    uploads_per_client: int = 2  # PGOLF_UPLOADS_PER_CLIENT: bodies in flight from one address (IPv6: one /64)
    uploads_in_flight: int = 16  # PGOLF_UPLOADS_IN_FLIGHT: bodies in flight from everyone (bounds scratch disk)
    # PGOLF_FORWARDED_ALLOW_IPS: proxies whose X-Forwarded-For names the client (empty: the peer address is the
    # client, and no header can change that).
    forwarded_allow_ips: str = ""

    # --- users (service/api/auth.py) ---
    api_token: str | None = None  # PGOLF_API_TOKEN: the token of the user "admin" (an admin)
    user_tokens: tuple[tuple[str, str], ...] = ()  # PGOLF_TOKENS: "user:token" entries, hashed when loaded
    tokens_file: Path | None = None  # PGOLF_TOKENS_FILE: "user:sha256:<hex>" lines (default STORAGE_DIR/tokens)
    admins: tuple[str, ...] = ("admin",)  # PGOLF_ADMINS: users who may cancel anyone's job and read every job
    reads: str = "public"  # PGOLF_READS: "public" (anyone reads every job) or "private" (owners and admins)

    # --- robustness ---
    shutdown_grace_seconds: float = 10.0  # PGOLF_SHUTDOWN_GRACE_SECONDS: SIGTERM to exit, at most
    storage_retry_seconds: float = 30.0  # PGOLF_STORAGE_RETRY_SECONDS: how long a job-state write is retried
    # PGOLF_LEASE_SECONDS: a worker holds its job under a lease it renews every third of this; a job whose lease
    # ran out (its worker died, or lost the database) is ended by any node: worker lost.
    lease_seconds: float = 30.0
    # PGOLF_REQUEUE_LOST_JOBS: how many times a job whose worker was lost goes back to the queue before it ends
    # as `failed: worker lost` (0: never requeued).
    requeue_lost_jobs: int = 0

    @property
    def database_path(self) -> Path:
        return self.storage_dir / "service.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        return self.storage_dir / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        return self.storage_dir / "uploads"

    @property
    def token_file_path(self) -> Path:
        return self.tokens_file or self.storage_dir / "tokens"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = _required_path(env, "PGOLF_DATA_DIR")
        eval_limit = _float(env, "PGOLF_EVAL_LIMIT_SECONDS", EVAL_LIMIT_SECONDS, minimum=0.1)
        kill_grace = _float(env, "PGOLF_KILL_GRACE_SECONDS", KILL_GRACE_SECONDS, minimum=0.0)
        # Every core busy for the whole wall-clock allowance: the CPU limit is a backstop behind the wall clock.
        evaluator_cpu = default_cpu_seconds(eval_limit + kill_grace, os.cpu_count() or 1)
        tokenizer = Path(env["PGOLF_TOKENIZER"]) if env.get("PGOLF_TOKENIZER") else data_dir / "tokenizer.model"
        settings = cls(
            data_dir=data_dir,
            tokenizer=tokenizer,
            storage_dir=Path(env.get("PGOLF_STORAGE_DIR") or "runs/service"),
            database_url=_database_url(env, "PGOLF_DATABASE_URL"),
            max_artifact_bytes=_int(env, "PGOLF_MAX_ARTIFACT_BYTES", ARTIFACT_CAP_BYTES, minimum=1),
            eval_limit_seconds=eval_limit,
            kill_grace_seconds=kill_grace,
            workers=_int(env, "PGOLF_WORKERS", 1, minimum=0),
            queue_bound=_int(env, "PGOLF_QUEUE_BOUND", 8, minimum=0),
            host=env.get("PGOLF_HOST") or "127.0.0.1",
            port=_int(env, "PGOLF_PORT", 8000, minimum=0),
            evaluator_command=_command(env, "PGOLF_EVALUATOR", cls.evaluator_command),
            evaluator_extra_args=tuple(shlex.split(env.get("PGOLF_EVAL_ARGS", ""))),
            validation_timeout_seconds=_float(env, "PGOLF_VALIDATION_TIMEOUT_SECONDS", 120.0, minimum=1.0),
            header_timeout_seconds=_float(env, "PGOLF_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            upload_idle_seconds=_float(env, "PGOLF_UPLOAD_IDLE_SECONDS", 30.0, minimum=0.1),
            upload_min_bytes_per_second=_int(env, "PGOLF_UPLOAD_MIN_BYTES_PER_SECOND", 50_000, minimum=0),
            upload_deadline_seconds=_float(env, "PGOLF_UPLOAD_DEADLINE_SECONDS", 600.0, minimum=0.1),
            uploads_per_client=_int(env, "PGOLF_UPLOADS_PER_CLIENT", 2, minimum=1),
            uploads_in_flight=_int(env, "PGOLF_UPLOADS_IN_FLIGHT", 16, minimum=1),
            forwarded_allow_ips=env.get("PGOLF_FORWARDED_ALLOW_IPS", "").strip(),
            api_token=_token(env, "PGOLF_API_TOKEN"),
            user_tokens=_user_tokens(env, "PGOLF_TOKENS"),
            tokens_file=Path(env["PGOLF_TOKENS_FILE"]) if env.get("PGOLF_TOKENS_FILE") else None,
            admins=_names(env, "PGOLF_ADMINS", ("admin",)),
            reads=_choice(env, "PGOLF_READS", "public", READ_POLICIES),
            shutdown_grace_seconds=_float(env, "PGOLF_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.5),
            storage_retry_seconds=_float(env, "PGOLF_STORAGE_RETRY_SECONDS", 30.0, minimum=0.0),
            lease_seconds=_float(env, "PGOLF_LEASE_SECONDS", 30.0, minimum=1.0),
            requeue_lost_jobs=_int(env, "PGOLF_REQUEUE_LOST_JOBS", 0, minimum=0),
            validator_limits=_limits(env, "PGOLF_VALIDATOR", VALIDATOR_LIMITS),
            evaluator_limits=_limits(env, "PGOLF_EVALUATOR", ResourceLimits(
                EVALUATOR_ADDRESS_SPACE_BYTES, evaluator_cpu, EVALUATOR_OPEN_FILES)),
        )
        settings.check_inputs()
        return settings

    def check_inputs(self) -> None:
        """Fail fast when the data or tokenizer the service evaluates against is not there. An API node that runs
        no evaluation (PGOLF_WORKERS=0) needs only the tokenizer, which uploads are checked against."""
        if not self.data_dir.is_dir():
            raise SettingsError(f"PGOLF_DATA_DIR={self.data_dir} is not a directory")
        if self.workers > 0 and not any(self.data_dir.glob("*_val_*.bin")):
            raise SettingsError(f"PGOLF_DATA_DIR={self.data_dir} holds no *_val_*.bin validation shard")
        if not self.tokenizer.is_file():
            raise SettingsError(f"tokenizer {self.tokenizer} does not exist (set PGOLF_TOKENIZER)")


def _required_path(env: Mapping[str, str], name: str) -> Path:
    value = env.get(name)
    if not value:
        raise SettingsError(f"{name} must be set")
    return Path(value)


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:  # also rejects nan
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")


def _database_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.startswith(DATABASE_URL_SCHEMES):
        scheme = raw.partition("://")[0] if "://" in raw else raw[:20]
        raise SettingsError(f"{name}: {scheme!r} is not a supported database; use postgresql://user@host:port/db "
                            f"(or leave it unset for the SQLite store under PGOLF_STORAGE_DIR)")
    return raw


def _limits(env: Mapping[str, str], prefix: str, defaults: ResourceLimits) -> ResourceLimits:
    return ResourceLimits(
        address_space_bytes=_int(env, f"{prefix}_ADDRESS_SPACE_BYTES", defaults.address_space_bytes, minimum=0),
        cpu_seconds=_int(env, f"{prefix}_CPU_SECONDS", defaults.cpu_seconds, minimum=0),
        open_files=_int(env, f"{prefix}_OPEN_FILES", defaults.open_files, minimum=0),
    )


def _command(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if not raw:
        return default
    parts = tuple(shlex.split(raw))
    if not parts:
        raise SettingsError(f"{name} is empty")
    return parts


# Tokens are compared by their sha256; that is only as strong as the token is unguessable, so short ones are
# refused (the service's own are 32 random bytes).
MIN_TOKEN_CHARS = 16
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_user_name(name: str) -> bool:
    return _USER_NAME.fullmatch(name) is not None


def check_token(name: str, token: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise SettingsError(f"{name}: a token must be at least {MIN_TOKEN_CHARS} characters, without spaces")
    return token


def _token(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return check_token(name, raw) if raw else None


def _user_tokens(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    entries = []
    for item in re.split(r"[\s,]+", env.get(name, "").strip()):
        if not item:
            continue
        user, sep, token = item.partition(":")
        if not sep or not valid_user_name(user):
            raise SettingsError(f"{name}: {user!r} is not a 'user:token' entry with a plain user name")
        entries.append((user, check_token(f"{name} ({user})", token)))
    if len({user for user, _ in entries}) != len(entries):
        raise SettingsError(f"{name} names a user twice")
    return tuple(entries)


def _names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    names = tuple(item for item in re.split(r"[\s,]+", raw.strip()) if item)
    bad = [n for n in names if not valid_user_name(n)]
    if bad:
        raise SettingsError(f"{name}: {bad[0]!r} is not a user name")
    return names


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name) or default
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw
