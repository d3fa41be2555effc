"""Re-checking an evaluation report's order trace: the record of what was scored and what was trained, in order.

Each chunk event of the engine carries ``order_trace``, its entry of the engine's order trace: the scored target
range, the ledger frontier after the commit, the range the model was then trained on (or null) and the largest
target position of every optimizer step. The end event carries ``trace_digest``, the sha256 of all entries.

``check_order_trace`` recomputes that digest from the chunk events, so the trace in hand is the one the engine
judged, and then judges score-before-update (C3) from the trace itself, independently of the engine's own flag:
commits contiguous from target 1, each entry matching its chunk event, every optimizer step reaching only targets
below the frontier of an earlier commit, and the last chunk never trained on.
"""

from __future__ import annotations

from typing import Any

from service.engine.events import order_trace_digest
from verifier.report import FAIL, PASS, CheckResult

NAME = "eval_order_trace"


def check_order_trace(start: dict[str, Any], chunks: list[dict[str, Any]], terminal: dict[str, Any]) -> CheckResult:
    entries = [chunk.get("order_trace") for chunk in chunks]
    if not all(isinstance(entry, dict) for entry in entries):
        missing = sum(not isinstance(entry, dict) for entry in entries)
        return CheckResult(NAME, FAIL, f"{missing} of {len(chunks)} chunk events without order_trace",
                           "the report does not carry the order trace, so its digest cannot be re-derived")
    stated = (terminal.get("compliance") or {}).get("trace_digest")
    recomputed = order_trace_digest(entries)
    problems = []
    if terminal["type"] == "end" and stated != recomputed:
        problems.append(f"the chunk events' trace hashes to {recomputed[:16]}…, the end event states "
                        f"{str(stated)[:16]}…")
    problems += _order_problems(entries, chunks, start.get("chunks", len(chunks)) - 1)
    steps = sum(len(entry.get("step_max_targets") or []) for entry in entries)
    trained = sum(entry.get("trained") is not None for entry in entries)
    figure = (f"digest {recomputed[:16]}… recomputed from {len(entries)} chunk entries "
              f"({'matches' if stated == recomputed else 'differs from'} the end event); "
              f"{trained} chunks trained, {steps} optimizer steps, each on committed targets only")
    return CheckResult(NAME, FAIL if problems else PASS, figure, "; ".join(problems[:4]))


def _order_problems(entries: list[dict[str, Any]], chunks: list[dict[str, Any]], last_index: int) -> list[str]:
    problems = []
    expected_lo = 1
    for entry, chunk in zip(entries, chunks, strict=True):
        index = chunk.get("index")
        scored = entry.get("scored")
        if entry.get("chunk") != index or scored != chunk.get("target_range"):
            problems.append(f"chunk {index}: the trace entry (chunk {entry.get('chunk')}, scored {scored}) does not "
                            f"match the event (target range {chunk.get('target_range')})")
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
        if not (isinstance(trained, list) and len(trained) == 2 and 1 <= trained[0] < trained[1] <= hi):
            problems.append(f"chunk {index}: trained on {trained} with only targets < {hi} committed")
        if not steps or not all(isinstance(step, int) and step < hi for step in steps):
            problems.append(f"chunk {index}: optimizer steps reach targets {steps}, only targets < {hi} were "
                            f"committed")
    return problems
