"""OS resource limits (rlimits) for the subprocesses that touch uploaded artifacts: the validator and evaluators.

The reader bounds every manifest field, but a bug in it (or in torch, zstd, numpy) triggered by a hostile file
must still cost a bounded amount of memory, CPU and file handles, never the host. So each subprocess gets
kernel-enforced limits, set in the child between fork and exec (``preexec_fn``), so they also cover its imports:

- address space (``RLIMIT_AS``): an allocation past it fails inside the child (Python raises MemoryError, torch
  a RuntimeError), which the child reports as a clean refusal or error event;
- CPU seconds (``RLIMIT_CPU``): at the soft limit the kernel sends SIGXCPU, whose default action ends the
  process; the hard limit, a few seconds later, is SIGKILL in case SIGXCPU is ignored;
- open files (``RLIMIT_NOFILE``).

A value of 0 means "no limit" for that resource. Limits are inherited by the child's own children (torchrun
ranks each get the same limits, per process).
"""

from __future__ import annotations

import math
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

# SIGXCPU is sent at the soft CPU limit; SIGKILL follows at the hard limit, this much later.
CPU_HARD_MARGIN_SECONDS = 5


@dataclass(frozen=True)
class ResourceLimits:
    address_space_bytes: int = 0  # RLIMIT_AS; 0: no limit
    cpu_seconds: int = 0  # RLIMIT_CPU (soft; hard = soft + CPU_HARD_MARGIN_SECONDS); 0: no limit
    open_files: int = 0  # RLIMIT_NOFILE; 0: no limit

    def apply(self, *, renewable_cpu: bool = False) -> None:
        """Set the limits on the calling process. Limits can only be lowered: a hard limit already below the
        requested one (set by the operator's shell, a container) is kept, never raised.

        ``renewable_cpu`` leaves the hard CPU limit alone, so that a long-lived helper (the validator) can grant
        itself a fresh allowance per request with ``renew_cpu_allowance``; a hard limit could never be raised.
        """
        if self.address_space_bytes:
            _lower(resource.RLIMIT_AS, self.address_space_bytes, self.address_space_bytes)
        if self.cpu_seconds:
            hard = None if renewable_cpu else self.cpu_seconds + CPU_HARD_MARGIN_SECONDS
            _lower(resource.RLIMIT_CPU, self.cpu_seconds, hard)
        if self.open_files:
            _lower(resource.RLIMIT_NOFILE, self.open_files, self.open_files)


def _lower(which: int, soft: int, hard: int | None) -> None:
    """Set (soft, hard), hard None meaning "keep the current hard limit"; never above the current hard limit."""
    _, current_hard = resource.getrlimit(which)
    if hard is None:
        hard = current_hard
    elif current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def renew_cpu_allowance(seconds: int) -> None:
    """Allow the calling process ``seconds`` more CPU seconds from now (the soft RLIMIT_CPU moves forward)."""
    if not seconds:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = math.ceil(usage.ru_utime + usage.ru_stime)
    _lower(resource.RLIMIT_CPU, used + seconds, None)


def child_setup(limits: ResourceLimits, *also: Callable[[], None], renewable_cpu: bool = False
                ) -> Callable[[], None]:
    """A ``preexec_fn``: run ``also`` (e.g. the parent-death signal), then apply ``limits``, in the child."""

    def setup() -> None:
        for step in also:
            step()
        limits.apply(renewable_cpu=renewable_cpu)

    return setup


def breach_reason(returncode: int | None, limits: ResourceLimits, setting_prefix: str) -> str | None:
    """Why a child that died by a signal most likely hit one of its limits (None if the signal says nothing).

    SIGXCPU is only ever sent for RLIMIT_CPU. SIGKILL is ambiguous (the hard CPU limit, the OOM killer, an
    operator), so it is not attributed here.
    """
    if returncode is not None and returncode == -signal.SIGXCPU:
        return (f"the CPU-time limit of {limits.cpu_seconds} s was exceeded (SIGXCPU); "
                f"{setting_prefix}_CPU_SECONDS sets it")
    return None


def default_cpu_seconds(wall_seconds: float, cpu_count: int) -> int:
    """A CPU budget no legitimate run can exceed: every core busy for the whole wall-clock allowance."""
    return math.ceil(wall_seconds * max(1, cpu_count))
