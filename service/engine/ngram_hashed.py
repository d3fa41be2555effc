"""`hashed-940`: the upstream PR #727/#761/#940 n-gram cache, reproduced for comparison only.

Reference-stack.md §8.1. Per order n = 2..7 (context width w = n − 1) two uint32 tables of 2^22 buckets:
ctx_counts (the context) and full_counts (the context with the *target* token hashed into the key). At target
position j, h = XOR_k tok[j−w+k]·P_k in wrapping uint64 arithmetic, ctx_key = h & (B − 1) and
full_key = (h XOR tok[j]·P_w) & (B − 1). Orders are tried from the highest; the first with ctx ≥ 2 (and j ≥ w)
gives p_ng = min(full, ctx)/ctx; the target alone is mixed, p_mix = (1 − α)·p_model(tok[j]) + α·p_ng, and
NLL = −ln max(p_mix, 1e−12).

Update granularity, as at the PR head: every scored segment of `update_every` = 64 targets (a sliding
window's stride) is added to the tables right after it is scored, so a target sees every earlier segment
but not the earlier targets of its own segment. Segments are the blocks (j − 1) // 64 of the stream (the
PR's first window scores 2048 targets as one segment; that difference is confined to the first 2048). The
per-segment updates are computed vectorised for each batch of targets (tables + counts from the chunk's
earlier segments), which gives the same numbers without a Python loop per segment, whatever the batching of
the engine's calls. `update_every=None` gives the fork's lock-step variant instead: tables change only at
`commit`.

Why it is not a valid score (compliance-rules.md §3.1, §4, §5.1): the value is only ever computed for the
realised token, with the token inside the lookup key; evaluated for every candidate v, the same formula sums
far above 1 once buckets collide. The mixer says so: `compliant = False`, and `measured_probability_sum`
evaluates Σ_v p_mix(v) at a position.

Calls must come in position order within a chunk (each call's targets after the previous call's), as the
evaluation engine scores them; scoring a chunk in one call or batch by batch gives the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine.ngram import (
    ALPHA_BASE,
    ALPHA_CENTER,
    ALPHA_SLOPE,
    ALPHA_SPAN,
    DEFAULT_MAX_ORDER,
    DEFAULT_MIN_COUNT,
    Mixed,
    NgramMixer,
    ScoreOrderError,
    model_distribution,
)

HASH_PRIMES = (36313, 27191, 51647, 81929, 131071, 175447, 209591)
DEFAULT_BUCKETS = 1 << 22
DEFAULT_UPDATE_EVERY = 64  # the sliding-window stride: one window's scored segment
PROBABILITY_FLOOR = 1e-12


class Hashed940Mixer(NgramMixer):
    """Target-keyed hashed backoff cache with gold-only mixing. Not a distribution; never a valid score."""

    mode = "hashed-940"
    compliant = False
    scores_from_vector = False  # the claimed number scores the target's formula value, not a distribution
    vectors_per_batch = 4  # Σ_v of the formula is measured at this many positions of each batch (it is slow)

    def __init__(self, vocab_size: int, *, buckets: int = DEFAULT_BUCKETS, max_order: int = DEFAULT_MAX_ORDER,
                 min_count: int = DEFAULT_MIN_COUNT, update_every: int | None = DEFAULT_UPDATE_EVERY) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        if max_order - 1 >= len(HASH_PRIMES):
            raise ValueError(f"max_order is at most {len(HASH_PRIMES)} with {len(HASH_PRIMES)} primes")
        super().__init__(vocab_size)
        self.buckets = buckets
        self.widths = max_order - 1
        self.min_count = min_count
        self.update_every = update_every
        self.ctx_counts = np.zeros((self.widths, buckets), np.uint32)
        self.full_counts = np.zeros((self.widths, buckets), np.uint32)
        self._mask = np.uint64(buckets - 1)
        self._primes = np.array(HASH_PRIMES, np.uint64)
        # Counts seen by the targets first_target..computed_upto − 1 (columns): tables + the chunk's earlier
        # segments. The keys of the chunk's complete segments before segment_upto are summed in dense arrays
        # like the tables, so extending the region costs only its new positions (and one partial segment).
        self._seen = np.zeros((2, self.widths, 0), np.int64)
        self._computed_upto = 0
        self._segments_upto = 0
        self._chunk_counts: np.ndarray | None = None  # (2, W, B) once a chunk has a complete segment

    # -- the upstream keys ------------------------------------------------------------------------------------

    def _context_hashes(self, head: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """(W, n) h_w = XOR_{k<w} tok[j−w+k]·P_k; columns with j < w are garbage and masked by the caller."""
        hashes = np.zeros((self.widths, pos.size), np.uint64)
        for w in range(1, self.widths + 1):
            h = np.zeros(pos.size, np.uint64)
            for k in range(w):
                h ^= head[np.maximum(pos - w + k, 0)].astype(np.uint64) * self._primes[k % len(self._primes)]
            hashes[w - 1] = h
        return hashes

    def _keys(self, head: np.ndarray, pos: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, n) ctx_key and full_key = (h_w XOR tok·P_w) & (B − 1) for the token `candidates` (upstream:
        the target)."""
        hashes = self._context_hashes(head, pos)
        widths = np.arange(1, self.widths + 1)
        target_term = candidates.astype(np.uint64)[None, :] * self._primes[widths % len(self._primes)][:, None]
        return (hashes & self._mask).astype(np.intp), ((hashes ^ target_term) & self._mask).astype(np.intp)

    def _segment(self, pos: np.ndarray) -> np.ndarray:
        if self.update_every is None:
            return np.zeros(pos.size, np.int64)
        return (pos - 1) // self.update_every

    def _segment_start(self, position: int) -> int:
        """First target of the segment holding `position` (the chunk start in lock-step mode)."""
        first_target = max(self.committed_upto, 1)
        if self.update_every is None:
            return first_target
        return max(first_target, (position - 1) // self.update_every * self.update_every + 1)

    def _seen_counts(self, head: np.ndarray, end: int) -> np.ndarray:
        """(2, W, n) ctx and full counts seen by targets first_target..end−1: the tables plus the chunk's targets
        in earlier segments (bucket keys, collisions and all, exactly as the tables would hold them)."""
        first_target = max(self.committed_upto, 1)
        computed = max(self._computed_upto, first_target)
        if end <= computed:
            return self._seen
        # Earlier segments of the chunk that the new targets see: those before the open segment are summed
        # in dense arrays (added once, when a later call first needs them); the open one is counted here.
        if self.update_every is None:  # lock-step: the chunk's own targets are never seen before commit
            recent_from = computed
        else:
            recent_from = self._segment_start(computed)
        if self.update_every is not None and recent_from > max(self._segments_upto, first_target):
            self._add_chunk_segments(head, max(self._segments_upto, first_target), recent_from, +1)
        recent = np.arange(recent_from, end)
        keys = np.stack(self._keys(head, recent, head[recent]))  # (2, W, r)
        rows = np.arange(self.widths)[:, None]
        new = recent >= computed
        seen = np.stack([self.ctx_counts[rows, keys[0][:, new]], self.full_counts[rows, keys[1][:, new]]])
        seen = seen.astype(np.int64)
        if self._chunk_counts is not None:
            seen += np.stack([self._chunk_counts[i][rows, keys[i][:, new]] for i in range(2)])
        segment, offset = self._segment(recent), computed - recent_from
        for w in range(1, self.widths + 1 if self.update_every is not None else 1):
            valid = np.flatnonzero(recent >= w)
            valid_new = new[valid]
            for i in range(2):
                earlier = _earlier_segment_counts(keys[i, w - 1, valid], segment[valid])
                seen[i, w - 1, valid[valid_new] - offset] += earlier[valid_new]
        self._seen = np.concatenate([self._seen, seen], axis=2)
        self._computed_upto = end
        return self._seen

    def _add_chunk_segments(self, head: np.ndarray, start: int, end: int, sign: int) -> None:
        """Add (sign +1) or remove (−1) the keys of targets start..end−1 to / from the chunk's dense counts."""
        if self._chunk_counts is None:
            self._chunk_counts = np.zeros((2, self.widths, self.buckets), np.uint32)
        pos = np.arange(start, end)
        keys = self._keys(head, pos, head[pos])
        ufunc = np.add if sign > 0 else np.subtract
        for w in range(1, self.widths + 1):
            valid = pos >= w
            for i in range(2):
                ufunc.at(self._chunk_counts[i, w - 1], keys[i][w - 1, valid], np.uint32(1))
        self._segments_upto = end if sign > 0 else 0

    # -- the formula ---------------------------------------------------------------------------------------------

    def _choose(self, pos: np.ndarray, ctx: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order found, ctx count, full count) per position, highest order with ctx ≥ min_count first."""
        eligible = (ctx >= self.min_count) & (pos[None, :] >= np.arange(1, self.widths + 1)[:, None])
        width = self.widths - np.argmax(eligible[::-1], axis=0)
        width = np.where(eligible.any(axis=0), width, 0)
        row, cols = np.maximum(width - 1, 0), np.arange(pos.size)
        return width, ctx[row, cols], full[row, cols]

    def _formula(self, width: np.ndarray, ctx: np.ndarray, full: np.ndarray, p_model: np.ndarray,
             entropy: np.ndarray) -> np.ndarray:
        p_ngram = np.clip(np.minimum(full, ctx) / np.maximum(ctx, 1), 0.0, 1.0)
        entropy = np.asarray(entropy, np.float64)  # in numpy, element by element: independent of the batching
        alpha = ALPHA_BASE + ALPHA_SPAN / (1.0 + np.exp(-ALPHA_SLOPE * (entropy - ALPHA_CENTER)))
        return np.where(width > 0, (1.0 - alpha) * p_model + alpha * p_ngram, p_model)

    # -- streaming interface -----------------------------------------------------------------------------------

    def _prepare(self, head: np.ndarray, end: int) -> None:
        self._seen_counts(head, end)

    def score(self, positions: np.ndarray, tokens: np.ndarray, target_lp: np.ndarray,
              entropy: np.ndarray) -> np.ndarray:
        """The upstream gold-only NLL (float64 nats) at `positions` from the model's log p(x_t) and entropy."""
        pos = np.asarray(positions, np.int64).reshape(-1)
        if pos.size and pos.min() < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {int(pos.min())} is already committed: it cannot be scored again")
        nll = self._score(pos, np.asarray(tokens[: pos.max() + 1]), np.asarray(target_lp, np.float64),
                          np.asarray(entropy, np.float64)) if pos.size else np.zeros(0)
        return nll

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        p, entropy = model_distribution(logprobs)
        targets = torch.from_numpy(head[pos].astype(np.int64)).to(p.device)
        target_lp = p.gather(1, targets[:, None]).squeeze(1).log()
        nll = self._score(pos, head, target_lp.cpu().numpy(), entropy.cpu().numpy())
        checked = range(min(self.vectors_per_batch, pos.size))
        probs = torch.stack([self.full_distribution(int(pos[i]), head, logprobs[i]) for i in checked])
        return Mixed(probs.to(p.device), torch.from_numpy(np.exp(-nll)).to(p.device),
                     torch.arange(len(checked), device=p.device))

    def _score(self, pos: np.ndarray, head: np.ndarray, target_lp: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        seen = self._seen_counts(head, int(pos.max()) + 1)
        column = pos - max(self.committed_upto, 1)
        width, ctx, full = self._choose(pos, seen[0][:, column], seen[1][:, column])
        p_mix = self._formula(width, ctx, full, np.exp(target_lp), entropy)
        return -np.log(np.maximum(p_mix, PROBABILITY_FLOOR))

    def _commit(self, head: np.ndarray, upto: int) -> None:
        first_target = max(self.committed_upto, 1)
        pos = np.arange(first_target, upto)
        if self._chunk_counts is not None and self._segments_upto > upto:
            self._chunk_counts.fill(0)
        elif self._segments_upto > first_target:  # back to zero without touching all 2·W·B counters
            self._add_chunk_segments(head, first_target, self._segments_upto, -1)
        self._seen = np.zeros((2, self.widths, 0), np.int64)
        self._computed_upto = self._segments_upto = 0
        if pos.size == 0:
            return
        ctx_keys, full_keys = self._keys(head, pos, head[pos])
        one = np.uint32(1)
        for w in range(1, self.widths + 1):
            scored = pos >= w
            np.add.at(self.ctx_counts[w - 1], ctx_keys[w - 1, scored], one)
            np.add.at(self.full_counts[w - 1], full_keys[w - 1, scored], one)

    def full_distribution(self, position: int, tokens: np.ndarray,
                          model_logprobs: torch.Tensor) -> torch.Tensor:
        """The formula's value for every candidate v at `position` (float64, (V,)): NOT a distribution.

        The chosen order and α do not depend on v; only the full-table lookup does, exactly as it would had v
        been the target. Built from tokens[:position], the tables, and the chunk's earlier segments.
        """
        if position < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {position} is already committed: its distribution is gone")
        head = np.asarray(tokens[:position])
        candidates = np.arange(self.vocab_size)
        pos = np.full(self.vocab_size, position, np.int64)
        ctx_keys, full_keys = self._keys(head, pos, candidates)  # reads tok[< position] only
        rows = np.arange(self.widths)[:, None]
        ctx = self.ctx_counts[rows, ctx_keys].astype(np.int64)
        full = self.full_counts[rows, full_keys].astype(np.int64)
        earlier = np.arange(max(self.committed_upto, 1), position)
        earlier = earlier[self._segment(earlier) < self._segment(np.array([position]))[0]]
        if earlier.size:  # the chunk's segments already added to the tables at this point
            earlier_ctx, earlier_full = self._keys(head, earlier, head[earlier])
            for w in range(1, self.widths + 1):
                valid = earlier >= w
                ctx[w - 1] += np.count_nonzero(earlier_ctx[w - 1, valid] == ctx_keys[w - 1, 0])
                full[w - 1] += _occurrences(earlier_full[w - 1, valid], full_keys[w - 1])
        width, ctx_at, full_at = self._choose(pos, ctx, full)
        logp = torch.log_softmax(model_logprobs.detach().to("cpu", torch.float64).reshape(-1), dim=-1)
        entropy = float(-(logp.exp() * logp).sum())
        p_model = logp.exp().numpy()
        return torch.from_numpy(self._formula(width, ctx_at, full_at, p_model, np.full(self.vocab_size, entropy)))

    def measured_probability_sum(self, position: int, tokens: np.ndarray,
                                 model_logprobs: torch.Tensor) -> float:
        """Σ_v p_mix(v) at `position`: 1 for a distribution; far above 1 here once the buckets fill."""
        return float(self.full_distribution(position, tokens, model_logprobs).sum())


def _earlier_segment_counts(keys: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Per element: how many elements with the same key lie in an earlier segment (elements in position order,
    segments non-decreasing)."""
    n = keys.size
    if n == 0:
        return np.zeros(0, np.int64)
    index_bits = max(1, (n - 1).bit_length())
    composite = np.sort((keys.astype(np.uint64) << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64))
    order = (composite & np.uint64((1 << index_bits) - 1)).astype(np.intp)
    key_sorted, segment_sorted = composite >> np.uint64(index_bits), segment[order]
    index = np.arange(n)
    new_key = np.ones(n, bool)
    new_key[1:] = key_sorted[1:] != key_sorted[:-1]
    new_run = new_key.copy()
    new_run[1:] |= segment_sorted[1:] != segment_sorted[:-1]
    key_start = np.maximum.accumulate(np.where(new_key, index, 0))
    run_start = np.maximum.accumulate(np.where(new_run, index, 0))
    out = np.empty(n, np.int64)
    out[order] = run_start - key_start
    return out


def _occurrences(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """How many times each query occurs in `values`."""
    keys, counts = np.unique(values, return_counts=True)
    at = np.minimum(np.searchsorted(keys, queries), max(keys.size - 1, 0))
    hit = (keys.size > 0) & (keys[at] == queries) if keys.size else np.zeros(queries.size, bool)
    return np.where(hit, counts[at] if keys.size else 0, 0)
