"""Causal n-gram mixing over the whole vocabulary: at every scored position the mixer builds the complete mixed
distribution (batched torch ops on the scoring device), and the engine scores the target from that vector.

Legal by construction (compliance-rules.md §1, and the 2026-04-02 ruling of §3.1 that a blend must be computed
and renormalised over the whole vocabulary):

* C1: every count used at target t comes from tokens before t (exact prefix counts, `ngram_counts`).
* C2: p_ng(v) = count(ctx, v)/count(ctx) for every candidate v is a distribution over the real vocabulary, and
  so is its mixture with the model softmax. The engine sums every vector and compares its x_t entry with the
  mixer's closed form from the gold token's counts (`Mixed.shortcut`): a mixer that mixes the target only, or
  scores from another distribution than the one it states, shows in these two figures.
* C3: the persistent counts hold only tokens folded in by `commit`, which refuses targets without a score.

Modes: `exact` and `smoothed` here, `tilt` in `ngram_tilt`, and the non-compliant upstream `hashed-940` in
`ngram_hashed`, imported only when chosen. Per chunk the engine calls `prepare(tokens, chunk_end)` (one pass),
`mix(positions, tokens, logprobs)` per batch, and once the chunk's scores are committed `mark_scored`/`commit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.engine.ngram_counts import PrefixCounts
from service.engine.options import NGRAM_MODES

DEFAULT_MAX_ORDER = 7  # orders 2..7: context widths 1..6
DEFAULT_MIN_COUNT = 2


class ScoreOrderError(RuntimeError):
    """A request that would let a token influence a score that is not yet fixed (C3), or rescore a position."""


@dataclass(frozen=True)
class EntropyAlpha:
    """α(H) = base + span·σ(slope·(H − center)): trust the n-gram more where the model is unsure.

    H is the model's own entropy (nats) at the position, so α never looks at the target (reference §8.1).
    """

    base: float = 0.05
    span: float = 0.55
    center: float = 4.0
    slope: float = 2.0

    def __call__(self, entropy: torch.Tensor) -> torch.Tensor:
        return self.base + self.span * torch.sigmoid(self.slope * (entropy - self.center))


@dataclass
class Mixed:
    """A batch's mixed distributions and the mixer's closed-form probability of each target."""

    probs: torch.Tensor  # (m, V) float64: the full distribution at each covered position
    shortcut: torch.Tensor  # (n,) float64: p(x_t) from the gold token's counts (a separate code path)
    rows: torch.Tensor | None = None  # positions (batch indices) that `probs` covers; None: all n, in order


def as_token_array(tokens: np.ndarray | torch.Tensor, end: int) -> np.ndarray:
    """tokens[:end] as a numpy array: nothing at or after `end` is ever copied or read."""
    if end > len(tokens):
        raise ValueError(f"position {end - 1} is outside the token stream of length {len(tokens)}")
    head = tokens[:end]
    return head.detach().cpu().numpy() if isinstance(head, torch.Tensor) else np.asarray(head)


def model_distribution(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) float64 softmax of logits or log-probabilities (re-normalised), and its entropy in nats."""
    p = torch.softmax(logprobs.detach().to(torch.float64), dim=-1)
    return p, torch.special.entr(p).sum(dim=-1)


class ScoredPositions:
    """Target positions at or after `start` that have a score; a commit needs every one of them."""

    def __init__(self) -> None:
        self.start = 0
        self._scored = np.zeros(0, bool)

    def mark(self, positions: np.ndarray) -> None:
        if positions.size == 0:
            return
        if positions.min() < max(self.start, 1):
            raise ScoreOrderError(f"position {int(positions.min())} is already committed (or is not a target): "
                                  "a committed position cannot be scored again")
        need = int(positions.max()) + 1 - self.start
        if need > self._scored.size:
            self._scored = np.concatenate([self._scored, np.zeros(max(need, 2 * self._scored.size), bool)])
        self._scored[positions - self.start] = True

    def require(self, upto: int) -> None:
        first = max(self.start, 1)
        have = np.append(self._scored, np.zeros(max(upto - self.start - self._scored.size, 0), bool))
        missing = np.flatnonzero(~have[first - self.start: upto - self.start])
        if missing.size:
            raise ScoreOrderError(f"refusing to commit tokens up to {upto}: position {first + int(missing[0])} "
                                  "has no committed score yet (score before update)")

    def advance(self, upto: int) -> None:
        self._scored = self._scored[upto - self.start:].copy()
        self.start = upto


