"""CPU intra-op threads for training and evaluation: the idle usable cores, shared by the local processes.

torch's default (one thread per core, whatever else runs) was 7.6x slower at 2 threads than at 1 on a busy
2-core machine (README "CPU threads"). So: max(1, (usable cores − rounded 1-min load) // LOCAL_WORLD_SIZE); an
explicit OMP_NUM_THREADS or MKL_NUM_THREADS is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

EXPLICIT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # the intra-op thread count to use
    reason: str  # how it was chosen, for the log

    def describe(self) -> str:
        return f"intra_op_threads:{self.threads} ({self.reason})"


def choose_threads(environ: Mapping[str, str] | None = None, *, cores: int | None = None,
                   load: float | None = None) -> ThreadChoice:
    """The policy (``cores`` and ``load`` default to this machine's)."""
    env = os.environ if environ is None else environ
    for name in EXPLICIT_VARIABLES:
        if env.get(name, "").strip():
            import torch

            return ThreadChoice(torch.get_num_threads(), f"{name}={env[name].strip()} is set: honoured")
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    busy = min(cores - 1, round(load))
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, (cores - busy) // local)
    return ThreadChoice(threads, f"{cores} usable cores, {busy} busy (load {load:.1f}), {local} local processes")


def apply_thread_policy(environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """Choose and set torch's intra-op thread count for this process."""
    import torch

    choice = choose_threads(environ)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
