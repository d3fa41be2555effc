"""Causal n-gram mixing over the whole vocabulary: a mixer builds the full mixed distribution at every scored
position and the engine scores the target from it (compliance-rules.md §1, §3.1). C1: counts at t come from
tokens before t. C2: every vector is a convex combination or a renormalised tilt; the engine sums each one and
compares its x_t entry with the mixer's closed form (`Mixed.shortcut`). C3: the counts hold only what `commit`
folded in after the engine's ledger committed the scores. `hashed-940` (non-compliant) is imported only when chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.ngram_counts import PrefixCounts
from service.engine.options import NGRAM_MODES

DEFAULT_MAX_ORDER = 7  # context widths 1..6
DEFAULT_MIN_COUNT = 2


class ScoreOrderError(RuntimeError):
    """A token would influence a score not yet fixed (C3), or a position would be scored again."""


@dataclass(frozen=True)
class EntropyAlpha:
    """α(H) = base + span·σ(slope·(H − center)) of the model's entropy H (nats), never of the target (§8.1)."""

    base: float = 0.05
    span: float = 0.55
    center: float = 4.0
    slope: float = 2.0

    def __call__(self, entropy: torch.Tensor) -> torch.Tensor:
        return self.base + self.span * torch.sigmoid(self.slope * (entropy - self.center))


@dataclass
class Mixed:
    """A batch's mixed distributions and the mixer's closed-form probability of each target."""

    probs: torch.Tensor  # (m, V) float64 distributions
    shortcut: torch.Tensor  # (n,) float64 p(x_t) from the gold token's counts (another code path)
    rows: torch.Tensor | None = None  # batch indices `probs` covers; None: all n, in order
    stats: dict[str, int | float] = field(default_factory=dict)


def as_token_array(tokens: np.ndarray | torch.Tensor, end: int) -> np.ndarray:
    """tokens[:end] as a numpy array: nothing at or after `end` is read."""
    if end > len(tokens):
        raise ValueError(f"position {end - 1} is outside the token stream of length {len(tokens)}")
    head = tokens[:end]
    return head.detach().cpu().numpy() if isinstance(head, torch.Tensor) else np.asarray(head)