class NgramMixer:
    """What the engine relies on. Subclasses implement `_mix`, `_commit` and optionally `_prepare`."""

    mode = ""
    compliant = False
    scores_from_vector = True  # the engine scores −ln probs[x_t]; False: it scores the shortcut (hashed-940)

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.ledger = ScoredPositions()

    @property
    def committed_upto(self) -> int:
        return self.ledger.start

    def prepare(self, tokens: np.ndarray | torch.Tensor, end: int) -> None:
        """Compute the counts of the targets up to end − 1 in one pass (a chunk), so that each batch is a
        gather. Nothing is committed and each count is a prefix count, so no score changes."""
        if end > self.committed_upto:
            self._prepare(as_token_array(tokens, end), end)

    def mix(self, positions: np.ndarray, tokens: np.ndarray | torch.Tensor, logprobs: torch.Tensor) -> Mixed:
        """The mixed distributions at target positions (all ≥ committed_upto) from the model's (n, V) logits or
        log-probabilities there; marks the positions as scored by this process."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        self.ledger.mark(pos)  # refuses committed positions before anything is mixed
        return self._mix(pos, as_token_array(tokens, int(pos.max()) + 1 if pos.size else 0), logprobs)

    def full_distribution(self, position: int, tokens: np.ndarray | torch.Tensor,
                          logprobs: torch.Tensor) -> torch.Tensor:
        """The (V,) float64 distribution the mixer commits to at `position` (probes); marks nothing."""
        if position < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {position} is already committed: its distribution is gone")
        mixed = self._mix(np.array([position]), as_token_array(tokens, position + 1), logprobs.reshape(1, -1))
        return mixed.probs[0]

    def mark_scored(self, start: int, end: int) -> None:
        """Record positions start..end−1 as scored by a peer rank (after its scores were all-reduced)."""
        self.ledger.mark(np.arange(max(start, 1), end))

    def commit(self, tokens: np.ndarray | torch.Tensor, upto: int) -> None:
        """Fold tokens[committed_upto:upto] into the persistent state; every target there must be scored."""
        if upto < self.committed_upto:
            raise ScoreOrderError(f"commit({upto}) goes backwards: already committed up to {self.committed_upto}")
        self.ledger.require(upto)
        self._commit(as_token_array(tokens, upto), upto)
        self.ledger.advance(upto)

    def take_stats(self) -> dict[str, int | float]:
        """Counters since the last call (summed over ranks by the engine); {} for modes without any."""
        return {}

    def _prepare(self, head: np.ndarray, end: int) -> None:
        pass

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        raise NotImplementedError

    def _commit(self, head: np.ndarray, upto: int) -> None:
        raise NotImplementedError


class CountingMixer(NgramMixer):
    """Shared by the compliant modes: exact prefix counts and dense continuation rows on the scoring device."""

    compliant = True

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER) -> None:
        if max_order < 2:
            raise ValueError("max_order must be at least 2")
        super().__init__(vocab_size)
        self.widths = max_order - 1
        self.counts = PrefixCounts(vocab_size, max_order)

    def _prepare(self, head: np.ndarray, end: int) -> None:
        self.counts.prepare(head, end)

    def _commit(self, head: np.ndarray, upto: int) -> None:
        self.counts.commit(head, upto)

    def statistics(self, pos: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, n) count(ctx_w) and count(ctx_w, x_t) at the targets."""
        self.counts.prepare(head, int(pos.max()) + 1)
        return self.counts.context_counts(pos), self.counts.pair_counts(pos)

    def rows(self, width: int, pos: np.ndarray, device: torch.device) -> torch.Tensor:
        """(n, V) float64 count(ctx_width, v) for every v at targets whose context occurred before t."""
        block, query, token, count = self.counts.rows(width, pos)
        out = (torch.zeros(pos.size, self.vocab_size, dtype=torch.float64, device=device) if block is None
               else torch.from_numpy(block).to(device, torch.float64))
        index = (torch.from_numpy(query).to(device), torch.from_numpy(token).to(device))
        return out.index_put_(index, torch.from_numpy(count).to(device, torch.float64), accumulate=True)

    @staticmethod
    def targets(pos: np.ndarray, head: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(head[pos].astype(np.int64)).to(device)


class BackoffNgramMixer(CountingMixer):
    """Mode "exact": the widest context seen at least min_count times, p_ng(v) = count(ctx, v)/count(ctx),
    mixed as (1 − α)·p_model + α·p_ng with the entropy-adaptive α (reference §8.1, over exact counts)."""

    mode = "exact"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, min_count: int = DEFAULT_MIN_COUNT,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order)
        if min_count < 1:
            raise ValueError("min_count must be at least 1 (a context never seen has no distribution)")
        self.min_count = min_count
        self.alpha = alpha

    def chosen_width(self, context: np.ndarray) -> np.ndarray:
        """Widest w with count(ctx_w) ≥ min_count, from (W, n) counts (0: the model alone). A context never
        occurs more often than its own suffix, so the eligible widths are 1..w."""
        return (context >= self.min_count).sum(axis=0)

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device = logprobs.device
        p, entropy = model_distribution(logprobs)
        context, pair = self.statistics(pos, head)
        width = self.chosen_width(context)
        alpha = torch.where(torch.from_numpy(width > 0).to(device), self.alpha(entropy), 0.0)
        probs = p.clone()
        for w in range(1, self.widths + 1):
            at = np.flatnonzero(width == w)
            if at.size:
                index = torch.from_numpy(at).to(device)
                model = p.index_select(0, index)
                row = self.rows(w, pos[at], device).div_(torch.from_numpy(context[w - 1, at]).to(device)[:, None])
                probs.index_copy_(0, index, row.sub_(model).mul_(alpha[index, None]).add_(model))
        column = np.maximum(width - 1, 0), np.arange(pos.size)
        p_ngram = torch.from_numpy(pair[column] / np.maximum(context[column], 1)).to(device)
        p_target = p.gather(1, self.targets(pos, head, device)[:, None]).squeeze(1)
        return Mixed(probs, p_target + alpha * (p_ngram - p_target))


