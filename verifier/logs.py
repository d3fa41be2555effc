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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A 600 s log with the script source at its head is well under a megabyte; anything this large is not a log.
MAX_LOG_BYTES = 64 * 1024 * 1024
# Bounds that keep a hostile "log" from costing time or memory. Real logs (the upstream corpus) have lines of at
# most ~900 characters, ~1,700 timed step lines and ~230 bpb figures per file.
MAX_LINE_CHARS = 4096  # the rest of a longer line is not read
MAX_TIMED_LINES = 100_000
MAX_FIGURES = 100_000
_KEPT_TEXT_CHARS = 200  # of each line quoted back in a figure


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
    runs: tuple[LogRun, ...] = ()  # a text log's runs, with their step timings; empty for JSON records


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
    """The training section of an artifact manifest (validated by trainer.artifact_metadata.read_submission)."""
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
# Text logs (reference-stack.md §11), read by shape rather than by exact format
#
# Submitters print the same facts in many spellings: `train_time:599544ms` (March), `train_time: 9.8m` and
# `  world_size: 8` (April), `tt:600069ms` (abbreviated forks), `World size: 8`, `"post_ttt_val_bpb": 1.064`,
# timestamp or log-level prefixes. Rather than one pattern per spelling, every line is read as `key SEP value[unit]`
# pairs (SEP is `:` or `=`, with or without spaces; a key may be two words) after a leading timestamp/level prefix
# is set aside. A line *starting* with a step counter (`step:N/M`, `step N/M`, `s:N/M`, a bare `N/M`) is a
# training-step line; one starting with `stop…` is the early-stop line. The script source that upstream file
# logs echo at their head is skipped as a block, so the f-strings and comments in it never count.

_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*|\d[\d.:,\-T]*\s+|[A-Z]{3,}:\s+)*")
_STEP_AT_START = re.compile(r"^(?:(?:step|s)\b[:\s]\s*)?(\d+)\s*/\s*(\d+)\b|^step\s+(\d+)\b")
_STOP_AT_START = re.compile(r"^stop\w*\b", re.I)
_STEP_ANYWHERE = re.compile(r"\b(\d+)/(\d+)\b")
_PAIR = re.compile(r"(?<![\w./])([A-Za-z_]\w*(?: [A-Za-z_]\w*)?)\"?(\s*[:=]\s*)"
                   r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(ms|min|s|m)?(?![\w.])")
# Spellings of the same key seen in submitters' logs.
_TIME_KEYS = frozenset({"train_time", "training_time", "tt"})
_WORLD_KEYS = frozenset({"world_size", "ws"})
_TIME_UNITS_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0}
_SEPARATOR = re.compile(r"^={20,}\s*$")
_SOURCE_START = re.compile(r"^(?:import \w|from [\w.]+ import |#!|\"\"\"|''')")
_PGOLF_HEADER = re.compile(r"^pgolf \S+ python \S+ torch \S+ device (\S+)")
# The name is words separated by single spaces: unambiguous, so a long line of spaces costs linear time.
_NVIDIA_SMI_GPU = re.compile(r"^\|\s+\d+\s+(NVIDIA(?: [^\s|]+)*)\s+(?:On|Off)\s+\|")
# "Serialized model: N bytes" (no label) is the raw torch state dict upstream, not the artifact: need a label.
_SERIALIZED = re.compile(r"^Serialized model (\S+): (\d+) bytes")
_TOTAL = re.compile(r"^Total submission size(?: \S+)?: (\d+) bytes")
_CODE = re.compile(r"^Code size(?: \((\w+)\))?: (\d+) bytes")


@dataclass(frozen=True)
class TimedStep:
    """A line stating the cumulative training time after ``step`` optimizer steps."""

    step: int
    time_ms: float
    line: int  # 1-based line number in the file
    text: str
    stop: bool = False  # the early-stop line rather than a step line
    # Half a unit of the last printed digit: "8.9m" is 534,000 ms give or take 3,000 ms; "599544ms" 0.5 ms.
    precision_ms: float = 0.5


@dataclass(frozen=True)
class Figure:
    """A bits-per-byte figure printed after training, with the precision it was printed at."""

    value: float
    decimals: int
    key: str
    line: int
    text: str


