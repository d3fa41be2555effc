"""The event stream of one evaluation: plain JSON-serialisable dicts, each with a ``"type"``.

One ``start``, one ``chunk`` per chunk, then exactly one of ``end``, ``timeout`` or ``error``; every event strict
JSON (``finite_events``). The fields are specified in docs/evaluation.md §5.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

START = "start"
CHUNK = "chunk"
END = "end"
TIMEOUT = "timeout"
ERROR = "error"

Event = dict[str, Any]


def order_trace_digest(entries: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the order-trace entries, chunk by chunk; the
    chunk events carry the entries, so ``verifier check`` recomputes it from the report."""
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Totals:
    """Committed figures at some point of the evaluation (float64 NLL, exact integer counts)."""

    nll_sum: float = 0.0
    targets: int = 0
    bytes: int = 0

    @property
    def val_loss(self) -> float | None:
        return self.nll_sum / self.targets if self.targets else None

    @property
    def val_bpb(self) -> float | None:
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else None


def start_event(*, config: dict[str, Any], artifact_sha256: str | None, tokens: int, targets: int,
                bytes_total: int, chunks: int, val_tokens_sha256: str,
                validation_manifest_sha256: str | None) -> Event:
    return {"type": START, "config": config, "artifact_sha256": artifact_sha256, "tokens": tokens,
            "targets": targets, "bytes": bytes_total, "chunks": chunks, "val_tokens_sha256": val_tokens_sha256,
            "validation_manifest_sha256": validation_manifest_sha256}


def chunk_event(*, index: int, target_range: tuple[int, int], chunk: Totals, running: Totals,
                trained_range: tuple[int, int] | None, elapsed_s: float, phase_seconds: dict[str, float],
                order_trace: dict[str, Any], distribution: dict[str, Any] | None = None,
                ngram_stats: dict[str, float] | None = None) -> Event:
    """One chunk, after its scores were committed and (with TTT) after the model trained on it."""
    return {
        "type": CHUNK,
        "index": index,
        "target_range": list(target_range),
        "targets": chunk.targets,
        "bytes": chunk.bytes,
        "nll_sum": chunk.nll_sum,
        "chunk_bpb": chunk.val_bpb,
        "running_targets": running.targets,
        "running_bytes": running.bytes,
        "running_bpb": running.val_bpb,
        "trained_range": list(trained_range) if trained_range is not None else None,
        "elapsed_s": round(elapsed_s, 4),
        "phase_seconds": {name: round(seconds, 4) for name, seconds in phase_seconds.items()},
        "order_trace": order_trace,
        "distribution": distribution,
        "ngram_stats": ngram_stats,
    }


def end_event(*, totals: Totals, elapsed_s: float, compliance: dict[str, Any]) -> Event:
    return {"type": END, "val_loss": totals.val_loss, "val_bpb": totals.val_bpb, "targets_scored": totals.targets,
            "bytes": totals.bytes, "nll_sum": totals.nll_sum, "elapsed_s": round(elapsed_s, 4),
            "compliance": compliance}


def _partial(totals: Totals) -> dict[str, Any]:
    return {"targets_scored": totals.targets, "bytes": totals.bytes, "nll_sum": totals.nll_sum,
            "partial_val_loss": totals.val_loss, "partial_val_bpb": totals.val_bpb}


def timeout_event(*, reason: str, totals: Totals, chunks_done: int, elapsed_s: float,
                  compliance: dict[str, Any]) -> Event:
    return {"type": TIMEOUT, "reason": reason, **_partial(totals), "chunks_done": chunks_done,
            "elapsed_s": round(elapsed_s, 4), "compliance": compliance}


def error_event(*, code: str, reason: str, totals: Totals | None = None, elapsed_s: float = 0.0) -> Event:
    return {"type": ERROR, "code": code, "reason": reason, **_partial(totals or Totals()),
            "elapsed_s": round(elapsed_s, 4)}


def allocation_failure_reason(error: BaseException) -> str | None:
    """A clear reason when ``error`` is a failed allocation (typically under an address-space rlimit), else None.

    Python raises MemoryError; torch's CPU allocator raises RuntimeError("... can't allocate memory ..."),
    whatever the tensor op, so both are recognised.
    """
    if not (isinstance(error, MemoryError) or "can't allocate memory" in str(error)):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return "memory allocation failed (no address-space limit is set: the host is out of memory)"
    return f"memory allocation failed under the address-space limit of {soft} bytes ({soft / (1 << 30):.2f} GiB)"


def non_finite_path(value: Any) -> str | None:
    """Where the first NaN/±inf float inside ``value`` (nested dicts and lists) is, as "a.b[2]"; None if none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path or "(the value itself)"
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def finite_events(events: Iterator[Event]) -> Iterator[Event]:
    """Pass events through until one holds a non-finite number; that one becomes an ``error`` event (code
    ``non_finite_value``, with the figures of the chunks before it) and the stream ends there.

    JSON has no NaN: an event carrying one is either invalid JSON or, worse, a result nobody can compare.
    """
    nll_sum, targets, scored_bytes = 0.0, 0, 0
    try:
        for event in events:
            where = non_finite_path(event)
            if where is not None:
                elapsed = event.get("elapsed_s")
                yield error_event(
                    code="non_finite_value",
                    reason=f"the {event.get('type')} event holds a non-finite number at {where}; no result is "
                           f"reported",
                    totals=Totals(nll_sum, targets, scored_bytes),
                    elapsed_s=elapsed if isinstance(elapsed, float) and math.isfinite(elapsed) else 0.0)
                return
            if event["type"] == CHUNK:
                nll_sum += event["nll_sum"]
                targets, scored_bytes = event["running_targets"], event["running_bytes"]
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def strict_event_stream(generator_function: Callable[..., Iterator[Event]]) -> Callable[..., Iterator[Event]]:
    """Decorator: the events of ``generator_function`` pass through ``finite_events``."""

    @functools.wraps(generator_function)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Event]:
        return finite_events(generator_function(*args, **kwargs))

    return wrapper
