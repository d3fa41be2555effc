"""Non-overlapping validation (reference §7.1): the periodic val during training and the int6 round trip.

The validation stream (truncated to a whole number of sequences + 1) is cut into seq_len blocks; every token is
scored with in-block context only. Ranks split the blocks contiguously; (ΣNLL, N, Σbytes) are summed in float64
and all-reduced before dividing. The reported (sliding-window, TTT, n-gram) evaluation lives in service/engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data.byte_accounting import ByteTables
from trainer.model import autocast_for


@dataclass(frozen=True)
class ValResult:
    loss: float  # nats per token
    bpb: float
    tokens: int
    bytes: int


def bits_per_byte(nll_sum_nats: float, byte_count: int) -> float:
    """ΣNLL / (ln 2 · Σbytes), float64 sums over every scored target."""
    if byte_count <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return float(nll_sum_nats) / (math.log(2) * float(byte_count))


def whole_sequences(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The validation stream as the reference evaluates it during training: whole sequences + 1 token."""
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len} + 1")
    return tokens[: usable + 1]


ByteLookup = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # base bytes, has leading space, is boundary


def byte_lookup(tables: ByteTables, device: torch.device | str = "cpu") -> ByteLookup:
    """The byte tables as tensors on ``device``, for ``target_bytes_torch``."""
    return (torch.from_numpy(tables.base_bytes.astype(np.int64)).to(device),
            torch.from_numpy(tables.has_leading_space).to(device), torch.from_numpy(tables.is_boundary).to(device))


def target_bytes_torch(tables: ByteLookup, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``ByteTables.target_bytes`` for the training-time evaluation loop (int64)."""
    base, lead, boundary = tables
    return base[target_ids] + (lead[target_ids] & ~boundary[prev_ids]).long()


@torch.no_grad()
def evaluate_non_overlapping(model: torch.nn.Module, tokens: np.ndarray, tables: ByteTables, seq_len: int,
                             batch_tokens: int, device: torch.device, rank: int = 0,
                             world_size: int = 1) -> ValResult:
    num_seqs = (len(tokens) - 1) // seq_len
    if num_seqs <= 0:
        raise ValueError(f"validation stream of {len(tokens)} tokens is shorter than one sequence of {seq_len}")
    first, last = rank * num_seqs // world_size, (rank + 1) * num_seqs // world_size
    per_batch = max(1, batch_tokens // (seq_len * world_size))
    lut = byte_lookup(tables, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # ΣNLL, tokens, bytes
    was_training = model.training
    model.eval()
    for start in range(first, last, per_batch):
        end = min(start + per_batch, last)
        block = torch.from_numpy(tokens[start * seq_len : end * seq_len + 1].astype(np.int64)).to(device)
        x = block[:-1].reshape(-1, seq_len)
        y = block[1:].reshape(-1, seq_len)
        with autocast_for(device):
            logits = model.forward_logits(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        sums[0] += nll.double().sum()
        sums[1] += y.numel()
        sums[2] += target_bytes_torch(lut, x.reshape(-1), y.reshape(-1)).sum().double()
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    nll_sum, count, byte_count = sums.tolist()
    loss = nll_sum / count
    return ValResult(loss, bits_per_byte(nll_sum, int(byte_count)), int(count), int(byte_count))