@dataclass
class LogRun:
    """One training run inside a log file (a file can hold several: the step counter starts over)."""

    steps: list[TimedStep] = field(default_factory=list)
    step_lines: int = 0  # lines starting with a step counter, timed or not
    world_size: int | None = None
    seed: int | None = None
    device: str | None = None
    bpb: list[Figure] = field(default_factory=list)  # printed after the training loop, in order
    artifact_bytes: int | None = None  # "Serialized model <label>: N bytes"
    total_bytes: int | None = None  # "Total submission size …: N bytes"
    code_bytes: dict[str, int] = field(default_factory=dict)  # "" | "compressed" | "uncompressed" -> bytes
    time_separators: set[str] = field(default_factory=set)  # "train_time:X" (March) / "train_time: X" (April)

    @property
    def final(self) -> TimedStep | None:
        """The time after the run's last step (the forced last step of upstream counts: it trained); of the lines
        at that step, the most precise, then the largest."""
        return final_step(self.steps) if self.steps else None

    @property
    def score(self) -> Figure | None:
        return self.bpb[-1] if self.bpb else None


def final_step(steps: list[TimedStep]) -> TimedStep:
    return max(steps, key=lambda s: (s.step, -s.precision_ms, s.time_ms, s.stop))


@dataclass(frozen=True)
class _Pair:
    key: str  # normalised: lower case, words joined by "_"
    word: str  # the key's last word, normalised
    value: str
    unit: str | None
    spaced: bool  # whitespace after the separator


def _pairs(content: str) -> list[_Pair]:
    found = []
    for match in _PAIR.finditer(content):
        key = match.group(1).lower()
        found.append(_Pair(key.replace(" ", "_"), key.split()[-1], match.group(3), match.group(4),
                           match.group(2) != match.group(2).strip()))
    return found


def _script_source_lines(lines: list[str]) -> set[int]:
    """Indexes of script-source blocks: from an `import`/docstring line up to the next `=====` separator.

    A candidate block that holds a timed step or stop line is not source (a log captured twice, or a source echo
    cut short at its head): the search resumes after that line, so no run is ever skipped."""
    skipped: set[int] = set()
    index = 0
    while index < len(lines):
        if _SOURCE_START.match(lines[index]):
            end = next((j for j in range(index + 1, len(lines)) if _SEPARATOR.match(lines[j])), None)
            if end is None:
                break
            timed = [j for j in range(index, end) if _is_timed_line(lines[j])]
            if timed:
                index = timed[-1] + 1
                continue
            skipped.update(range(index, end))
            index = end + 1
            continue
        index += 1
    return skipped


def _is_timed_line(raw: str) -> bool:
    content = _PREFIX.sub("", raw, count=1)
    if not (_STEP_AT_START.match(content) or _STOP_AT_START.match(content)):
        return False
    return any(p.word in _TIME_KEYS and p.unit for p in _pairs(content))


