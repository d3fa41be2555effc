"""Process-group plumbing under torchrun (RANK / WORLD_SIZE / LOCAL_RANK): one process per device, NCCL on CUDA,
gloo on CPU; a single process calls no collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """In place; ``op`` names a ``torch.distributed.ReduceOp`` (sum, max, min)."""
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=getattr(torch_dist.ReduceOp, op.upper()))


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; a bare ``cuda`` becomes this process's ``cuda:LOCAL_RANK``."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def ranks_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank); a plain ``python`` run is rank 0 of 1. The device index is LOCAL_RANK only:
    from the second node on, the global RANK (8, 9, …) is no device of this machine."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    missing = [name for name in ("RANK", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} unset: launch with torchrun")
    return int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"])


def init_from_env(device: torch.device, rank: int, world_size: int) -> DistContext:
    if world_size <= 1:
        return DistContext()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size)
