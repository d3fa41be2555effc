"""Exact causal counts of every k-gram (k = 1..K) of a token stream, and the counts of all continuations.

inc_k(u) counts the k-gram ending at u at or before u; at target t, count(ctx_w) = inc_w(t − 1) − 1 and
count(ctx_w, x_t) = inc_{w+1}(t) − 1. A gram's id is the position where it first ends; a k-gram is keyed by
(id of its (k−1)-prefix + 1)·V + last token (empty prefix: id −1), exact for any order and vocabulary. Per
length, disjoint sorted runs merged geometrically: a context's continuations are one key range per run.
Lean storage: the gram that first follows its prefix's first occurrence p (ending at p + 1, "primary") is not
stored while seen once; lookups add it back from the stream, so a position whose prefix is new needs no lookup.
`prepare(head, end)` reads head = tokens[:end] only; `commit` folds tokens[committed_upto:upto] in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STREAM = 1 << 31  # ids and counts are packed in 32 bits each
LOW = 0xFFFFFFFF
MERGE_RATIO = 2  # a run is merged into the one before it once over half its size


class SortedRuns:
    """Disjoint sorted runs of key → id << 32 | count for one gram length; a key lives in at most one run."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(run, index, value) of each key; run −1 (value 0) where absent."""
        run, index, value = np.full(keys.size, -1, np.int64), *np.zeros((2, keys.size), np.int64)
        for r, (stored, values) in enumerate(zip(self.keys, self.values, strict=True)):
            at = np.minimum(np.searchsorted(stored, keys), stored.size - 1)
            hit = np.flatnonzero(stored[at] == keys)
            run[hit], index[hit], value[hit] = r, at[hit], values[at[hit]]
        return run, index, value

    def add(self, run: np.ndarray, index: np.ndarray, amounts: np.ndarray) -> None:
        for r, values in enumerate(self.values):
            values[index[run == r]] += amounts[run == r]  # distinct indices: no lost updates

    def ranges(self, lo: np.ndarray, span: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every stored key in [lo_i, lo_i + span), per run: (query i, key, count)."""
        parts = []
        for keys, values in zip(self.keys, self.values, strict=True):
            query, index = expand(np.searchsorted(keys, lo), np.searchsorted(keys, lo + span))
            parts.append((query, keys[index], values[index] & LOW))
        return parts

    def insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add sorted keys that no run holds; runs stay sorted, each under half the one before it."""
        if not keys.size:
            return
        self.keys.append(keys)
        self.values.append(values)
        while len(self.keys) > 1 and MERGE_RATIO * self.keys[-1].size > self.keys[-2].size:
            order = np.argsort(np.concatenate(self.keys[-2:]), kind="stable")  # timsort: one linear merge
            for field in (self.keys, self.values):
                field[-2:] = [np.concatenate(field[-2:])[order]]


def expand(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges [start_i, stop_i): (i, index) for every index of every range."""
    lengths = np.maximum(stop - start, 0)
    query = np.repeat(np.arange(start.size), lengths)
    offsets = np.cumsum(lengths) - lengths
    return query, np.arange(query.size) - np.repeat(offsets - start, lengths)


@dataclass
class _Region:
    """One gram length's looked-up occurrences in the prepared region, grouped by key."""

    processed: np.ndarray  # local positions u − committed_upto, ascending
    keys: np.ndarray  # distinct keys, ascending
    composite: np.ndarray  # ascending (group << bits) | index into `processed`
    starts: np.ndarray  # offset of each group in `composite`
    sizes: np.ndarray
    before: np.ndarray  # committed count of each key (a primary singleton included)
    ids: np.ndarray
    where: tuple[np.ndarray, np.ndarray]  # (run, index) in the committed runs; run −1: not stored


class PrefixCounts:
    """Exact counts of every k-gram, k = 1..max_gram, over committed tokens and one prepared region."""

    def __init__(self, vocab_size: int, max_gram: int) -> None:
        self.vocab, self.max_gram = vocab_size, max_gram
        self.runs = [SortedRuns() for _ in range(max_gram)]
        self.committed_upto = self.end = 0  # the prepared region is [committed_upto, end)
        self.tail = np.stack([np.zeros(max_gram, np.int64), np.full(max_gram, -1, np.int64)])
        self.inc = self.ids = np.zeros((max_gram, 1), np.int64)  # column j: position committed_upto − 1 + j
        self.regions: list[_Region] = []
        self._head = np.zeros(0, np.int64)

    def prepare(self, head: np.ndarray, end: int) -> None:
        """Counts and ids of the grams ending in [committed_upto, end), from head = tokens[:end]."""
        if self.regions and end <= self.end:
            return
        if end >= MAX_STREAM:
            raise ValueError("streams of 2^31 tokens or more are not supported")
        c0, n, V = self.committed_upto, end - self.committed_upto, self.vocab
        region = np.asarray(head[c0:end]).astype(np.int64)
        if n and (region.max() >= V or region.min() < 0):
            raise ValueError(f"token ids must lie in [0, {V})")
        self._head, bits = head, _bits(n)
        inc = np.ones((self.max_gram, n + 1), np.int64)  # a gram after a new prefix: seen once, id u
        ids = np.tile(np.arange(c0 - 1, end), (self.max_gram, 1))
        inc[:, 0], ids[:, 0] = self.tail
        self.regions = []
        for k in range(1, self.max_gram + 1):
            lo = max(0, k - 1 - c0)  # local positions from lo end a k-gram, whose prefix ends in column u − c0
            processed = lo + np.flatnonzero(inc[k - 2, lo:n] >= 2) if k > 1 else np.arange(n)
            keys = ((ids[k - 2, processed] if k > 1 else -1) + 1) * V + region[processed]
            index = np.arange(keys.size)
            if keys.size and int(keys.max()).bit_length() + bits <= 63:  # one sort of (key, index) pairs
                by_key = np.sort((keys << bits) | index)
                order, sorted_keys = by_key & ((1 << bits) - 1), by_key >> bits
            else:
                order = np.argsort(keys, kind="stable")
                sorted_keys = keys[order]
            new_key = np.ones(keys.size, bool)
            new_key[1:] = sorted_keys[1:] != sorted_keys[:-1]
            starts = np.flatnonzero(new_key)
            distinct, in_group = sorted_keys[starts], np.cumsum(new_key) - 1
            parent, first = distinct // V - 1, processed[order[starts]]
            # nothing is stored after a prefix new in the region, or seen once before (its primary follows it once)
            old = np.flatnonzero((parent < c0) & ((parent < 0) | (inc[k - 2, first] > 2)))
            run, at, value = np.full(distinct.size, -1), *np.zeros((2, distinct.size), np.int64)
            run[old], at[old], value[old] = self.runs[k - 1].find(distinct[old])
            stored = run >= 0
            # not stored: primary if right after the prefix's first occurrence
            primary = ~stored & (parent >= 0) & (head[parent + 1] == distinct % V)
            before = np.where(stored, value & LOW, primary)
            gram_ids = np.where(stored, value >> 32, np.where(primary, parent + 1, first + c0))
            column = processed[order] + 1
            inc[k - 1, column] = (before - starts + 1)[in_group] + index
            ids[k - 1, column] = gram_ids[in_group]
            self.regions.append(_Region(processed, distinct, (in_group << bits) | order, starts,
                                        np.diff(np.append(starts, keys.size)), before, gram_ids, (run, at)))
        self.inc, self.ids, self.end = inc, ids, end

    def context_counts(self, positions: np.ndarray) -> np.ndarray:
        """(W, n) count(ctx_w) at targets t (committed_upto ≤ t < end), w = 1..max_gram − 1."""
        return np.maximum(_columns(self.inc[: self.max_gram - 1], positions - self.committed_upto) - 1, 0)

    def pair_counts(self, positions: np.ndarray) -> np.ndarray:
        """(W, n) count(ctx_w, x_t) at targets t."""
        return np.maximum(_columns(self.inc[1:], positions - self.committed_upto + 1) - 1, 0)

    def rows(self, width: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Continuations of ctx_width at targets t whose context occurred before t: (query, token, count)
        entries that add up."""
        c0, V, column = self.committed_upto, self.vocab, positions - self.committed_upto
        lo = (self.ids[width - 1, column] + 1) * V  # the context's continuations: keys [lo, lo + V)
        runs, region = self.runs[width], self.regions[width]
        parts = [(query, key % V, count) for query, key, count in runs.ranges(lo, V)]
        # the primary continuation x[p + 1] (p: the context's id) counts once unless stored
        primary = np.asarray(self._head[lo // V]).astype(np.int64)
        single = np.flatnonzero(runs.find(lo + primary)[0] < 0)
        parts.append((single, primary[single], np.ones(single.size, np.int64)))
        query, group = expand(np.searchsorted(region.keys, lo), np.searchsorted(region.keys, lo + V))
        bound = np.searchsorted(region.processed, column[query])  # occurrences ending before t
        seen = np.searchsorted(region.composite, (group << _bits(self.end - c0)) | bound) - region.starts[group]
        parts.append((query, region.keys[group] % V, seen))
        return tuple(np.concatenate(part) for part in zip(*parts, strict=True))

    def commit(self, head: np.ndarray, upto: int) -> None:
        """Fold the grams ending in [committed_upto, upto) into the runs; head = tokens[:upto]."""
        c0 = self.committed_upto
        if upto <= c0:
            return
        if self.end != upto or not self.regions:
            self.regions = []
            self.prepare(head, upto)
        for runs, region in zip(self.runs, self.regions, strict=True):
            runs.add(*region.where, region.sizes)
            new = region.where[0] < 0
            runs.insert(region.keys[new], (region.ids[new] << 32) | (region.before[new] + region.sizes[new]))
        self.tail = np.stack([self.inc[:, upto - c0], self.ids[:, upto - c0]])
        self.committed_upto = self.end = upto
        self.regions = []


def _columns(array: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """array[:, columns], a slice when they are consecutive (the engine's batches)."""
    if columns.size and columns[-1] - columns[0] == columns.size - 1:
        return array[:, columns[0]: columns[-1] + 1]
    return array[:, columns]


def _bits(n: int) -> int:
    return max(1, int(n).bit_length())
