"""The one judge of an evaluation: the engine measures, this module decides (ruling R1).

The engine's terminal event (``end``, ``timeout``) carries ``measured``: what only the engine can see (positions
not scored exactly once, the C2 figures of every scored distribution, whether the mixer declares itself compliant,
the TTT summary, the submission's sizes). Everything else a verdict needs is already in the report: the start
event (targets, options, val digests), the chunk events (the order trace) and the terminal's ``elapsed_s``.
``verdict`` turns those into the ``compliance`` dict (fields: docs/evaluation.md §5); ``judged`` wraps the
engine's stream and replaces ``measured`` by ``compliance``, so consumers read the fields they always read.

Every consumer judges here: ``python -m service evaluate`` (and with it the API's evaluator subprocess and the
page), ``verifier compare``, ``verifier check`` (it re-judges the report it is given) and the benches. A report
stored by an older run carries the measurements inside its ``compliance`` under the same names, so it is
re-judged the same way. Torch-free (the HTTP service imports it through service/compare.py); the counted engine
never imports it: a submission's code does not need to judge itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from service.engine.events import Event, Totals, error_event
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES

# C2 tolerances (docs/evaluation.md §3): |Σ_v p(v) − 1| (fp32 log-softmax rounding alone is ~1e-7), and
# |p_vector(x_t) − p_shortcut(x_t)| (both float64 from the same counts: rounding only).
NORMALISATION_TOLERANCE = 1e-5
SHORTCUT_TOLERANCE = 1e-9
# The engine's C2 figures, as they appear in ``measured.ngram`` and in ``compliance.ngram``.
DISTRIBUTION_FIGURES = ("positions", "targets", "sum_error_max", "scored_gap_max", "scored_from_vector")
NGRAM_FIGURES = ("mixer_compliant", "probability_sum", *DISTRIBUTION_FIGURES, "stats")


# A report is untrusted (``verifier check`` judges what submitters hand in): every field is read through these, so
# a field of the wrong type is a failed rule, never a traceback.
def as_mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def is_count(value: object) -> bool:
    """A non-negative int that is not a bool (JSON's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def order_trace_digest(entries: list[Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the order-trace entries, chunk by chunk."""
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def last_chunk_index(start: Event, chunks: list[Event]) -> int:
    """The index of the chunk nothing is scored after: the one the start event plans last (else the last sent)."""
    planned = start.get("chunks")
    return (planned if is_count(planned) else len(chunks)) - 1


def order_problems(chunks: list[Event], last_index: int) -> list[str]:
    """Score before update (C3), judged from the chunk events' order-trace entries: commits contiguous from target
    1, each entry matching its chunk event, every optimizer step reaching only committed targets, the last chunk
    never trained on. Empty when the trace holds."""
    problems = []
    expected_lo = 1
    for chunk in chunks:
        entry = chunk.get("order_trace")
        index = chunk.get("index")
        if not isinstance(entry, dict):
            problems.append(f"chunk {index}: no order_trace entry")
            continue
        scored = entry.get("scored")
        if entry.get("chunk") != index or scored != chunk.get("target_range"):
            problems.append(f"chunk {index}: the trace entry (chunk {entry.get('chunk')}, scored {scored}) does not "
                            f"match the event (target range {chunk.get('target_range')})")
            continue
        if not (isinstance(scored, list) and len(scored) == 2 and all(is_count(end) for end in scored)):
            problems.append(f"chunk {index}: the scored range {scored} is not a pair of target indices")
            continue
        lo, hi = scored
        frontier = entry.get("frontier")
        if lo != expected_lo or frontier != hi:
            problems.append(f"chunk {index}: committed [{lo}, {hi}) with frontier {frontier}, expected a commit "
                            f"from target {expected_lo}")
        expected_lo = hi
        trained = entry.get("trained")
        if trained != chunk.get("trained_range"):
            problems.append(f"chunk {index}: the trace says trained on {trained}, the event says "
                            f"{chunk.get('trained_range')}")
        if trained is None:
            continue
        if index == last_index:
            problems.append(f"chunk {index}: the last chunk was trained on, nothing is scored after it")
        steps = entry.get("step_max_targets") or []
        if not (isinstance(trained, list) and len(trained) == 2 and all(is_count(end) for end in trained)
                and 1 <= trained[0] < trained[1] <= hi):
            problems.append(f"chunk {index}: trained on {trained} with only targets < {hi} committed")
        if not (steps and isinstance(steps, list) and all(is_count(step) and step < hi for step in steps)):
            problems.append(f"chunk {index}: optimizer steps reach targets {steps}, only targets < {hi} were "
                            f"committed")
    return problems


def _within(value: object, bound: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= bound


def distribution_problems(ngram: dict[str, Any]) -> list[str]:
    """C2 from the engine's figures: every scored position was scored from a full vector that sums to 1 and
    agrees with the mixer's shortcut, within the tolerances. Empty when it holds."""
    problems = []
    positions, targets = ngram.get("positions"), ngram.get("targets")
    if not isinstance(positions, int) or positions <= 0 or positions != targets:
        problems.append(f"the distribution was checked at {positions} of {targets} scored positions, not all")
    if ngram.get("scored_from_vector") is not True:
        problems.append("the scores were not taken from the full distribution vectors")
    sum_error = ngram.get("sum_error_max")
    if not _within(sum_error, NORMALISATION_TOLERANCE):
        problems.append(f"max |sum p - 1| = {sum_error} is not within the tolerance {NORMALISATION_TOLERANCE}")
    gap = ngram.get("scored_gap_max")
    if gap is not None and not _within(gap, SHORTCUT_TOLERANCE):
        problems.append(f"max |p_vector(x_t) - p_scored(x_t)| = {gap} is not within {SHORTCUT_TOLERANCE}")
    return problems


def size_verdict(size: dict[str, Any] | None) -> dict[str, Any] | None:
    """The size rule on the engine's sizes (artifact file + the submission's code); None for an in-memory model."""
    if size is None:
        return None
    size = as_mapping(size)
    parts = (size.get("artifact_bytes"), size.get("code_bytes"))
    total = sum(parts) if all(is_count(part) for part in parts) else None  # type: ignore[arg-type]
    return {**size, "total_bytes": total, "limit_bytes": SUBMISSION_LIMIT_BYTES,
            "within_limit": total is not None and total <= SUBMISSION_LIMIT_BYTES}


def verdict(start: Event, chunks: list[Event], terminal: Event) -> dict[str, Any]:
    """The ``compliance`` of an evaluation that reached ``terminal`` (end or timeout) after ``chunks``.

    The measurements come from the terminal's ``measured`` (the engine's stream) or, in a judged or older stored
    report, from its ``compliance``, which carries them under the same names.
    """
    measured = as_mapping(terminal.get("measured") or terminal.get("compliance"))
    config = as_mapping(start.get("config"))
    figures = {name: as_mapping(measured.get("ngram")).get(name) for name in NGRAM_FIGURES}
    mixer_compliant = figures["mixer_compliant"] is True
    normalised = not distribution_problems(figures)
    expected = start.get("targets")
    scored_once = measured.get("positions_not_scored_once") == 0 and terminal.get("targets_scored") == expected
    score_before_update = not order_problems(chunks, last_chunk_index(start, chunks))
    elapsed = terminal.get("elapsed_s")
    timed = _seconds(elapsed)
    within_time_limit = timed and elapsed <= EVAL_LIMIT_SECONDS
    budget = config.get("max_seconds", math.inf)
    size = size_verdict(measured.get("size"))
    val_sha256, manifest_sha256 = start.get("val_tokens_sha256"), start.get("validation_manifest_sha256")
    seq_len, stride = config.get("seq_len"), config.get("stride")
    return {
        # A mixer that declares itself non-compliant (hashed-940) never is, whatever its sums show.
        "compliant": (scored_once and score_before_update and normalised and mixer_compliant and within_time_limit
                      and (size is None or size["within_limit"])),
        "scored_once": scored_once,
        "targets_expected": expected,
        "targets_scored": terminal.get("targets_scored"),
        "positions_not_scored_once": measured.get("positions_not_scored_once"),
        "score_before_update": score_before_update,
        "ttt": measured.get("ttt"),
        # The key order of the reports written before the judge existed (a stored report diffs clean).
        "ngram": {"mode": config.get("ngram"), "mixer_compliant": mixer_compliant, "normalised": normalised,
                  "probability_sum": figures["probability_sum"], "tolerance": NORMALISATION_TOLERANCE,
                  **{name: figures[name] for name in DISTRIBUTION_FIGURES},
                  "shortcut_tolerance": SHORTCUT_TOLERANCE, "stats": figures["stats"]},
        "trace_digest": order_trace_digest([chunk.get("order_trace") for chunk in chunks]),
        "within_time_budget": timed and (budget == math.inf or _seconds(budget)) and elapsed <= budget,
        "within_time_limit": within_time_limit,
        "time_limit_seconds": EVAL_LIMIT_SECONDS,
        "size": size,
        # A max_tokens prefix, a truncated shard or data without a manifest all fail this.
        "full_validation_set": isinstance(val_sha256, str) and val_sha256 == manifest_sha256,
        "val_tokens_sha256": val_sha256,
        "validation_manifest_sha256": manifest_sha256,
        "sliding_window": isinstance(stride, int) and isinstance(seq_len, int) and stride < seq_len,
    }


def condition_verdicts(compliance: dict[str, Any]) -> dict[str, str]:
    """C1–C4 as PASS | FAIL | n/a from a ``compliance`` dict (C1 holds by construction, it is not measured)."""
    ngram = compliance.get("ngram") or {}

    def verdict_of(value: Any) -> str:
        return "n/a" if value is None else ("PASS" if value else "FAIL")

    normalised = None if not ngram else bool(ngram.get("normalised")) and ngram.get("mixer_compliant") is not False
    return {"C1": "n/a", "C2": verdict_of(normalised), "C3": verdict_of(compliance.get("score_before_update")),
            "C4": verdict_of(compliance.get("scored_once"))}


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
            if event["type"] == "chunk":
                nll_sum += event["nll_sum"]
                targets, scored_bytes = event["running_targets"], event["running_bytes"]
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def judged(events: Iterable[Event]) -> Iterator[Event]:
    """The engine's events, strict JSON (``finite_events``), each terminal ``measured`` replaced by ``compliance``."""
    start: Event = {}
    chunks: list[Event] = []
    stream = finite_events(iter(events))
    try:
        for event in stream:
            if event["type"] == "start":
                start = event
            elif event["type"] == "chunk":
                chunks.append(event)
            elif "measured" in event:
                event = {**{key: value for key, value in event.items() if key != "measured"},
                         "compliance": verdict(start, chunks, event)}
            yield event
    finally:
        stream.close()
