"""The manifest's metadata sections, ``training`` and ``code_bytes``: checked where an artifact enters, not by the
evaluation, which never reads them (ruling R2; docs/artifact-format.md §2, §6).

The evaluation's reader (trainer/artifact.py, counted) checks everything it decodes and bounds these two sections
only by the manifest's size, nesting and duplicate-key limits, plus the two fields the engine does read
(``code_bytes.total``, ``training.train_seq_len``). Whatever accepts an artifact from outside goes through
``read_submission``/``parse_submission`` instead: the service's upload validator, ``verifier check``, and the
writer on what it writes. They run the reader with these field-level checks hooked in at the point of the schema
where they stand, so every artifact is refused with the same code and message as when the reader made them all.
Nothing in the counted graph imports this module.
"""

from __future__ import annotations

import os
from typing import Any

from trainer.artifact import (
    MAX_COUNT,
    MAX_NAME_CHARS,
    SUBMISSION_LIMIT_BYTES,
    Artifact,
    _is_int,
    _is_number,
    _require,
    _require_keys,
    parse_artifact,
    read_artifact,
)
from trainer.artifact import validate_manifest as validate_decoded_sections
from trainer.model import ModelConfig

MAX_CODE_FILES = 10_000
MAX_TRAINING_FIELDS = 256
MAX_TRAINING_STRING_CHARS = 4096
MAX_WORLD_SIZE = 1 << 16
TRAINING_REQUIRED = ("seed", "steps", "world_size", "device", "train_time_ms", "code_version")


def read_submission(path: str | os.PathLike[str], *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES) -> Artifact:
    """``read_artifact`` with the metadata sections checked too: for artifacts that arrive from outside."""
    return read_artifact(path, max_file_bytes=max_file_bytes, check_metadata=validate_metadata)


def parse_submission(data: bytes, *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES) -> Artifact:
    """``parse_artifact`` with the metadata sections checked too."""
    return parse_artifact(data, max_file_bytes=max_file_bytes, check_metadata=validate_metadata)


def validate_manifest(manifest: dict[str, Any]) -> ModelConfig:
    """The whole manifest schema, in the reader's order (the writer runs it on what it writes)."""
    return validate_decoded_sections(manifest, validate_metadata)


def validate_metadata(manifest: dict[str, Any]) -> None:
    _validate_training(manifest["training"])
    _validate_code_bytes(manifest["code_bytes"])


def _validate_training(training: Any) -> None:
    _require_keys(training, "training", TRAINING_REQUIRED, extra_ok=True)
    _require(len(training) <= MAX_TRAINING_FIELDS, f"training has more than {MAX_TRAINING_FIELDS} fields")
    _require(_is_int(training["seed"]) and abs(training["seed"]) <= MAX_COUNT, "training.seed must be an integer")
    _require(_is_int(training["steps"]) and 0 <= training["steps"] <= MAX_COUNT,
             "training.steps must be a non-negative integer")
    _require(
        _is_int(training["world_size"]) and 1 <= training["world_size"] <= MAX_WORLD_SIZE,
        f"training.world_size must be an integer in [1, {MAX_WORLD_SIZE}]",
    )
    _require(
        _is_number(training["train_time_ms"]) and 0 <= training["train_time_ms"] <= MAX_COUNT,
        "training.train_time_ms must be a non-negative number",
    )
    for key in ("device", "code_version"):
        _require(isinstance(training[key], str), f"training.{key} must be a string")
    for key, value in training.items():
        _require(len(key) <= MAX_NAME_CHARS, f"training has a field name over {MAX_NAME_CHARS} characters")
        _require(
            value is None or isinstance(value, bool) or _is_number(value)
            or (isinstance(value, str) and len(value) <= MAX_TRAINING_STRING_CHARS),
            f"training.{key} must be a string (at most {MAX_TRAINING_STRING_CHARS} characters), number, boolean "
            f"or null",
        )


def _validate_code_bytes(code_bytes: Any) -> None:
    _require_keys(code_bytes, "code_bytes", ("total", "files"))
    files = code_bytes["files"]
    _require(
        isinstance(files, dict) and len(files) <= MAX_CODE_FILES
        and all(len(path) <= MAX_NAME_CHARS and _is_int(n) and 0 <= n <= MAX_COUNT for path, n in files.items()),
        f"code_bytes.files must map at most {MAX_CODE_FILES} paths (of at most {MAX_NAME_CHARS} characters) to "
        f"non-negative integers",
    )
    _require(
        _is_int(code_bytes["total"]) and code_bytes["total"] == sum(files.values()),
        "code_bytes.total must equal the sum of code_bytes.files",
    )
