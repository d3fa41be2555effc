"""Causal n-gram mixing over the whole vocabulary (exact, smoothed, tilt): docs/evaluation.md §6."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from service.engine.ngram_counts import PrefixCounts

DEFAULT_MAX_ORDER = 7  # context widths 1..6
DEFAULT_MIN_COUNT = 2


class ScoreOrderError(RuntimeError):
    """A token would influence a score not yet fixed (C3), or a position would be scored again."""


# α of the model's entropy H (nats), never of the target (reference §8.1)
ALPHA_BASE = 0.05
ALPHA_SPAN = 0.55
ALPHA_CENTER = 4.0
ALPHA_SLOPE = 2.0


def entropy_alpha(entropy: torch.Tensor) -> torch.Tensor:
    return ALPHA_BASE + ALPHA_SPAN * torch.sigmoid(ALPHA_SLOPE * (entropy - ALPHA_CENTER))


@dataclass
class Mixed:
    probs: torch.Tensor  # (m, V) float64 distributions
    shortcut: torch.Tensor  # (n,) float64 p(x_t) from the gold token's counts (another code path)
    rows: torch.Tensor | None = None  # batch indices `probs` covers; None: all n, in order
    stats: dict[str, int | float] = field(default_factory=dict)


def model_distribution(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) float64 softmax of logits or log-probabilities, and its entropy (nats)."""
    p = torch.softmax(logprobs.detach().to(torch.float64), dim=-1)
    return p, torch.special.entr(p).sum(dim=-1)


