"""Window and chunk planning: which tokens each forward pass sees and which targets it scores. Target position p
is the prediction of ``tokens[p]`` from ``tokens[:p]``; the sliding rule, the chunks and the padding are specified
in docs/evaluation.md §1. The geometry (seq_len ≥ 1, 1 ≤ stride ≤ seq_len, chunk_tokens ≥ 1) is checked once,
by ``EvalOptions.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """All windows of one evaluation, in stream order (parallel int64 arrays)."""

    seq_len: int
    starts: np.ndarray  # first input token of each window
    ends: np.ndarray  # one past the last input token
    score_from: np.ndarray  # first scored target position

    def __len__(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class Chunk:
    """A contiguous group of windows whose scored targets are exactly positions [target_lo, target_hi)."""

    index: int
    window_lo: int
    window_hi: int
    target_lo: int
    target_hi: int

    @property
    def num_targets(self) -> int:
        return self.target_hi - self.target_lo


def plan_windows(num_tokens: int, seq_len: int, stride: int) -> WindowPlan:
    last_target = num_tokens - 1
    if last_target < 1:
        empty = np.zeros(0, dtype=np.int64)
        return WindowPlan(seq_len, empty, empty.copy(), empty.copy())
    # Window k ≥ 1 starts at k·stride and scores from k·stride + seq − stride + 1; keep it while that is ≤ N−1.
    later = max(0, -(-(last_target - seq_len) // stride))  # ceil((N−1−seq)/stride), clamped at 0
    starts = np.arange(later + 1, dtype=np.int64) * stride
    ends = np.minimum(starts + seq_len, last_target)
    score_from = starts + (seq_len - stride) + 1
    score_from[0] = 1
    return WindowPlan(seq_len, starts, ends, score_from)


def plan_chunks(windows: WindowPlan, chunk_tokens: int) -> list[Chunk]:
    if len(windows) == 0:
        return []
    chunk_of_window = (windows.score_from - 1) // chunk_tokens
    # Windows are in stream order, so each chunk is a contiguous run of windows.
    boundaries = np.flatnonzero(np.diff(chunk_of_window)) + 1
    lows = np.concatenate(([0], boundaries))
    highs = np.concatenate((boundaries, [len(windows)]))
    return [
        Chunk(index=i, window_lo=int(lo), window_hi=int(hi),
              target_lo=int(windows.score_from[lo]), target_hi=int(windows.ends[hi - 1]) + 1)
        for i, (lo, hi) in enumerate(zip(lows, highs, strict=True))
    ]


def rank_share(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous part [a, b) of items [lo, hi) that ``rank`` handles; shares differ by at most one."""
    count = hi - lo
    return lo + count * rank // world_size, lo + count * (rank + 1) // world_size


@dataclass(frozen=True)
class WindowBatch:
    inputs: np.ndarray  # (B, seq_len) int64, right-padded with token 0 (padding never reaches a scored output)
    rows: np.ndarray  # (S,) batch row of each scored output
    cols: np.ndarray  # (S,) column (local index) of each scored output
    positions: np.ndarray  # (S,) target position of each scored output


def build_batch(tokens: np.ndarray, windows: WindowPlan, lo: int, hi: int) -> WindowBatch:
    starts, ends, score_from = windows.starts[lo:hi], windows.ends[lo:hi], windows.score_from[lo:hi]
    # Always seq_len wide: RoPE depends on the width (docs/evaluation.md §1).
    inputs = np.zeros((hi - lo, windows.seq_len), dtype=np.int64)
    for row, (a, b) in enumerate(zip(starts, ends, strict=True)):
        inputs[row, : b - a] = tokens[a:b]
    counts = ends + 1 - score_from
    rows = np.repeat(np.arange(hi - lo, dtype=np.int64), counts)
    # Target positions of each window's scored range, concatenated: score_from[w] + 0, 1, ..., counts[w]−1.
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.repeat(score_from, counts) + offsets
    cols = positions - 1 - starts[rows]
    return WindowBatch(inputs, rows, cols, positions)