def model_distribution(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) float64 softmax of logits (or log-probabilities) and its entropy in nats."""
    p = torch.softmax(logprobs.detach().to(torch.float64), dim=-1)
    return p, torch.special.entr(p).sum(dim=-1)


class NgramMixer:
    """What the engine relies on; subclasses implement `_mix`, `_commit` and optionally `_prepare`."""

    mode = ""
    compliant = False
    scores_from_vector = True  # False: the engine scores the shortcut (hashed-940)
    stat_names: tuple[str, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.committed_upto = 0
        self._stats = dict.fromkeys(self.stat_names, 0)

    def prepare(self, tokens: np.ndarray | torch.Tensor, end: int) -> None:
        """Count the targets up to end − 1 in one pass (a chunk; prefix counts, nothing committed)."""
        if end > self.committed_upto:
            self._prepare(as_token_array(tokens, end), end)

    def mix(self, positions: np.ndarray, tokens: np.ndarray | torch.Tensor, logprobs: torch.Tensor) -> Mixed:
        """The mixed distributions at uncommitted target positions from the model's (n, V) logits there."""
        pos = self.open_positions(positions)
        mixed = self._mix(pos, as_token_array(tokens, int(pos.max()) + 1 if pos.size else 0), logprobs)
        for name, value in mixed.stats.items():
            self._stats[name] += value
        return mixed

    def open_positions(self, positions: np.ndarray) -> np.ndarray:
        """The positions as int64; a committed one (its score is fixed) is refused."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if pos.size and pos.min() < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {int(pos.min())} is already committed (or is not a target)")
        return pos

    def full_distribution(self, position: int, tokens: np.ndarray | torch.Tensor,
                          logprobs: torch.Tensor) -> torch.Tensor:
        """The (V,) float64 distribution at `position` (probes)."""
        pos = self.open_positions(np.array([position]))
        return self._mix(pos, as_token_array(tokens, position + 1), logprobs.reshape(1, -1)).probs[0]

    def commit(self, tokens: np.ndarray | torch.Tensor, upto: int) -> None:
        """Fold tokens[committed_upto:upto] in; the engine calls it once its ledger committed those targets."""
        if upto < self.committed_upto:
            raise ScoreOrderError(f"commit({upto}) goes backwards from {self.committed_upto}")
        self._commit(as_token_array(tokens, upto), upto)
        self.committed_upto = upto

    def _prepare(self, head: np.ndarray, end: int) -> None:
        pass

    def take_stats(self) -> dict[str, int | float]:
        """Counters of the scored batches since the last call (the engine sums them over ranks)."""
        stats, self._stats = self._stats, dict.fromkeys(self.stat_names, 0)
        return stats


class CountingMixer(NgramMixer):
    """The compliant modes' base: exact prefix counts, continuation rows on the scoring device."""

    compliant = True

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        if max_order < 2:
            raise ValueError("max_order must be at least 2")
        super().__init__(vocab_size)
        self.widths = max_order - 1
        self.counts = PrefixCounts(vocab_size, max_order)
        self._prepare, self._commit, self.alpha = self.counts.prepare, self.counts.commit, alpha

    def statistics(self, pos: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, n) count(ctx_w) and count(ctx_w, x_t) at the targets."""
        self.counts.prepare(head, int(pos.max()) + 1)
        return self.counts.context_counts(pos), self.counts.pair_counts(pos)

    def rows(self, width: int, pos: np.ndarray, device: torch.device) -> torch.Tensor:
        """(n, V) float64 count(ctx_width, v) at targets whose context occurred before t."""
        query, token, count = (torch.from_numpy(a).to(device) for a in self.counts.rows(width, pos))
        out = torch.zeros(pos.size, self.vocab_size, dtype=torch.float64, device=device)
        return out.index_put_((query, token), count.to(torch.float64), accumulate=True)

    @staticmethod
    def targets(pos: np.ndarray, head: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(head[pos].astype(np.int64)).to(device)


class BackoffNgramMixer(CountingMixer):
    """Mode "exact": with the widest context seen ≥ min_count times, (1 − α)·p_model + α·count(ctx, ·)/count(ctx)."""

    mode = "exact"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, min_count: int = DEFAULT_MIN_COUNT,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order, alpha=alpha)
        if min_count < 1:
            raise ValueError("min_count must be at least 1")
        self.min_count = min_count

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device = logprobs.device
        p, entropy = model_distribution(logprobs)
        context, pair = self.statistics(pos, head)
        # A context never occurs more often than its suffix: widths 1..width are eligible (0: the model).
        width = (context >= self.min_count).sum(axis=0)
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
    """Mode "smoothed": p_0 = p_model, p_w = (count(ctx_w, ·) + β·p_{w−1}) / (count(ctx_w) + β), p_mix =
    (1 − α)·p_model + α·p_W. β = 2 was chosen on the sample *train* shard."""

    mode = "smoothed"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, concentration: float = 2.0,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order, alpha=alpha)
        if concentration <= 0:
            raise ValueError("concentration must be positive")
        self.concentration = concentration

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device, beta = logprobs.device, self.concentration
        p, entropy = model_distribution(logprobs)
        context, pair = self.statistics(pos, head)
        alpha = self.alpha(entropy)
        level = p.clone()
        p_target = p.gather(1, self.targets(pos, head, device)[:, None]).squeeze(1)
        level_target = p_target
        for w in range(1, self.widths + 1):
            at = np.flatnonzero(context[w - 1] > 0)
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


# Upstream's accepted tilt-log counters, plus how often the hint was the target and the summed β.
TILT_STATS = ("total", "gated", "token_gate", "within_gate", "word_gate", "agree2plus", "hint_hits", "beta_sum")


class TiltMixer(CountingMixer):
    """Mode "tilt", the token-only tilt the organisers accepted (reference §8.2): hint = the top continuation
    (ties: smallest id) of the widest context seen ≥ min_count times with share conf ≥ threshold, β =
    base_beta·conf, p'(v) = p(v)·e^{β·1[v = hint]}/Z. No word experts (their gates read the target: C1)."""

    mode = "tilt"
    stat_names = TILT_STATS

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, base_beta: float = 2.0,
                 threshold: float = 0.5, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(vocab_size, max_order=max_order)
        self.base_beta, self.threshold, self.min_count = base_beta, threshold, min_count

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device = logprobs.device
        p, _ = model_distribution(logprobs)
        context, _ = self.statistics(pos, head)
        hint = torch.full((pos.size,), -1, dtype=torch.long, device=device)
        beta = torch.zeros(pos.size, dtype=torch.float64, device=device)
        open_ = np.ones(pos.size, bool)
        for w in range(self.widths, 0, -1):
            at = np.flatnonzero(open_ & (context[w - 1] >= self.min_count))
            if not at.size:
                continue
            best, token = self.rows(w, pos[at], device).max(dim=1)  # max: the first (smallest) id on ties
            conf = best / torch.from_numpy(context[w - 1, at]).to(device, torch.float64)
            chosen = conf >= self.threshold
            index = torch.from_numpy(at).to(device)[chosen]
            hint[index], beta[index] = token[chosen], self.base_beta * conf[chosen]
            open_[at[chosen.cpu().numpy()]] = False
        has, rows, on_hint = hint >= 0, torch.arange(pos.size, device=device), hint.clamp_min(0)
        boost = torch.where(has, beta.exp(), 1.0)
        z = 1.0 + p[rows, on_hint] * (boost - 1.0)
        tilted = p.clone()
        tilted[rows, on_hint] *= boost
        targets = self.targets(pos, head, device)
        logp_target = p.gather(1, targets[:, None]).squeeze(1).log()
        nll = -logp_target + torch.where(has, z.log() - beta * (targets == hint), 0.0)
        gated = int(has.sum())
        stats = {"total": pos.size, "gated": gated, "token_gate": gated,
                 "hint_hits": int((has & (targets == hint)).sum()), "beta_sum": float(beta.sum())}
        return Mixed(tilted / z[:, None], torch.exp(-nll), stats=stats)


def make_mixer(mode: str, vocab_size: int) -> NgramMixer | None:
    """The mixer for a `--ngram` mode with its default settings (None for "off")."""
    if mode == "hashed-940":  # the non-compliant reproduction: never imported by a compliant evaluation
        from service.engine.ngram_hashed import Hashed940Mixer

        return Hashed940Mixer(vocab_size)
    if mode not in NGRAM_MODES:
        raise ValueError(f"unknown n-gram mode {mode!r}; expected one of {', '.join(NGRAM_MODES)}")
    if mode == "off":
        return None
    return {"exact": BackoffNgramMixer, "smoothed": SmoothedNgramMixer, "tilt": TiltMixer}[mode](vocab_size)
