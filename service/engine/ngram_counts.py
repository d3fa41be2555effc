"""Exact causal counts of every k-gram (k = 1..K) of a token stream, and the count rows of all continuations.

For a position u and length k, inc_k(u) counts the occurrences of the k-gram x[u−k+1..u] ending at or before u.
For a target t and context width w (ctx = x[t−w..t−1]): count(ctx) = inc_w(t − 1) − 1, count(ctx, x_t) =
inc_{w+1}(t) − 1, and row(ctx)[v] = occurrences of ctx·v ending before t, for every v (Σ_v row = count(ctx)).

Exact keys: a gram is named by the position where it first ends (its id); a (w+1)-gram is keyed by (id of its
w-gram prefix)·V + last token. Lengths with V^k ≤ 2^22 use direct-address tables; longer ones keep disjoint
sorted runs of (key, id, count), merged geometrically, so the continuations of a context are one key range
[id·V, id·V + V) per run.

Lean storage: an occurrence whose prefix ends for the first time just before it is that gram's first occurrence
(the prefix's "primary" continuation x[p + 1], p = the prefix's id). A primary gram seen once is not stored;
lookups and rows add it back from the token stream. Long grams are mostly such singletons, so the tables hold
about one entry per token for orders up to 7.

Causality: `prepare(head, end)` reads head = tokens[:end] only; each value at a position depends on the tokens
up to it (a key first seen after t is in the chunk's tables but counts 0 at t). `commit(head, upto)` folds
tokens[committed_upto:upto] into the persistent tables; the mixers call it for scored targets only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE_KEYS = 1 << 22
MAX_STREAM = 1 << 31  # ids (first positions) and counts are stored in 32 bits
MERGE_RATIO = 4  # a run is merged into the one before it once it holds more than a quarter of its entries


class SortedRuns:
    """Disjoint sorted runs of key → (id, count) for one gram length; a key lives in at most one run."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.ids, *self.counts))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run, index) of each key; run −1 where absent."""
        run = np.full(keys.size, -1, np.int64)
        index = np.zeros(keys.size, np.int64)
        for r, stored in enumerate(self.keys):
            at = np.minimum(np.searchsorted(stored, keys), stored.size - 1)
            hit = stored[at] == keys
            run[hit], index[hit] = r, at[hit]
        return run, index

    def gather(self, field: list[np.ndarray], run: np.ndarray, index: np.ndarray) -> np.ndarray:
        out = np.zeros(run.size, np.int64)
        for r, values in enumerate(field):
            hit = run == r
            out[hit] = values[index[hit]]
        return out

    def add(self, run: np.ndarray, index: np.ndarray, amounts: np.ndarray) -> None:
        for r, counts in enumerate(self.counts):
            hit = run == r
            counts[index[hit]] += amounts[hit].astype(np.int32)  # indices are distinct: no lost updates

    def ranges(self, lo: np.ndarray, span: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every stored key in [lo_i, lo_i + span), per run: (query i, key, count)."""
        parts = []
        for keys, counts in zip(self.keys, self.counts, strict=True):
            query, index = expand(np.searchsorted(keys, lo), np.searchsorted(keys, lo + span))
            parts.append((query, keys[index], counts[index].astype(np.int64)))
        return parts

    def insert(self, keys: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add sorted keys that no run holds; runs stay sorted, each under a quarter of the one before it."""
        if keys.size == 0:
            return
        self.keys.append(keys)
        self.ids.append(ids.astype(np.int32))
        self.counts.append(counts.astype(np.int32))
        while len(self.keys) > 1 and MERGE_RATIO * self.keys[-1].size > self.keys[-2].size:
            taken = np.zeros(self.keys[-1].size + self.keys[-2].size, bool)
            taken[np.searchsorted(self.keys[-2], self.keys[-1]) + np.arange(self.keys[-1].size)] = True
            for field in (self.keys, self.ids, self.counts):
                b, a = field.pop(), field.pop()
                merged = np.empty(taken.size, a.dtype)
                merged[taken], merged[~taken] = b, a
                field.append(merged)


def expand(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges [start_i, stop_i): (i, index) for every index of every range."""
    lengths = np.maximum(stop - start, 0)
    query = np.repeat(np.arange(start.size), lengths)
    offsets = np.cumsum(lengths) - lengths
    return query, np.arange(query.size) - np.repeat(offsets - start, lengths)


@dataclass
class _Length:
    """One gram length over a prepared region: its processed occurrences grouped by key, and their counts."""

    processed: np.ndarray  # local positions (u − committed_upto) of the occurrences that were looked up
    keys: np.ndarray  # distinct keys, sorted
    composite: np.ndarray  # sorted (group << bits) | index into `processed`: each key's occurrences in order
    starts: np.ndarray  # offset of each group in `composite`
    sizes: np.ndarray
    before: np.ndarray  # committed count of each key (primary singletons included)
    ids: np.ndarray  # id of each key's gram
    stored: tuple[np.ndarray, np.ndarray] | None  # sparse lengths: (run, index) in the committed runs


class PrefixCounts:
    """Exact counts of every k-gram, k = 1..max_gram, over committed tokens and one prepared region."""

    def __init__(self, vocab_size: int, max_gram: int) -> None:
        if not 2 <= vocab_size <= 1 << 16:
            raise ValueError(f"vocab_size must be in [2, 65536] (uint16 shards), got {vocab_size}")
        self.vocab = vocab_size
        self.max_gram = max_gram
        self.dense = max(k for k in range(1, max_gram + 1) if vocab_size ** k <= DENSE_KEYS or k == 1)
        self.dense_counts = [np.zeros(vocab_size ** k, np.int64) for k in range(1, self.dense + 1)]
        self.dense_first = [np.zeros(vocab_size ** k, np.int64) for k in range(1, self.dense + 1)]
        self.runs = [SortedRuns() for _ in range(self.dense, max_gram)]
        self.committed_upto = 0
        self.tail = np.stack([np.zeros(max_gram, np.int64), np.full(max_gram, -1, np.int64)])
        self.end = 0  # the prepared region is [committed_upto, end)
        self.inc = self.ids = np.zeros((max_gram, 1), np.int64)  # column j: position committed_upto − 1 + j
        self.lengths: list[_Length] = []
        self._head = np.zeros(0, np.int64)
        self._before: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.dense_counts, *self.dense_first)) + sum(r.nbytes for r in self.runs)

    # -- the prepared region ------------------------------------------------------------------------------------

    def prepare(self, head: np.ndarray, end: int) -> None:
        """Counts and ids of every gram ending in [committed_upto, end), from head = tokens[:end]."""
        if self.lengths and end <= self.end:
            return
        if end >= MAX_STREAM:
            raise ValueError("streams of 2^31 tokens or more are not supported")
        c0, n, V = self.committed_upto, end - self.committed_upto, self.vocab
        region = np.asarray(head[c0:end]).astype(np.int64)
        if n and (region.max() >= V or region.min() < 0):
            raise ValueError(f"token ids must lie in [0, {V}): found {region.min()}..{region.max()}")
        self._head = head
        inc = np.zeros((self.max_gram, n + 1), np.int64)
        ids = np.full((self.max_gram, n + 1), -1, np.int64)
        inc[:, 0], ids[:, 0] = self.tail
        self.lengths = []
        for k in range(1, self.max_gram + 1):
            lo = max(0, k - 1 - c0)  # local positions u − c0 from lo on end a k-gram
            if k <= self.dense:
                processed = np.arange(lo, n)
                keys = _dense_value(head, c0 + processed, k, V)
            else:  # the prefix ends at u − 1, in column u − c0
                # a prefix seen for the first time makes a primary first occurrence: count 1, id u
                inc[k - 1, lo + 1:], ids[k - 1, lo + 1:] = 1, np.arange(c0 + lo, end)
                processed = lo + np.flatnonzero(inc[k - 2, lo:n] >= 2)
                keys = ids[k - 2, processed] * V + region[processed]
            length, group = self._group(k, keys, processed, c0, n)
            rank = np.empty(processed.size, np.int64)
            rank[length.composite & ((1 << _bits(n)) - 1)] = (np.arange(processed.size)
                                                             - np.repeat(length.starts, length.sizes) + 1)
            inc[k - 1, processed + 1] = length.before[group] + rank
            ids[k - 1, processed + 1] = length.ids[group]
            self.lengths.append(length)
        self.inc, self.ids, self.end = inc, ids, end
        self._before: dict[int, tuple[int, np.ndarray]] = {}

    def _group(self, k: int, keys: np.ndarray, processed: np.ndarray, c0: int, n: int
               ) -> tuple[_Length, np.ndarray]:
        bits = _bits(n)
        index = np.arange(processed.size)
        if keys.size and int(keys.max()).bit_length() + bits <= 63:  # one sort of (key, index) pairs
            by_key = np.sort((keys << bits) | index)
            sorted_keys = by_key >> bits
            new_key = np.ones(keys.size, bool)
            new_key[1:] = sorted_keys[1:] != sorted_keys[:-1]
            starts = np.flatnonzero(new_key)
            distinct = sorted_keys[starts]
            group_sorted = np.cumsum(new_key) - 1
            composite = (group_sorted << bits) | (by_key & ((1 << bits) - 1))
            group = np.empty(keys.size, np.int64)
            group[by_key & ((1 << bits) - 1)] = group_sorted
            sizes = np.diff(np.append(starts, keys.size))
        else:
            distinct, group, sizes = np.unique(keys, return_inverse=True, return_counts=True)
            composite = np.sort((group.astype(np.int64) << bits) | index)
            starts = np.cumsum(sizes) - sizes
        first = c0 + processed[composite[starts] & ((1 << bits) - 1)]
        if k <= self.dense:
            before = self.dense_counts[k - 1][distinct]
            ids = np.where(before > 0, self.dense_first[k - 1][distinct], first)
            return _Length(processed, distinct, composite, starts, sizes, before, ids, None), group
        runs = self.runs[k - 1 - self.dense]
        parent = distinct // self.vocab
        run, index = np.full(distinct.size, -1, np.int64), np.zeros(distinct.size, np.int64)
        old = np.flatnonzero(parent < c0)  # a prefix first seen in this region has no committed continuation
        run[old], index[old] = runs.find(distinct[old])
        found = run >= 0
        # its first occurrence p < u − 1, so x[p + 1] is known; it is this gram's first occurrence if it matches
        primary = ~found & (self._head[parent + 1] == distinct % self.vocab)
        before = np.where(found, runs.gather(runs.counts, run, index), primary)
        ids = np.where(found, runs.gather(runs.ids, run, index), np.where(primary, parent + 1, first))
        return _Length(processed, distinct, composite, starts, sizes, before, ids, (run, index)), group

    def context_counts(self, positions: np.ndarray) -> np.ndarray:
        """(W, n) count(ctx_w) at targets t (committed_upto ≤ t < end), w = 1..max_gram − 1."""
        return np.maximum(_columns(self.inc[: self.max_gram - 1], positions - self.committed_upto) - 1, 0)

    def pair_counts(self, positions: np.ndarray) -> np.ndarray:
        """(W, n) count(ctx_w, x_t) at targets t."""
        return np.maximum(_columns(self.inc[1:], positions - self.committed_upto + 1) - 1, 0)

    def rows(self, width: int, positions: np.ndarray
             ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """Continuation counts of ctx_width at targets t whose context occurred before (count(ctx) ≥ 1): an
        optional dense (n, V) block plus (query, token, count) entries to add to it."""
        c0, V, k = self.committed_upto, self.vocab, width + 1
        if not positions.size:
            return None, *(np.zeros(0, np.int64) for _ in range(3))
        column = positions - c0  # the column of position t − 1, and the local bound of positions < t
        parts = []
        if k <= self.dense:  # committed and region counts before the first query, then the queries' own span
            first = int(positions.min())
            handle = _dense_value(self._head, positions - 1, width, V)
            block = self._dense_before(k, first).reshape(-1, V)[handle]
            ends = np.arange(max(first, width), int(positions.max()))
            bits = _bits(ends.size)
            span = np.sort((_dense_value(self._head, ends - 1, width, V) << bits) | (ends - first))
            query, index = expand(np.searchsorted(span, handle << bits),
                                  np.searchsorted(span, (handle << bits) | (positions - first)))
            token = self._head[first + (span[index] & ((1 << bits) - 1))].astype(np.int64)
            return block, query, token, np.ones(query.size, np.int64)
        else:
            handle = self.ids[width - 1, column]
            block = None
            runs = self.runs[k - 1 - self.dense]
            parts += [(query, key % V, count) for query, key, count in runs.ranges(handle * V, V)]
            # the primary continuation x[p + 1] of the context's first occurrence p, unless it is stored
            primary_token = self._head[handle + 1].astype(np.int64)
            stored = np.zeros(positions.size, bool)
            old = np.flatnonzero(handle + 1 < c0)
            stored[old] = runs.find(handle[old] * V + primary_token[old])[0] >= 0
            single = np.flatnonzero(~stored)
            parts.append((single, primary_token[single], np.ones(single.size, np.int64)))
        length = self.lengths[k - 1]
        start, stop = np.searchsorted(length.keys, handle * V), np.searchsorted(length.keys, handle * V + V)
        query, group = expand(start, stop)
        bound = np.searchsorted(length.processed, column[query])  # occurrences ending before t
        seen = np.searchsorted(length.composite, (group << _bits(self.end - c0)) | bound) - length.starts[group]
        parts.append((query, length.keys[group] % V, seen))
        query, token, count = (np.concatenate(column) for column in zip(*parts, strict=False))
        return block, query, token, count

    def _dense_before(self, k: int, before: int) -> np.ndarray:
        """Counts of the direct-addressed k-grams ending before `before`, cached for the batches that follow."""
        start, counts = self._before.get(k, (self.committed_upto, None))
        if counts is None or start > before:
            start, counts = self.committed_upto, self.dense_counts[k - 1].copy()
        ends = np.arange(max(start, k - 1), before)
        if ends.size:
            counts += np.bincount(_dense_value(self._head, ends, k, self.vocab), minlength=counts.size)
        self._before[k] = (before, counts)
        return counts

    # -- committing ---------------------------------------------------------------------------------------------

    def commit(self, head: np.ndarray, upto: int) -> None:
        """Fold the grams ending in [committed_upto, upto) into the tables; head = tokens[:upto]."""
        c0 = self.committed_upto
        if upto <= c0:
            return
        if self.end != upto or not self.lengths:
            self.lengths = []
            self.prepare(head, upto)
        for k, length in enumerate(self.lengths, start=1):
            if k <= self.dense:
                counts, first = self.dense_counts[k - 1], self.dense_first[k - 1]
                first[length.keys] = length.ids
                counts[length.keys] += length.sizes
                continue
            runs = self.runs[k - 1 - self.dense]
            run, index = length.stored
            runs.add(run, index, length.sizes)
            new = run < 0
            runs.insert(length.keys[new], length.ids[new], length.before[new] + length.sizes[new])
        self.tail = np.stack([self.inc[:, upto - c0], self.ids[:, upto - c0]])
        self.committed_upto = self.end = upto
        self.lengths, self._before = [], {}


def _columns(array: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """array[:, columns], as a slice when the columns are consecutive (the engine's batches are)."""
    if columns.size and columns[-1] - columns[0] == columns.size - 1:
        return array[:, columns[0]: columns[-1] + 1]
    return array[:, columns]


def _bits(n: int) -> int:
    """Bits of a local index below n (a composite of two such indices fits 63 bits for n < 2^31)."""
    return max(1, int(n).bit_length())


def _dense_value(x: np.ndarray, end: np.ndarray, k: int, V: int) -> np.ndarray:
    """Base-V value of the k-gram ending at each position of `end` (all ≥ k − 1)."""
    value = np.zeros(end.size, np.int64)
    for i in range(k - 1, -1, -1):
        value = value * V + x[end - i]
    return value
