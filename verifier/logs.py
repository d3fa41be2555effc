"""Readers for what a submission says about itself: training logs and summaries, evaluation reports.

Training records come in three shapes, all reduced to one ``TrainRecord``:

* ``summary.json`` written by ``python -m trainer train`` (format ``pgolf-train-summary/1``);
* ``train.log`` written by the same run, in the reference's line formats (reference-stack.md §11);
* an upstream ``train_gpt.py`` log (the torchrun stdout or the ``logs/{RUN_ID}.txt`` file, whose head is the
  script source and ``nvidia-smi`` output).

Every figure is what the file *claims*; the checks decide what to trust. Lines are matched at the start of a line
only, so the script source at the head of an upstream log file (whose f-strings contain the same words) never
matches.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A 600 s log with the script source at its head is well under a megabyte; anything this large is not a log.
MAX_LOG_BYTES = 64 * 1024 * 1024


class LogError(ValueError):
    """A file that cannot be read as the record it was given as."""


@dataclass(frozen=True)
class TrainRecord:
    source: str  # the file it came from, or "artifact manifest"
    kind: str  # "pgolf summary" | "pgolf log" | "upstream log" | "artifact manifest"
    train_time_ms: float | None = None
    train_time_origin: str | None = None  # the line or field the time was read from
    world_size: int | None = None
    device: str | None = None
    artifact_sha256: str | None = None
    artifact_bytes: int | None = None  # the artifact's size as the log states it
    total_bytes: int | None = None  # "Total submission size": artifact + code as the log states it


def read_bounded_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_LOG_BYTES:
        raise LogError(f"{path} is {size} bytes, over the {MAX_LOG_BYTES}-byte limit for a log")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LogError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def read_train_record(path: Path) -> TrainRecord:
    """A summary.json, a pgolf train.log or an upstream log; the kind is recognised from the content."""
    text = read_bounded_text(path)
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LogError(f"{path} looks like JSON but does not parse: {exc}") from None
        return _summary_record(document, path.name)
    return _log_record(text, path.name)


def manifest_record(training: dict[str, Any]) -> TrainRecord:
    """The training section of an artifact manifest (already validated by the artifact reader)."""
    time_ms = training.get("train_time_ms")
    return TrainRecord(source="artifact manifest", kind="artifact manifest",
                       train_time_ms=float(time_ms) if _is_number(time_ms) else None,
                       train_time_origin="manifest training.train_time_ms",
                       world_size=training.get("world_size"), device=training.get("device"))


# ----------------------------------------------------------------------------------------------------------------
# summary.json


def _summary_record(document: Any, source: str) -> TrainRecord:
    if not isinstance(document, dict):
        raise LogError(f"{source}: a training summary must be a JSON object")
    artifact = document.get("artifact", {})
    if not isinstance(artifact, dict):
        raise LogError(f"{source}: 'artifact' must be an object")
    time_ms = _field(document, "train_time_ms", _is_number, source)
    sha = _field(artifact, "sha256", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v), source)
    return TrainRecord(
        source=source, kind="pgolf summary",
        train_time_ms=float(time_ms) if time_ms is not None else None,
        train_time_origin="summary train_time_ms",
        world_size=_field(document, "world_size", _is_positive_int, source),
        device=_field(document, "device", lambda v: isinstance(v, str) and v != "", source),
        artifact_sha256=sha,
        artifact_bytes=_field(artifact, "bytes", _is_positive_int, source),
        total_bytes=_field(artifact, "total_bytes", _is_positive_int, source),
    )


def _field(obj: dict[str, Any], key: str, valid: Any, source: str) -> Any:
    """obj[key] when present and valid; None when absent; an error when present but malformed."""
    if key not in obj or obj[key] is None:
        return None
    if not valid(obj[key]):
        raise LogError(f"{source}: field {key!r} has an invalid value {obj[key]!r}")
    return obj[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------------------------------------------
# Text logs (reference-stack.md §11)

_NUMBER = r"(\d+(?:\.\d+)?)"
_STEP_TIME = re.compile(rf"^step:\d+/\d+ .*?\btrain_time:{_NUMBER}ms", re.M)
_STOPPING = re.compile(rf"^stopping_early: wallclock_cap train_time:{_NUMBER}ms", re.M)
_WORLD = re.compile(r"^world_size:(\d+) grad_accum_steps:\d+", re.M)
_PGOLF_HEADER = re.compile(r"^pgolf \S+ python \S+ torch \S+ device (\S+)", re.M)
_NVIDIA_SMI_GPU = re.compile(r"^\|\s+\d+\s+(NVIDIA[^|]*?)\s+(?:On|Off)\s+\|", re.M)
# "Serialized model: N bytes" (no label) is the raw torch state dict upstream, not the artifact: need a label.
_SERIALIZED = re.compile(r"^Serialized model (\S+): (\d+) bytes", re.M)
_TOTAL = re.compile(r"^Total submission size(?: \S+)?: (\d+) bytes", re.M)


def _log_record(text: str, source: str) -> TrainRecord:
    pgolf_header = _PGOLF_HEADER.search(text)
    kind = "pgolf log" if pgolf_header else "upstream log"
    # Training time: the largest cumulative train_time of any step line or of the early-stop line. The step line
    # logged after the cap (upstream's forced last step) counts: that step was training too.
    times = [(float(m.group(1)), m.group(0)) for m in _STEP_TIME.finditer(text)]
    times += [(float(m.group(1)), m.group(0)) for m in _STOPPING.finditer(text)]
    time_ms, origin = max(times) if times else (None, None)
    worlds = _WORLD.findall(text)
    if pgolf_header:
        device: str | None = pgolf_header.group(1)
    else:
        gpus = _NVIDIA_SMI_GPU.findall(text)
        device = f"{len(gpus)}x{gpus[0].strip()}" if gpus else None
    serialized = _SERIALIZED.findall(text)
    totals = _TOTAL.findall(text)
    return TrainRecord(
        source=source, kind=kind, train_time_ms=time_ms, train_time_origin=origin,
        world_size=int(worlds[-1]) if worlds else None, device=device,
        artifact_bytes=int(serialized[-1][1]) if serialized else None,
        total_bytes=int(totals[-1]) if totals else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation reports: the engine's NDJSON event stream


def read_eval_events(path: Path) -> list[dict[str, Any]]:
    """The events of an NDJSON report, in order; blank lines are ignored, anything else must be an event."""
    events: list[dict[str, Any]] = []
    for number, line in enumerate(read_bounded_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LogError(f"{path.name} line {number} is not JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise LogError(f"{path.name} line {number} is not an event (a JSON object with a 'type')")
        events.append(event)
    return events