class SmoothedNgramMixer(CountingMixer):
    """Mode "smoothed": every order interpolated with the one below, the chain ending in the model:

        p_0 = p_model,   p_w = (count(ctx_w, ·) + β·p_{w−1}) / (count(ctx_w) + β)   for w = 1..W,
        p_mix = (1 − α)·p_model + α·p_W   with the entropy-adaptive α of the backoff mode.

    Each level is a convex combination of two distributions, so p_mix sums to 1; an unseen context leaves its
    level unchanged. β = 2 was chosen on the sample *train* shard (bench/ngram.py --quality --swap-roles).
    """

    mode = "smoothed"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, concentration: float = 2.0,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order)
        if concentration <= 0:
            raise ValueError("concentration must be positive")
        self.concentration = concentration
        self.alpha = alpha

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device, beta = logprobs.device, self.concentration
        p, entropy = model_distribution(logprobs)
        context, pair = self.statistics(pos, head)
        alpha = self.alpha(entropy)
        level = p.clone()
        p_target = p.gather(1, self.targets(pos, head, device)[:, None]).squeeze(1)
        level_target = p_target
        for w in range(1, self.widths + 1):
            at = np.flatnonzero(context[w - 1] > 0)  # an unseen context leaves its level as it is
            if at.size:
                seen = torch.from_numpy(context[w - 1, at]).to(device, torch.float64)[:, None] + beta
                if at.size == pos.size:
                    level = self.rows(w, pos, device).add_(level, alpha=beta).div_(seen)
                else:
                    index = torch.from_numpy(at).to(device)
                    row = self.rows(w, pos[at], device).add_(level.index_select(0, index), alpha=beta)
                    level.index_copy_(0, index, row.div_(seen))
            c, n = (torch.from_numpy(a[w - 1]).to(device, torch.float64) for a in (context, pair))
            level_target = (n + beta * level_target) / (c + beta)
        return Mixed(level.sub_(p).mul_(alpha[:, None]).add_(p), p_target + alpha * (level_target - p_target))


def make_mixer(mode: str, vocab_size: int) -> NgramMixer | None:
    """The mixer for a `--ngram` mode with its default settings (None for "off")."""
    if mode == "off":
        return None
    if mode == "exact":
        return BackoffNgramMixer(vocab_size)
    if mode == "smoothed":
        return SmoothedNgramMixer(vocab_size)
    if mode == "tilt":
        from service.engine.ngram_tilt import TiltMixer

        return TiltMixer(vocab_size)
    if mode == "hashed-940":  # the non-compliant reproduction: never imported by a compliant evaluation
        from service.engine.ngram_hashed import Hashed940Mixer

        return Hashed940Mixer(vocab_size)
    raise ValueError(f"unknown n-gram mode {mode!r}; expected one of {', '.join(NGRAM_MODES)}")

