"""Scoring windows and committing scores: the ledger that makes score-before-update structural, its order trace
and the C2 measurement (docs/evaluation.md §3)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from service.engine.events import Totals
from service.engine.ngram import NgramMixer, ScoreOrderError
from service.engine.windows import Chunk, WindowPlan, build_batch, rank_share
from trainer.data.byte_accounting import ByteTables
from trainer.model import autocast_for

# An nn.Module with ``forward_logits(ids)`` (B, T, V logits), ``forward(ids, targets)`` (mean cross-entropy) and
# ``blocks`` (TTT freezes the first ones), as trainer.model.GPT.
ScoringModel = nn.Module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DistributionCheck:
    """C2, measured at every scored position on the distribution its score came from (docs/evaluation.md §3)."""

    positions: int = 0
    targets: int = 0
    sum_min: float = float("inf")
    sum_max: float = float("-inf")
    gap_max: float | None = None
    from_vector: bool = True

    def add(self, sums: torch.Tensor, targets: int, gaps: torch.Tensor | None = None,
            from_vector: bool = True) -> None:
        self.targets += targets
        self.from_vector &= from_vector
        if sums.numel():
            self.positions += int(sums.numel())
            # np.minimum/np.maximum keep a NaN (Python's min/max drop it by argument order): C2 must see it.
            self.sum_min = float(np.minimum(self.sum_min, float(sums.min())))
            self.sum_max = float(np.maximum(self.sum_max, float(sums.max())))
        if gaps is not None and gaps.numel():
            self.gap_max = float(np.maximum(self.gap_max or 0.0, float(gaps.max())))

    def merge(self, other: DistributionCheck) -> None:
        self.positions += other.positions
        self.targets += other.targets
        self.sum_min = float(np.minimum(self.sum_min, other.sum_min))
        self.sum_max = float(np.maximum(self.sum_max, other.sum_max))
        if other.gap_max is not None:
            self.gap_max = float(np.maximum(self.gap_max or 0.0, other.gap_max))
        self.from_vector &= other.from_vector

    @property
    def sum_error_max(self) -> float | None:
        return float(np.maximum(abs(self.sum_min - 1.0), abs(self.sum_max - 1.0))) if self.positions else None

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "targets": self.targets, "sum_error_max": self.sum_error_max,
                "scored_gap_max": self.gap_max, "scored_from_vector": self.from_vector}


@dataclass
class ChunkScores:
    """One rank's (or, after the all-reduce, all ranks') scores for the targets of one chunk."""

    chunk: Chunk
    sums: torch.Tensor  # (2, num_targets) float64: row 0 NLL, row 1 times scored
    check: DistributionCheck = field(default_factory=DistributionCheck)
    score_seconds: float = 0.0
    mix_seconds: float = 0.0


def score_chunk(model: ScoringModel, tokens: np.ndarray, windows: WindowPlan, chunk: Chunk, *, rank: int,
                world_size: int, batch_windows: int, device: torch.device, mixer: NgramMixer | None) -> ChunkScores:
    """Score this rank's contiguous share of the chunk's windows, ``batch_windows`` at a time, summing every
    scored position's full distribution (the model softmax, or the mixer's vector whose target entry is scored)."""
    sums = torch.zeros(2, chunk.num_targets, dtype=torch.float64, device=device)
    scores = ChunkScores(chunk, sums)
    lo, hi = rank_share(chunk.window_lo, chunk.window_hi, rank, world_size)
    started = time.perf_counter()
    if mixer is not None and hi > lo:
        mixer.prepare(tokens, chunk.target_hi)  # the chunk's counts in one pass; each batch is then a gather
        scores.mix_seconds += time.perf_counter() - started
    with torch.inference_mode():
        for first in range(lo, hi, batch_windows):
            batch = build_batch(tokens, windows, first, min(first + batch_windows, hi))
            inputs = torch.from_numpy(batch.inputs).to(device, non_blocking=True)
            rows = torch.from_numpy(batch.rows).to(device, non_blocking=True)
            cols = torch.from_numpy(batch.cols).to(device, non_blocking=True)
            targets = torch.from_numpy(tokens[batch.positions].astype(np.int64)).to(device, non_blocking=True)
            with autocast_for(device):
                logits = model.forward_logits(inputs)
            # Only the scored outputs go through the (fp32) log-softmax: stride·B rows instead of seq·B.
            logprobs = torch.log_softmax(logits[rows, cols].float(), dim=-1)
            if mixer is None:
                nll = -logprobs.gather(1, targets[:, None]).squeeze(1)
                scores.check.add(logprobs.double().exp().sum(dim=-1), len(batch.positions))
            else:
                # The mixer reads counts on the CPU: wait for the forward so its time is not billed to the mixer.
                synchronize(device)
                mixing = time.perf_counter()
                mixed = mixer.mix(batch.positions, tokens, logprobs)
                covered = targets if mixed.rows is None else targets[mixed.rows]
                p_vector = mixed.probs.gather(1, covered[:, None]).squeeze(1)
                shortcut = mixed.shortcut if mixed.rows is None else mixed.shortcut[mixed.rows]
                nll = -torch.log(p_vector) if mixer.scores_from_vector and mixed.rows is None else \
                    -torch.log(mixed.shortcut.clamp_min(1e-12))
                scores.check.add(mixed.probs.sum(dim=-1), len(batch.positions), (p_vector - shortcut).abs(),
                                 mixer.scores_from_vector and mixed.rows is None)
                scores.mix_seconds += time.perf_counter() - mixing
            index = torch.from_numpy(batch.positions - chunk.target_lo).to(device)
            sums[0].index_add_(0, index, nll.double())
            sums[1].index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    synchronize(device)  # once per chunk: without a mixer, batches stay queued back to back on the GPU
    scores.score_seconds = time.perf_counter() - started - scores.mix_seconds
    return scores


@dataclass(frozen=True)
class CommittedSpan:
    """A copy of tokens[token_lo:token_hi] whose every target (token_lo+1 .. token_hi−1) is committed; only
    ``ScoreLedger.committed_span`` creates these, and the TTT updater refuses those of any other ledger."""

    token_lo: int
    token_hi: int
    tokens: np.ndarray
    issuer: ScoreLedger

    @property
    def last_target(self) -> int:
        return self.token_hi - 1


@dataclass
class OrderTrace:
    """Per chunk: the scored target range, the frontier after the commit, the trained range and every step."""

    chunks: list[dict[str, Any]] = field(default_factory=list)

    def record_commit(self, chunk: Chunk, frontier: int) -> None:
        self.chunks.append({"chunk": chunk.index, "scored": [chunk.target_lo, chunk.target_hi],
                            "frontier": frontier, "trained": None, "step_max_targets": []})

    def record_training(self, chunk_index: int, target_range: tuple[int, int], step_max_targets: list[int]) -> None:
        entry = self.chunks[-1]
        if entry["chunk"] != chunk_index:
            raise ScoreOrderError(f"training on chunk {chunk_index} recorded while chunk {entry['chunk']} is open")
        entry["trained"] = list(target_range)
        entry["step_max_targets"] = list(step_max_targets)


class ScoreLedger:
    """Owns every committed score. Targets are committed chunk by chunk, strictly left to right."""

    def __init__(self, tokens: np.ndarray, tables: ByteTables) -> None:
        self._tokens = tokens
        self._tables = tables
        self.frontier = 1  # every target position < frontier is committed; none ≥ frontier is
        self.totals = Totals()
        self.positions_not_scored_once = 0  # positions of committed chunks scored 0 or ≥ 2 times
        self.trace = OrderTrace()

    def commit(self, scores: ChunkScores) -> Totals:
        """Commit a chunk's (already all-reduced) scores; returns the chunk's own totals."""
        chunk = scores.chunk
        if chunk.target_lo != self.frontier:
            raise ScoreOrderError(f"chunk {chunk.index} starts at target {chunk.target_lo}, "
                                  f"but the ledger's frontier is {self.frontier}")
        sums = scores.sums.cpu().numpy()
        nll, times_scored = sums[0], sums[1].round().astype(np.int64)
        lo, hi = chunk.target_lo, chunk.target_hi
        target_bytes = self._tables.target_bytes(self._tokens[lo - 1 : hi - 1], self._tokens[lo:hi])
        chunk_totals = Totals(nll_sum=float(nll.sum()), targets=int(times_scored.sum()),
                              bytes=int((target_bytes * times_scored).sum()))
        self.positions_not_scored_once += int(np.count_nonzero(times_scored != 1))
        self.totals = Totals(self.totals.nll_sum + chunk_totals.nll_sum, self.totals.targets + chunk_totals.targets,
                             self.totals.bytes + chunk_totals.bytes)
        self.frontier = hi
        self.trace.record_commit(chunk, self.frontier)
        return chunk_totals

    def committed_span(self, token_lo: int, token_hi: int) -> CommittedSpan:
        """tokens[token_lo:token_hi] for training; refused unless every target in it is committed."""
        if not 0 <= token_lo < token_hi <= len(self._tokens):
            raise ValueError(f"token range [{token_lo}, {token_hi}) is outside the stream")
        if token_hi - 1 >= self.frontier:
            raise ScoreOrderError(f"targets up to {token_hi - 1} requested for training, "
                                  f"but only targets < {self.frontier} are committed")
        return CommittedSpan(token_lo, token_hi, np.array(self._tokens[token_lo:token_hi], dtype=np.int64), self)
