"""The error event of a run that failed unexpectedly: `order_violation`, `resource_limit` when an allocation failed
(the service runs evaluators under an address-space rlimit, docs/service.md) or `internal`.

Only a failing run imports this module (lazily, from ``run._error_of``): a completed evaluation never loads it, so
it is not counted code (trainer/code_bytes.py ``NOT_COUNTED``).
"""

from __future__ import annotations

import resource

from service.engine.events import Event, Totals, error_event
from service.engine.ngram import ScoreOrderError


def failure_event(exc: Exception, elapsed_s: float, totals: Totals | None = None) -> Event:
    allocation = allocation_failure_reason(exc)
    if isinstance(exc, ScoreOrderError):
        code, reason = "order_violation", str(exc)
    elif allocation is not None:
        code, reason = "resource_limit", f"{allocation}: {type(exc).__name__}: {exc}"[:2000]
    else:
        code, reason = "internal", f"{type(exc).__name__}: {exc}"
    return error_event(code=code, reason=reason, totals=totals, elapsed_s=elapsed_s)


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
