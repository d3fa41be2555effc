"""What an evaluator's output must be before it becomes a public event.

An evaluator runs a hostile artifact, so its stdout is untrusted text. A line becomes a stored (and streamed)
event only when it is a strict-JSON object (no NaN or Infinity anywhere), its `type` is one of the engine's
event names, and its numbers are finite; absolute paths of the server inside it are replaced by short names.
SSE frames are then safe by construction: the event name is one of `EVENT_TYPES` and the data is one line of
JSON (json.dumps escapes every newline inside strings).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# `queued` (the first event) and `requeued` (its worker was lost; the job waits for another one, and its next
# attempt streams from `start` again) are the service's own; the rest are the engine's (built in
# service/engine/run.py, specified in docs/evaluation.md §5).
EVENT_TYPES = ("queued", "requeued", "start", "chunk", "end", "timeout", "error")
ENGINE_EVENT_TYPES = frozenset(EVENT_TYPES) - {"queued", "requeued"}
MAX_DEPTH = 32


class NonFiniteValue(ValueError):
    """The event is well-formed but reports NaN or an infinity: the evaluation has no valid score."""

    def __init__(self, event_type: str, where: str) -> None:
        super().__init__(f"the evaluator reported a non-finite value at {where} of its {event_type!r} event")
        self.event_type = event_type
        self.where = where


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_engine_event(line: bytes) -> dict[str, Any] | None:
    """The event on this line, or None when the line is not one (it then belongs in the log tail).

    Raises NonFiniteValue for an event of a known type that carries NaN/Infinity (as a float, or spelled as the
    non-JSON constants Python's json would otherwise accept).
    """
    try:
        event = json.loads(line)
    except ValueError:
        try:  # the same line with NaN/Infinity read as numbers, to tell "non-finite" from "not an event"
            event = json.loads(line, parse_constant=lambda name: math.nan)
        except ValueError:
            return None
    if not isinstance(event, dict) or event.get("type") not in ENGINE_EVENT_TYPES:
        return None
    where = _non_finite(event, "$", 0)
    if where is not None:
        raise NonFiniteValue(event["type"], where)
    return event


def _non_finite(value: Any, where: str, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return where + " (nested too deeply)"
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{where}.{key}", depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _non_finite(item, f"{where}[{index}]", depth + 1)
            if found:
                return found
    return None


# An absolute POSIX path of two components or more (a lone "/" or "/x" in prose is left alone).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/>-])/(?:[\w.@+-]+/)+[\w.@+-]*")


class PathRedactor:
    """Replaces the server's absolute paths in public text by `<name>/rest` (for the known roots) or `…/leaf`."""

    def __init__(self, roots: Iterable[tuple[str, Path]]) -> None:
        known = [(label, str(path.resolve())) for label, path in roots]
        known += [(label, str(path)) for label, path in roots]
        known += [("python", sys.prefix), ("python", sys.base_prefix)]
        # Longest first, so the most specific root names a path.
        self._roots = sorted({(label, root.rstrip("/")) for label, root in known if len(root) > 1},
                             key=lambda item: -len(item[1]))

    def text(self, value: str) -> str:
        for label, root in self._roots:
            value = re.sub(re.escape(root) + r"(?=/|\b|$)", f"<{label}>", value)
        return _ABSOLUTE_PATH.sub(lambda match: "…/" + match.group(0).rstrip("/").rsplit("/", 1)[-1], value)

    def event(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.event(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.event(item) for item in value]
        return value
