"""Score-first test-time training: the updater trains only on ``CommittedSpan`` objects of the evaluation's own
``ScoreLedger`` and re-checks the frontier before every optimizer step (docs/evaluation.md §4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.engine.dist import DistContext
from service.engine.options import TTTRecipe
from service.engine.scoring import CommittedSpan, ScoreLedger, ScoreOrderError, ScoringModel, autocast_for
from service.engine.windows import rank_share

# Sequences per forward/backward pass on one rank: bounds activation memory without changing the gradient.
MICRO_BATCH_SEQUENCES = 16


class TTTUpdater:
    """Trains the model on committed spans, one chunk at a time, with an optimizer that lives across chunks."""

    def __init__(self, model: ScoringModel, recipe: TTTRecipe, ledger: ScoreLedger, *, seq_len: int,
                 num_chunks: int, dist: DistContext, device: torch.device) -> None:
        self.model = model
        self.recipe = recipe
        self.ledger = ledger
        self.seq_len = seq_len
        self.num_chunks = num_chunks
        self.dist = dist
        self.device = device
        if recipe.freeze_blocks > len(model.blocks):
            raise ValueError(f"recipe {recipe.name} freezes {recipe.freeze_blocks} blocks, "
                             f"the model has {len(model.blocks)}")
        frozen = {id(p) for block in model.blocks[: recipe.freeze_blocks] for p in block.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.frozen_count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        self.trainable_count = sum(p.numel() for p in self.parameters)
        self.chunks_trained = 0
        self.optimizer_steps = 0
        if recipe.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
        elif recipe.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.parameters, lr=recipe.lr, momentum=recipe.momentum,
                                             weight_decay=recipe.weight_decay)
        else:
            raise ValueError(f"unknown TTT optimizer {recipe.optimizer!r}")

    def train(self, span: CommittedSpan, chunk_index: int) -> tuple[int, int]:
        """Train ``recipe.epochs`` epochs on the span; returns the trained range of target positions."""
        if span.issuer is not self.ledger:
            raise ScoreOrderError("training span was not issued by this evaluation's ledger")
        self._check_committed(span.last_target)
        lr = self.recipe.lr_for_chunk(chunk_index, self.num_chunks)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        # Sequence k of the span: span tokens [k·seq, k·seq + seq + 1), the last one possibly shorter.
        starts = np.arange(0, len(span.tokens) - 1, self.seq_len)
        ends = np.minimum(starts + self.seq_len + 1, len(span.tokens))
        step_max_targets: list[int] = []
        for _ in range(self.recipe.epochs):
            for first in range(0, len(starts), self.recipe.batch_sequences):
                last = min(first + self.recipe.batch_sequences, len(starts))
                step_max_targets.append(self._step(span, starts, ends, first, last))
        self.model.eval()
        self.ledger.trace.record_training(chunk_index, (span.token_lo + 1, span.token_hi), step_max_targets)
        self.chunks_trained += 1
        self.optimizer_steps += len(step_max_targets)
        return span.token_lo + 1, span.token_hi

    def summary(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "chunks_trained": self.chunks_trained,
                "optimizer_steps": self.optimizer_steps, "trainable_parameters": self.trainable_count,
                "frozen_parameters": self.frozen_count}

    def _check_committed(self, last_target: int) -> None:
        if last_target >= self.ledger.frontier:
            raise ScoreOrderError(f"update on target {last_target} before its score was committed "
                                  f"(frontier {self.ledger.frontier})")

    def _step(self, span: CommittedSpan, starts: np.ndarray, ends: np.ndarray, first: int, last: int) -> int:
        """One optimizer step on global sequences [first, last); returns the largest target position used."""
        step_max_target = span.token_lo + int(ends[first:last].max()) - 1
        self._check_committed(step_max_target)
        global_targets = int((ends[first:last] - starts[first:last] - 1).sum())
        mine_lo, mine_hi = rank_share(first, last, self.dist.rank, self.dist.world_size)
        self.optimizer.zero_grad(set_to_none=False)
        # Group this rank's sequences by length (only the span's last sequence can be shorter) so that each
        # group is one rectangular batch; each group's mean loss is weighted by its share of the step's targets.
        lengths = ends[mine_lo:mine_hi] - starts[mine_lo:mine_hi]
        for length in np.unique(lengths):
            chosen = np.arange(mine_lo, mine_hi)[lengths == length]
            for micro in range(0, len(chosen), MICRO_BATCH_SEQUENCES):
                part = chosen[micro : micro + MICRO_BATCH_SEQUENCES]
                rows = np.stack([span.tokens[starts[k] : ends[k]] for k in part])
                batch = torch.from_numpy(rows).to(self.device)
                with autocast_for(self.device):
                    loss = self.model(batch[:, :-1], batch[:, 1:])
                (loss.float() * (rows.shape[0] * (int(length) - 1) / global_targets)).backward()
        # One flat all-reduce; a parameter without a gradient (unused, or no sequences on this rank) counts zero.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in self.parameters])
        self.dist.all_reduce(flat)
        for parameter, grad in zip(self.parameters, flat.split([p.numel() for p in self.parameters]), strict=True):
            parameter.grad = grad.view_as(parameter).to(parameter.dtype)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.recipe.grad_clip)
        self.optimizer.step()
        return step_max_target
