"""The training token loader with the reference semantics (reference-stack §2.4).

The sorted train shards are read as one endless stream (wrapping around, no shuffling). For each micro-step every
rank takes a disjoint contiguous span of ``local + 1`` tokens out of the same stream chunk of
``world_size · (local + 1)`` tokens, so the global batch is identical whatever the world size. Validation tokens
are read by ``trainer.data.shards.load_validation_tokens``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.data.shards import read_shard, shard_paths


class TokenStream:
    """The train shards as one endless, wrapping stream of tokens."""

    def __init__(self, paths: list[Path], vocab_size: int | None = None) -> None:
        if not paths:
            raise ValueError("TokenStream needs at least one shard")
        self.paths = paths
        self.vocab_size = vocab_size
        self.file_index = 0
        self.tokens = read_shard(paths[0], vocab_size, mmap=True)
        self.position = 0

    def _advance_file(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.paths)
        self.tokens = read_shard(self.paths[self.file_index], self.vocab_size, mmap=True)
        self.position = 0

    def take(self, n: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        remaining = n
        while remaining > 0:
            available = len(self.tokens) - self.position
            if available <= 0:
                self._advance_file()
                continue
            k = min(remaining, available)
            parts.append(np.asarray(self.tokens[self.position : self.position + k]))
            self.position += k
            remaining -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def rank_span(chunk_len: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, end) slice of a stream chunk that belongs to ``rank`` (disjoint, contiguous, covering)."""
    if chunk_len % world_size:
        raise ValueError(f"chunk of {chunk_len} tokens does not split evenly over {world_size} ranks")
    per_rank = chunk_len // world_size
    return rank * per_rank, (rank + 1) * per_rank


class DistributedTokenLoader:
    """Hands each rank its span of the shared training stream, micro-step by micro-step."""

    def __init__(self, data_dir: Path | str, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.stream = TokenStream(shard_paths(data_dir, "train"), vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise ValueError(f"{global_tokens} tokens per step over {self.world_size} ranks × {grad_accum_steps} "
                             f"micro-steps gives {local_tokens} per rank, not a positive multiple of seq {seq_len}")
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        start, end = rank_span(len(chunk), self.rank, self.world_size)
        local = torch.from_numpy(chunk[start:end].astype(np.int64))
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