class NgramMixer:
    """What the engine relies on; subclasses implement `_mix`, `_commit` and optionally `_prepare`."""

    compliant = False
    scores_from_vector = True  # False: the engine scores the shortcut (hashed-940)
    stat_names: tuple[str, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.committed_upto = 0
        self._stats = dict.fromkeys(self.stat_names, 0)

    def prepare(self, tokens: np.ndarray, end: int) -> None:
        if end > self.committed_upto:  # else the committed counts cover it
            self._prepare(tokens[:end], end)

    def mix(self, positions: np.ndarray, tokens: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        mixed = self._mix(positions, self.head(tokens, positions), logprobs)
        for name, value in mixed.stats.items():
            self._stats[name] += value
        return mixed

    def full_distribution(self, position: int, tokens: np.ndarray, logprobs: torch.Tensor) -> torch.Tensor:
        """`mix` at one position for the probes, not counted in the stats."""
        pos = np.array([position])
        return self._mix(pos, self.head(tokens, pos), logprobs.reshape(1, -1)).probs[0]

    def head(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """tokens[:last target + 1] (C1); a committed position is refused: the counts moved on."""
        if pos.min() < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {int(pos.min())} is already committed (or is not a target)")
        return tokens[: pos.max() + 1]

    def commit(self, tokens: np.ndarray, upto: int) -> None:
        """Fold tokens[committed_upto:upto] in; the engine calls it once its ledger committed those targets."""
        if upto < self.committed_upto:
            raise ScoreOrderError(f"commit({upto}) goes backwards from {self.committed_upto}")
        self._commit(tokens[:upto], upto)
        self.committed_upto = upto

    def _prepare(self, head: np.ndarray, end: int) -> None:
        pass  # no one-pass path: `_mix` counts

    def take_stats(self) -> dict[str, int | float]:
        """The counters since the last call (the engine sums them over ranks)."""
        stats, self._stats = self._stats, dict.fromkeys(self.stat_names, 0)
        return stats


@dataclass(eq=False)
class CountingMixer(NgramMixer):
    """The compliant modes: exact prefix counts; a mode's settings are its fields."""

    vocab_size: int
    compliant = True
    widths = DEFAULT_MAX_ORDER - 1

    def __post_init__(self) -> None:
        for setting in fields(self):
            if not getattr(self, setting.name) > 0:
                raise ValueError(f"{setting.name} must be positive")
        super().__init__(self.vocab_size)
        self.counts = PrefixCounts(self.vocab_size, DEFAULT_MAX_ORDER)
        self._prepare, self._commit = self.counts.prepare, self.counts.commit

    def inputs(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
        """The model's p and entropy, (W, n) count(ctx_w) and count(ctx_w, x_t), the targets x_t and p(x_t)."""
        p, entropy = model_distribution(logprobs)
        targets = torch.from_numpy(head[pos].astype(np.int64)).to(p.device)
        self.counts.prepare(head, int(pos.max()) + 1)
        context, pair = self.counts.context_counts(pos), self.counts.pair_counts(pos)
        return p, entropy, context, pair, targets, p.gather(1, targets[:, None]).squeeze(1)

    def rows(self, width: int, pos: np.ndarray, at: np.ndarray, context: np.ndarray,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`at`, count(ctx, ·) (k, V) and count(ctx) (k, 1) at batch indices `at` whose ctx of `width` occurred."""
        query, token, count = (torch.from_numpy(a).to(device) for a in self.counts.rows(width, pos[at]))
        row = torch.zeros(at.size, self.vocab_size, dtype=torch.float64, device=device)
        row.index_put_((query, token), count.to(torch.float64), accumulate=True)
        seen = torch.from_numpy(context[width - 1, at, None]).to(device, row.dtype)
        return torch.from_numpy(at).to(device), row, seen


@dataclass(eq=False)
class BackoffNgramMixer(CountingMixer):
    """(1 − α)·p + α·count(ctx, ·)/count(ctx), ctx the widest seen ≥ min_count times."""

    mode = "exact"
    min_count: int = DEFAULT_MIN_COUNT

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        p, entropy, context, pair, _, p_target = self.inputs(pos, head, logprobs)
        # A context never occurs more often than its suffix: widths 1..width are eligible (0: the model, α = 0).
        width = (context >= self.min_count).sum(axis=0)
        alpha = torch.where(torch.from_numpy(width > 0).to(p.device), entropy_alpha(entropy), 0.0)
        ngram = p.clone()
        for w in range(1, self.widths + 1):
            at = np.flatnonzero(width == w)
            if at.size:
                index, row, seen = self.rows(w, pos, at, context, p.device)
                ngram.index_copy_(0, index, row.div_(seen))
        column = np.maximum(width - 1, 0), np.arange(pos.size)
        p_ngram = torch.from_numpy(pair[column] / np.maximum(context[column], 1)).to(p.device)
        return Mixed(ngram.sub_(p).mul_(alpha[:, None]).add_(p), p_target + alpha * (p_ngram - p_target))


@dataclass(eq=False)
class SmoothedNgramMixer(CountingMixer):
    """(1 − α)·p + α·p_W, p_w = (count(ctx_w, ·) + β·p_{w−1}) / (count(ctx_w) + β), p_0 = p."""

    mode = "smoothed"
    concentration: float = 2.0  # β, chosen on the sample *train* shard

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        beta = self.concentration
        p, entropy, context, pair, _, p_target = self.inputs(pos, head, logprobs)
        level, level_target = p.clone(), p_target
        for w in range(1, self.widths + 1):
            at = np.flatnonzero(context[w - 1] > 0)
            if at.size:
                index, row, seen = self.rows(w, pos, at, context, p.device)
                if at.size == pos.size:  # every context seen: no gather and scatter of the whole batch
                    level = row.add_(level, alpha=beta).div_(seen + beta)
                else:
                    level.index_copy_(0, index, row.add_(level.index_select(0, index), alpha=beta).div_(seen + beta))
            c, n = (torch.from_numpy(a[w - 1]).to(p.device, torch.float64) for a in (context, pair))
            level_target = (n + beta * level_target) / (c + beta)
        alpha = entropy_alpha(entropy)
        return Mixed(level.sub_(p).mul_(alpha[:, None]).add_(p), p_target + alpha * (level_target - p_target))


# The upstream tilt log's counters, the hint hits and the summed β.
TILT_STATS = ("total", "gated", "token_gate", "within_gate", "word_gate", "agree2plus", "hint_hits", "beta_sum")


@dataclass(eq=False)
class TiltMixer(CountingMixer):
    """p(v)·e^{β·1[v = hint]}/Z, the token-only tilt the organisers accepted."""

    mode = "tilt"
    stat_names = TILT_STATS
    base_beta: float = 2.0
    threshold: float = 0.5
    min_count: int = DEFAULT_MIN_COUNT

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        p, _, context, _, targets, p_target = self.inputs(pos, head, logprobs)
        hint, beta = torch.full_like(targets, -1), torch.zeros_like(p_target)  # no hint: β = 0, e^β = Z = 1
        for w in range(self.widths, 0, -1):
            at = np.flatnonzero((hint < 0).cpu().numpy() & (context[w - 1] >= self.min_count))
            if at.size:
                index, row, seen = self.rows(w, pos, at, context, p.device)
                best, token = row.max(dim=1)  # max: the first (smallest) id on ties
                conf = best / seen[:, 0]
                chosen = conf >= self.threshold
                hint[index[chosen]], beta[index[chosen]] = token[chosen], self.base_beta * conf[chosen]
        on_hint, boost = hint.clamp_min(0)[:, None], beta.exp()[:, None]
        hinted = p.gather(1, on_hint)
        z = 1.0 + hinted * (boost - 1.0)
        tilted = (p / z).scatter_(1, on_hint, hinted * boost / z)  # no clone: one pass
        nll = -p_target.log() + (z[:, 0].log() - beta * (targets == hint))
        gated = int((hint >= 0).sum())
        stats = {"total": pos.size, "gated": gated, "token_gate": gated, "hint_hits": int((targets == hint).sum()),
                 "beta_sum": float(beta.sum())}
        return Mixed(tilted, torch.exp(-nll), stats=stats)


def make_mixer(mode: str, vocab_size: int) -> NgramMixer | None:
    """The mixer of a `--ngram` mode (EvalOptions.validate checked it), default settings; None: off."""
    if mode == "hashed-940":  # the non-compliant reproduction: never imported by a compliant evaluation
        from service.engine.ngram_hashed import Hashed940Mixer

        return Hashed940Mixer(vocab_size)
    mixer = {"off": None, "exact": BackoffNgramMixer, "smoothed": SmoothedNgramMixer, "tilt": TiltMixer}[mode]
    return mixer(vocab_size) if mixer else None
