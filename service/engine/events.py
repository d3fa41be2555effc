"""What the events of an evaluation share: committed totals, their partial figures, the error event.

The events are plain JSON-serialisable dicts, built where they happen (run.py) and specified in docs/evaluation.md
§5; service/judge.py turns the terminal event's ``measured`` into the ``compliance`` verdict.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]


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


def partial_figures(totals: Totals) -> dict[str, Any]:
    return {"targets_scored": totals.targets, "bytes": totals.bytes, "nll_sum": totals.nll_sum,
            "partial_val_loss": totals.val_loss, "partial_val_bpb": totals.val_bpb}


def error_event(*, code: str, reason: str, totals: Totals | None = None, elapsed_s: float = 0.0) -> Event:
    return {"type": "error", "code": code, "reason": reason, **partial_figures(totals or Totals()),
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
