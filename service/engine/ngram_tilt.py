"""`tilt`: the token-only causal n-gram tilt of the model softmax, the one n-gram form the organisers accepted
after the 2026-03-27 sweep (compliance-rules.md §3.1, reference-stack.md §8.2).

Hint at target t, from exact prefix counts only: scan context widths from the widest; the first context seen
at least `min_count` times whose most frequent continuation holds a share conf = best/count ≥ `threshold`
gives hint = that continuation (ties: the smallest token id) and β = base_beta·conf. Then

    p'(v) = p(v)·e^{β·1[v = hint]} / Z,   Z = 1 + p(hint)·(e^β − 1),

a proper distribution whatever the hint (and p' = p where there is none). The engine scores −ln p'(x_t) from
the vector; the shortcut is the reference's per-token form nll' = nll + ln Z − β·1[x_t = hint].

There is only the token expert: no within-word or word-start expert, whose gates upstream read the realised
target (ruled C1, 2026-05-02), so the gate counters that the accepted logs show are zero by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine.ngram import DEFAULT_MAX_ORDER, CountingMixer, Mixed, model_distribution

DEFAULT_BASE_BETA = 2.0
DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_COUNT = 2


class TiltMixer(CountingMixer):
    mode = "tilt"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, base_beta: float = DEFAULT_BASE_BETA,
                 threshold: float = DEFAULT_THRESHOLD, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(vocab_size, max_order=max_order)
        self.base_beta = base_beta
        self.threshold = threshold
        self.min_count = min_count
        self._stats = dict.fromkeys(STAT_NAMES, 0)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def hints(self, pos: np.ndarray, head: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint token or −1, β) per target, from the counts of tokens before each target."""
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
        return hint, beta

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        device = logprobs.device
        p, _ = model_distribution(logprobs)
        hint, beta = self.hints(pos, head, device)
        has = hint >= 0
        rows = torch.arange(pos.size, device=device)
        on_hint = hint.clamp_min(0)
        boost = torch.where(has, beta.exp(), 1.0)
        z = 1.0 + p[rows, on_hint] * (boost - 1.0)
        tilted = p.clone()
        tilted[rows, on_hint] *= boost
        targets = self.targets(pos, head, device)
        logp_target = p.gather(1, targets[:, None]).squeeze(1).log()
        nll = -logp_target + torch.where(has, z.log() - beta * (targets == hint), 0.0)
        self._last = (has, targets == hint, beta)
        return Mixed(tilted / z[:, None], torch.exp(-nll))

    def mix(self, positions: np.ndarray, tokens: np.ndarray | torch.Tensor, logprobs: torch.Tensor) -> Mixed:
        mixed = super().mix(positions, tokens, logprobs)
        has, hit, beta = self._last
        gated = int(has.sum())
        # Read after the scores are fixed; they only count what happened.
        for name, value in (("total", has.numel()), ("gated", gated), ("token_gate", gated),
                            ("hint_hits", int((has & hit).sum())), ("beta_sum", float(beta.sum()))):
            self._stats[name] += value
        return mixed

    def take_stats(self) -> dict[str, int | float]:
        stats, self._stats = self._stats, dict.fromkeys(STAT_NAMES, 0)
        return stats


# The counters of upstream's accepted tilt logs (`ngram_tilt:hints total=… gated=… token_gate=… within_gate=…
# word_gate=… agree2plus=…`), plus how often the hint was the target and the summed β.
STAT_NAMES = ("total", "gated", "token_gate", "within_gate", "word_gate", "agree2plus", "hint_hits", "beta_sum")


def log_line(stats: dict[str, int | float]) -> str:
    """The upstream log line for a run's summed counters."""
    counts = " ".join(f"{name}={int(stats.get(name, 0))}" for name in STAT_NAMES[1:6])
    return f"ngram_tilt:hints total={int(stats.get('total', 0))} {counts}"
