"""Re-checking an evaluation report's order trace: the record of what was scored and what was trained, in order.

Each chunk event of the engine carries ``order_trace``, its entry of the engine's order trace: the scored target
range, the ledger frontier after the commit, the range the model was then trained on (or null) and the largest
target position of every optimizer step. The end event carries ``trace_digest``, the sha256 of all entries.

``check_order_trace`` recomputes that digest from the chunk events, so the trace in hand is the one that was
judged, and then has the one judge (``service.judge.order_problems``) judge score-before-update (C3) from the trace
itself, whatever the report's own flag says: commits contiguous from target 1, each entry matching its chunk
event, every optimizer step reaching only targets below the frontier of an earlier commit, and the last chunk
never trained on.
"""

from __future__ import annotations

from typing import Any

from service.judge import as_mapping, last_chunk_index, order_problems, order_trace_digest
from verifier.report import FAIL, PASS, CheckResult

NAME = "eval_order_trace"


def check_order_trace(start: dict[str, Any], chunks: list[dict[str, Any]], terminal: dict[str, Any]) -> CheckResult:
    entries = [chunk.get("order_trace") for chunk in chunks]
    if not all(isinstance(entry, dict) for entry in entries):
        missing = sum(not isinstance(entry, dict) for entry in entries)
        return CheckResult(NAME, FAIL, f"{missing} of {len(chunks)} chunk events without order_trace",
                           "the report does not carry the order trace, so its digest cannot be re-derived")
    stated = as_mapping(terminal.get("compliance")).get("trace_digest")
    recomputed = order_trace_digest(entries)
    problems = []
    if terminal["type"] == "end" and stated != recomputed:
        problems.append(f"the chunk events' trace hashes to {recomputed[:16]}…, the end event states "
                        f"{str(stated)[:16]}…")
    problems += order_problems(chunks, last_chunk_index(start, chunks))
    steps = sum(len(steps) for entry in entries if isinstance(steps := entry.get("step_max_targets"), list))
    trained = sum(entry.get("trained") is not None for entry in entries)
    figure = (f"digest {recomputed[:16]}… recomputed from {len(entries)} chunk entries "
              f"({'matches' if stated == recomputed else 'differs from'} the end event); "
              f"{trained} chunks trained, {steps} optimizer steps, each on committed targets only")
    return CheckResult(NAME, FAIL if problems else PASS, figure, "; ".join(problems[:4]))