def parse_training_log(text: str) -> list[LogRun]:
    """Every run in a training log. Setup facts (world size, seed, device) printed before a run's first timed
    step belong to that run; results (bpb figures, sizes) printed after it belong to it until the next run."""
    lines = [line[:MAX_LINE_CHARS] for line in text.splitlines()]
    skipped = _script_source_lines(lines)
    timed_lines = figures = 0
    runs: list[LogRun] = []
    pending: dict[str, Any] = {}  # setup facts waiting for the run they precede
    gpus: list[str] = []
    orphans = LogRun()  # results printed before any timed step (an evaluation-only log has nothing else)

    def setup(key: str, value: Any) -> None:
        current = runs[-1] if runs else None
        if current is not None and getattr(current, key) is None and not current.bpb and current.total_bytes is None:
            setattr(current, key, value)  # printed during the run, before its results
        else:
            pending.setdefault(key, value)

    for index, raw in enumerate(lines):
        if index in skipped:
            continue
        number = index + 1
        gpu = _NVIDIA_SMI_GPU.match(raw)
        if gpu:
            gpus.append(gpu.group(1).strip())
            continue
        if gpus and raw.startswith(("|", "+")):  # still inside the nvidia-smi table
            continue
        if gpus:
            setup("device", f"{len(gpus)}x{gpus[0]}")
            gpus = []
        content = _PREFIX.sub("", raw, count=1)
        header = _PGOLF_HEADER.match(content)
        if header:
            setup("device", header.group(1))
            continue
        pairs = _pairs(content)
        step_start = _STEP_AT_START.match(content)
        is_stop = bool(_STOP_AT_START.match(content))
        if step_start or is_stop:
            time = next((p for p in pairs if p.word in _TIME_KEYS and p.unit), None)
            step_match = step_start if step_start and step_start.group(1) else _STEP_ANYWHERE.search(content)
            if step_start and not is_stop:
                (runs[-1] if runs else orphans).step_lines += 1
            if time is not None and step_match is not None:
                scale = _TIME_UNITS_MS[time.unit]
                decimals = len(time.value.split(".")[1]) if "." in time.value else 0
                timed_lines += 1
                if timed_lines > MAX_TIMED_LINES:
                    raise LogError(f"more than {MAX_TIMED_LINES:,} timed step lines: not a training log")
                timed = TimedStep(int(step_match.group(1)), float(time.value) * scale, number,
                                  raw.strip()[:_KEPT_TEXT_CHARS], stop=is_stop,
                                  precision_ms=0.5 * scale * 10.0 ** -decimals)
                current = runs[-1] if runs else None
                last = current.steps[-1] if current and current.steps else None
                # The step counter going back starts another run (a file log can hold several).
                if current is None or last is None or timed.step < last.step:
                    current = LogRun(step_lines=0 if runs else orphans.step_lines)
                    runs.append(current)
                    for key, value in pending.items():
                        setattr(current, key, value)
                    pending = {}
                current.steps.append(timed)
                current.time_separators.add(f"{time.word}{': ' if time.spaced else ':'}")
            continue
        target = runs[-1] if runs else orphans
        for pair in pairs:
            if pair.key in _WORLD_KEYS and pair.value.isdigit():
                setup("world_size", int(pair.value))
            elif pair.word == "seed" and pair.value.isdigit():
                setup("seed", int(pair.value))
            elif "bpb" in pair.word and pair.unit is None:
                figures += 1
                if figures > MAX_FIGURES:
                    raise LogError(f"more than {MAX_FIGURES:,} bits-per-byte figures: not a training log")
                decimals = len(pair.value.split(".")[1]) if "." in pair.value else 0
                target.bpb.append(Figure(float(pair.value), decimals, pair.key, number,
                                         raw.strip()[:_KEPT_TEXT_CHARS]))
        for pattern, attribute in ((_SERIALIZED, "artifact_bytes"), (_TOTAL, "total_bytes")):
            match = pattern.match(content)
            if match:
                setattr(target, attribute, int(match.groups()[-1]))
        code = _CODE.match(content)
        if code:
            target.code_bytes[code.group(1) or ""] = int(code.group(2))
    if gpus:
        setup("device", f"{len(gpus)}x{gpus[0]}")
    if not runs:
        runs.append(orphans)
        for key, value in pending.items():
            setattr(orphans, key, value)
    else:
        first = runs[0]
        first.bpb[:0] = orphans.bpb
        for key, value in pending.items():  # setup printed after the last run started (a closing summary)
            if getattr(runs[-1], key) is None:
                setattr(runs[-1], key, value)
    return runs


def _log_record(text: str, source: str) -> TrainRecord:
    runs = parse_training_log(text)
    kind = "pgolf log" if any(_PGOLF_HEADER.match(line) for line in text.splitlines()[:50]) else "upstream log"
    finals = [(run.final, run) for run in runs if run.final is not None]
    final, longest = max(finals, key=lambda pair: pair[0].time_ms) if finals else (None, runs[-1])
    worlds = [run.world_size for run in runs if run.world_size is not None]
    devices = [run.device for run in runs if run.device]
    last = runs[-1]
    return TrainRecord(
        source=source, kind=kind, train_time_ms=final.time_ms if final else None,
        train_time_origin=final.text if final else None,
        world_size=worlds[-1] if worlds else None, device=devices[-1] if devices else None,
        artifact_bytes=last.artifact_bytes, total_bytes=last.total_bytes, runs=tuple(runs),
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
