"""CPU intra-op threads for training and evaluation; the policy's reasons and figures: docs/performance.md §5."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # how it was chosen, for the log

    def describe(self) -> str:
        return f"intra_op_threads:{self.threads} ({self.reason})"


def choose_threads(environ: Mapping[str, str] | None = None, *, cores: int | None = None,
                   load: float | None = None) -> ThreadChoice:
    """max(1, (usable cores − rounded 1-min load) // LOCAL_WORLD_SIZE), unless OMP/MKL_NUM_THREADS is set."""
    env = os.environ if environ is None else environ
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env.get(name, "").strip():
            import torch

            return ThreadChoice(torch.get_num_threads(), f"{name}={env[name].strip()} is set: honoured")
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    busy = min(cores - 1, round(load))
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, (cores - busy) // local)
    return ThreadChoice(threads, f"{cores} usable cores, {busy} busy (load {load:.1f}), {local} local processes")


def apply_thread_policy() -> ThreadChoice:
    import torch

    choice = choose_threads()
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
