"""Causal n-gram mixing that is a proper, normalised distribution at every position.

Legality by construction (compliance-rules.md §1, C1–C3):

* C1 — every count used at target position t comes from tokens strictly before t. The streaming counter reads
  the token stream only up to the largest position it is asked about (or told to `prepare`), and the count
  attached to a position is a prefix count (an inclusive occurrence rank), so no later token can change it.
* C2 — counts are exact (keys are the tokens themselves, packed into one or two 64-bit words and compared in
  full on every lookup; hashing only picks the probe start). Hence Σ_v count(ctx, v) = count(ctx) and the
  n-gram term is a distribution over the vocabulary; the mixture with the model's softmax is one too.
  `full_distribution` materialises the whole vector so that probes can check the sum and the x_t independence.
* C3 — the persistent tables hold only tokens that were folded in by `commit`, and `commit` refuses any target
  position whose score this process has not produced (or that the caller has not marked as scored by a peer
  rank). Positions that are already committed cannot be scored again.

Two compliant mixers share the counter:

* `BackoffNgramMixer` ("exact"): the highest order 2..7 whose context was seen at least `min_count` times before
  t, p_ng(v) = count(ctx, v) / count(ctx), mixed as (1 − α)·p_model + α·p_ng with the entropy-adaptive
  α = 0.05 + 0.55·σ(2(H − 4)) of the upstream submission (reference-stack.md §8.1), but over exact counts.
* `SmoothedNgramMixer` ("smoothed"): every order interpolated with the order below it, the chain ending in the
  model distribution (a hierarchical Dirichlet / PPM-style blend), so no order is all-or-nothing; mixed with
  the model by the same α. It scores better than "exact" in bench/ngram.py --quality.

The non-compliant reproduction of the upstream hashed cache lives in `service.engine.ngram_hashed`.

Streaming use (the evaluation engine, chunk by chunk)::

    mixer = make_mixer("exact", vocab_size)
    for chunk in chunks:
        mixer.prepare(tokens, chunk_end)                         # optional: the chunk's counts in one pass
        nll = mixer.mixed_nll(batch_positions, tokens, logits)   # per batch (or `score` with model_statistics)
        ...commit the NLL of the chunk...
        mixer.commit(tokens, chunk_end)                          # fold the scored tokens into the counts

Scoring batch by batch gives the same numbers as one call per chunk. Each call extends the within-chunk
counts to its last position; calling `prepare(tokens, chunk_end)` first does that in one pass, after which
every batch is a cheap gather (many small extensions cost Python overhead per call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from service.engine.options import NGRAM_MODES

MIN_ORDER = 2  # an order-n model predicts from n − 1 context tokens; order 1 (no context) is the model itself
DEFAULT_MAX_ORDER = 7
DEFAULT_MIN_COUNT = 2


class ScoreOrderError(RuntimeError):
    """A request that would let a token influence a score that is not yet fixed (C3), or rescore a position."""


# ----------------------------------------------------------------------------------------------------------------
# Entropy-adaptive mixing weight and the model statistics it needs


@dataclass(frozen=True)
class EntropyAlpha:
    """α(H) = base + span·σ(slope·(H − center)): trust the n-gram more where the model is unsure.

    H is the model's own entropy in nats at the position, so α never looks at the target (reference §8.1).
    """

    base: float = 0.05
    span: float = 0.55
    center: float = 4.0
    slope: float = 2.0

    def __call__(self, entropy: np.ndarray) -> np.ndarray:
        return self.base + self.span / (1.0 + np.exp(-self.slope * (np.asarray(entropy, np.float64) - self.center)))


def model_statistics(model_logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the model's log-probability of the target and the entropy (nats) of its distribution.

    Accepts logits or log-probabilities of shape (n, V) on any device: log_softmax leaves log-probabilities
    unchanged, so re-normalising here makes the caller's choice irrelevant. Computed in float32 at least
    (float64 input stays float64). These two numbers are all a mixer needs on the scoring path, which keeps
    (n, V) tensors off the CPU.
    """
    logp = torch.log_softmax(model_logprobs.to(torch.promote_types(model_logprobs.dtype, torch.float32)), dim=-1)
    target_logprob = logp.gather(-1, targets.to(logp.device, torch.long).reshape(-1, 1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return target_logprob, entropy


# ----------------------------------------------------------------------------------------------------------------
# Exact gram keys


class GramPacking:
    """Packs a k-gram into a (k·b)-bit integer exactly, b = ceil(log2 V) bits per token, split into uint64 words.

    Token i places back from the gram's last token (i = 0 is the last) occupies bits [i·b, (i + 1)·b); bits
    0–63 are the word `lo` and bits 64–127 the word `hi` (None while k·b ≤ 64). Shard tokens are uint16, so
    b ≤ 16 and 7-grams need at most 112 bits. For sp1024 (b = 10) grams of up to 6 tokens fit one word.
    """

    def __init__(self, vocab_size: int, max_gram: int) -> None:
        if not 2 <= vocab_size <= 1 << 16:
            raise ValueError(f"vocab_size must be in [2, 65536] (uint16 shards), got {vocab_size}")
        self.vocab_size = vocab_size
        self.bits = max(1, (vocab_size - 1).bit_length())
        if max_gram * self.bits > 128:
            raise ValueError(f"{max_gram}-grams do not fit 128 bits at {self.bits} bits per token")
        self.max_gram = max_gram

    def key_bits(self, k: int) -> int:
        return k * self.bits

    def iter_keys(self, columns: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Keys of the 1-, 2-, …, len(columns)-grams whose token i places from the end is columns[i].

        Built incrementally (one shift-or per length), so the keys of every length cost about as much as
        those of the longest.
        """
        keys: list[tuple[np.ndarray, np.ndarray | None]] = []
        lo = np.zeros(np.broadcast(*columns).shape, np.uint64)
        hi: np.ndarray | None = None
        for i, column in enumerate(columns):
            token = np.asarray(column).astype(np.uint64)
            offset = i * self.bits
            if offset < 64:
                lo = lo | (token << np.uint64(offset))  # bits past 64 drop off here and go to `hi` below
            if offset + self.bits > 64:
                part = token << np.uint64(offset - 64) if offset >= 64 else token >> np.uint64(64 - offset)
                hi = part if hi is None else hi | part
            keys.append((lo, hi))
        return keys


_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd: multiplication by it is a bijection
_SECOND_WORD = np.uint64(0xC2B2AE3D27D4EB4F)


def _probe_hash(lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray:
    """Fibonacci (multiply-shift) hash; its top bits pick the home slot. It only chooses where probing starts
    and in which order keys are processed; equality is always decided on the full key."""
    z = lo if hi is None else lo ^ (hi * _SECOND_WORD)
    return z * _FIBONACCI


_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
MAX_STREAM = 1 << 32  # positions and counts are stored in 32-bit fields
PROBE_WINDOW = 8  # slots read per round by keys that do not stop at their first probe


@dataclass
class Lookup:
    """Per key: its slot (or the free slot ending its probe run), stored count (0 = absent) and, for tables
    that keep one, the recorded first position (meaningful where the count is positive)."""

    slot: np.ndarray
    count: np.ndarray
    first: np.ndarray | None


class ExactCountTable:
    """Open-addressing (linear probing) map from an exact gram key to a count (and a first position).

    * Exact: a lookup compares the stored key with the query in full, so distinct grams never share a count.
      A slot is free while its count is 0 (a stored key always has count ≥ 1; nothing is deleted).
    * One memory access per probe and per write: a slot is one 16-byte row [lo, side << 32 | count] whenever
      one 32-bit side field suffices (the key's upper word for 65–96-bit keys, or the first position for keys
      of at most 64 bits), else a 32-byte row [lo, hi, first << 32 | count, 0]. Rows are read with np.take
      and written whole through a byte-record view (numpy's 2-D fancy indexing takes a generic path over ten
      times slower, and writing columns one at a time costs a cache miss per column).
    * Ordered probing: the home slot is ⌊(top 32 bits of the hash) · capacity / 2^32⌋, monotone in the hash,
      so keys sorted by hash (as the grouping step delivers them) visit the table in address order, and new
      keys that compete for the same free slot are neighbours in that order, which settles every claim
      without extra memory traffic. Any capacity works, so the table grows to exactly 4× its size.
    * The load factor stays at or below one half so probe runs stay short.
    """

    def __init__(self, key_bits: int, keeps_first: bool, capacity: int = 1 << 12) -> None:
        self.two_words = key_bits > 64
        self.keeps_first = keeps_first
        self._wide = key_bits > 96 or (self.two_words and keeps_first)
        self._width = 4 if self._wide else 2  # power-of-two rows: numpy's fast record copy
        self._allocate(max(64, capacity))
        self.size = 0

    def _allocate(self, capacity: int) -> None:
        if capacity >= MAX_STREAM:
            raise ValueError("count tables hold fewer than 2^30 keys")
        self.capacity = capacity
        self._rows = np.zeros((capacity, self._width), np.uint64)
        self._flat = self._rows.reshape(-1)
        self._records = self._rows.view(np.dtype((np.void, 8 * self._width))).reshape(-1)

    def _home(self, h: np.ndarray) -> np.ndarray:
        return ((h >> _U32) * np.uint64(self.capacity) >> _U32).astype(np.intp)

    def _next(self, slots: np.ndarray) -> np.ndarray:
        following = slots + 1
        following[following == self.capacity] = 0
        return following

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(lo, hi, count, first) columns of gathered rows; hi / first are None where the table has none."""
        if self._wide:
            packed = rows[:, 2]
            return rows[:, 0], rows[:, 1], packed & _LOW32, packed >> _U32 if self.keeps_first else None
        side, count = rows[:, 1] >> _U32, rows[:, 1] & _LOW32
        if self.two_words:
            return rows[:, 0], side, count, None
        return rows[:, 0], None, count, side if self.keeps_first else None

    def _count_at(self, slots: np.ndarray) -> np.ndarray:
        if self._wide:
            return self._flat[slots * 4 + 2] & _LOW32
        return self._flat[slots * 2 + 1] & _LOW32

    def _gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        return self._split(np.take(self._rows, slots, axis=0))

    def lookup(self, lo: np.ndarray, hi: np.ndarray | None, h: np.ndarray) -> Lookup:
        """Find each key. An empty row holds key 0 and count 0, so a query for key 0 "matching" it reads count
        0 at the end of its probe run: the answer for an absent key, no special case needed."""
        slot = self._home(h)
        row_lo, row_hi, count, first = self._gather(slot)
        match = row_lo == lo
        if hi is not None:
            match &= row_hi == hi
        counts = np.where(match, count, np.uint64(0)).view(np.int64)
        firsts = None if first is None else first.view(np.int64).copy()
        todo = np.flatnonzero(~match & (count != 0))
        while todo.size:  # keys whose home slot holds another key scan on, PROBE_WINDOW slots at a time
            window = (slot[todo][:, None] + np.arange(1, PROBE_WINDOW + 1)) % self.capacity
            row_lo, row_hi, count, first = (None if c is None else c.reshape(window.shape)
                                            for c in self._gather(window.reshape(-1)))
            match = row_lo == lo[todo][:, None]
            if hi is not None:
                match &= row_hi == hi[todo][:, None]
            stop = match | (count == 0)  # no key lies past a free slot of its probe run
            ended = stop.any(axis=1)
            row, at = np.arange(todo.size), np.argmax(stop, axis=1)
            slot[todo] = np.where(ended, window[row, at], window[:, -1])
            hit = ended & match[row, at]
            counts[todo[hit]] = count[row, at][hit].view(np.int64)
            if firsts is not None:
                firsts[todo[hit]] = first[row, at][hit].view(np.int64)
            todo = todo[~ended]
        return Lookup(slot, counts, firsts)

    def add(self, lo: np.ndarray, hi: np.ndarray | None, h: np.ndarray, amounts: np.ndarray,
            firsts: np.ndarray | None = None, looked_up: Lookup | None = None) -> None:
        """Add `amounts` to the counts of distinct keys, inserting the absent ones with first position `firsts`.

        `looked_up` may carry the result of `lookup` for these keys if nothing was inserted since. A present
        key's row is rewritten in place with its new count (its first position stays); an absent key goes to
        the free slot where its probe run ended, unless an earlier key (in slot order) took that slot, in
        which case it probes on.
        """
        found = looked_up if looked_up is not None else self.lookup(lo, hi, h)
        if self.keeps_first:
            assert firsts is not None
            firsts = np.where(found.count > 0, found.first, firsts)
        counts = found.count + amounts
        absent = np.flatnonzero(found.count == 0)
        if 2 * (self.size + absent.size) > self.capacity:
            present = np.flatnonzero(found.count)
            self._write_rows(found.slot[present], lo[present], _take(hi, present), counts[present],
                             _take(firsts, present))
            self._rebuild(lo[absent], _take(hi, absent), counts[absent], _take(firsts, absent))
            return
        end_slots = found.slot[absent]
        if end_slots.size > 1 and np.any(end_slots[1:] < end_slots[:-1]):  # a probe run wrapped around
            reorder = np.argsort(end_slots, kind="stable")
            absent, end_slots = absent[reorder], end_slots[reorder]
        waiting = absent[1:][end_slots[1:] == end_slots[:-1]]
        if waiting.size == 0:
            self._write_rows(found.slot, lo, hi, counts, firsts)
        else:
            writes = np.ones(counts.size, bool)
            writes[waiting] = False
            self._write_rows(found.slot[writes], lo[writes], _take(hi, writes), counts[writes], _take(firsts, writes))
            self._insert_absent(lo[waiting], _take(hi, waiting), found.slot[waiting], counts[waiting],
                                _take(firsts, waiting))
        self.size += absent.size - waiting.size

    def _write_rows(self, slots: np.ndarray, lo: np.ndarray, hi: np.ndarray | None, counts: np.ndarray,
                    firsts: np.ndarray | None) -> None:
        rows = np.zeros((slots.size, self._width), np.uint64)
        rows[:, 0] = lo
        packed = counts.astype(np.uint64)
        if firsts is not None:
            packed |= firsts.astype(np.uint64) << _U32
        if self._wide:
            rows[:, 1] = hi if hi is not None else 0
            rows[:, 2] = packed
        else:
            rows[:, 1] = packed if hi is None else packed | (hi << _U32)
        self._records[slots] = rows.view(self._records.dtype).reshape(-1)

    def _insert_absent(self, lo: np.ndarray, hi: np.ndarray | None, slot: np.ndarray, counts: np.ndarray,
                       firsts: np.ndarray | None) -> None:
        """Place distinct absent keys, each probing on from `slot` (a slot of its probe run, e.g. its home).

        Keys are kept in slot order: keys that reach the same free slot are then adjacent and the first one
        takes it. Probe runs that wrap past the last slot break the order; the round re-sorts then.
        """
        slot = slot.copy()
        todo = np.arange(lo.shape[0])
        while todo.size:
            s = slot[todo]
            if s.size > 1 and np.any(s[1:] < s[:-1]):
                reorder = np.argsort(s, kind="stable")
                todo, s = todo[reorder], s[reorder]
            window = (s[:, None] + np.arange(PROBE_WINDOW)) % self.capacity
            free = (self._count_at(window.reshape(-1)) == 0).reshape(window.shape)
            has_free = free.any(axis=1)
            candidate = window[np.arange(s.size), np.argmax(free, axis=1)]
            claimants = np.flatnonzero(has_free)
            wanted = candidate[claimants]
            takes = np.ones(claimants.size, bool)
            takes[1:] = wanted[1:] != wanted[:-1]  # same free slot: the first in slot order takes it
            winners = todo[claimants[takes]]
            self._write_rows(wanted[takes], lo[winners], _take(hi, winners), counts[winners], _take(firsts, winners))
            # the rest go on: after the slot just taken, or past a window with no free slot
            following = np.where(has_free, candidate + 1, window[:, -1] + 1) % self.capacity
            placed = np.zeros(s.size, bool)
            placed[claimants[takes]] = True
            todo = todo[~placed]
            slot[todo] = following[~placed]
        self.size += lo.shape[0]

    def _rebuild(self, new_lo: np.ndarray, new_hi: np.ndarray | None, new_counts: np.ndarray,
                 new_firsts: np.ndarray | None) -> None:
        """Grow to 4× the size with the new keys in: sorted by home slot, each key goes to
        max(home, previous + 1), which is where inserting them one by one in that order would put them."""
        lo, hi, counts, firsts = self.items()
        lo, counts = np.concatenate([lo, new_lo]), np.concatenate([counts, new_counts])
        hi = None if hi is None or new_hi is None else np.concatenate([hi, new_hi])
        firsts = None if firsts is None or new_firsts is None else np.concatenate([firsts, new_firsts])
        self._allocate(4 * counts.size)
        self.size = counts.size
        home = self._home(_probe_hash(lo, hi))
        index_bits = max(1, (counts.size - 1).bit_length())
        by_home = np.sort((home.astype(np.uint64) << np.uint64(index_bits)) | np.arange(counts.size, dtype=np.uint64))
        order = (by_home & np.uint64((1 << index_bits) - 1)).astype(np.intp)
        lo, hi, counts, firsts, home = lo[order], _take(hi, order), counts[order], _take(firsts, order), home[order]
        index = np.arange(home.size)
        placed = index + np.maximum.accumulate(home - index)
        fits = placed < self.capacity
        self._write_rows(placed[fits], lo[fits], _take(hi, fits), counts[fits], _take(firsts, fits))
        if not fits.all():  # the last run spills past the end: it continues at slot 0, as probing does
            spill = np.flatnonzero(~fits)
            self.size -= spill.size
            self._insert_absent(lo[spill], _take(hi, spill), np.zeros(spill.size, np.intp), counts[spill],
                                _take(firsts, spill))

    def items(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(lo, hi, count, first) of every stored key."""
        lo, hi, counts, firsts = self._gather(np.flatnonzero(self._split(self._rows)[2]))
        return (lo.copy(), None if hi is None else hi.copy(), counts.view(np.int64).copy(),
                None if firsts is None else firsts.view(np.int64).copy())


def _take(values: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[index]


class DenseCountTable:
    """Direct-address counts (and first positions) for grams short enough to index an array (≤ 2^22 keys)."""

    two_words = False

    def __init__(self, key_space: int, keeps_first: bool) -> None:
        self.keeps_first = keeps_first
        self._counts = np.zeros(key_space, np.int64)
        self._firsts = np.zeros(key_space, np.int64) if keeps_first else None

    def lookup(self, lo: np.ndarray, hi: np.ndarray | None, h: np.ndarray | None) -> Lookup:
        slot = lo.astype(np.intp)
        return Lookup(slot, self._counts[slot], None if self._firsts is None else self._firsts[slot])

    def add(self, lo: np.ndarray, hi: np.ndarray | None, h: np.ndarray | None, amounts: np.ndarray,
            firsts: np.ndarray | None = None, looked_up: Lookup | None = None) -> None:
        slot = lo.astype(np.intp)  # keys are distinct, so no index repeats
        if self._firsts is not None:
            self._firsts[slot] = np.where(self._counts[slot] > 0, self._firsts[slot], firsts)
        self._counts[slot] += amounts

    def items(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        occupied = np.flatnonzero(self._counts)
        return (occupied.astype(np.uint64), None, self._counts[occupied],
                None if self._firsts is None else self._firsts[occupied])


DENSE_KEY_BITS = 22

CountTable = ExactCountTable | DenseCountTable


def new_count_table(packing: GramPacking, k: int, keeps_first: bool, expected: int = 1 << 12) -> CountTable:
    if packing.key_bits(k) <= DENSE_KEY_BITS:
        return DenseCountTable(1 << packing.key_bits(k), keeps_first)
    return ExactCountTable(packing.key_bits(k), keeps_first, 2 * expected)


@dataclass
class _Groups:
    """Equal keys of a segment gathered, in sorted order: element order, group start offsets, group sizes."""

    order: np.ndarray  # element indices, grouped, each group in position order
    starts: np.ndarray  # offset in `order` where each group begins
    sizes: np.ndarray

    @property
    def first(self) -> np.ndarray:
        """Element index of each group's first occurrence."""
        return self.order[self.starts]

    def spread(self, per_group: np.ndarray) -> np.ndarray:
        """Per element, the value of its group."""
        out = np.empty(self.order.size, per_group.dtype)
        out[self.order] = np.repeat(per_group, self.sizes)
        return out

    def inclusive_ranks(self, before: np.ndarray) -> np.ndarray:
        """Per element: before[its group] + its 1-based rank in position order inside the group."""
        n = self.order.size
        out = np.empty(n, np.int64)
        out[self.order] = np.repeat(before - self.starts + 1, self.sizes) + np.arange(n)
        return out


def _group_keys(lo: np.ndarray, hi: np.ndarray | None, h: np.ndarray | None, key_bits: int) -> _Groups:
    """Group equal keys exactly, keeping position order inside each group, with one sort.

    The sort key is (grouping value, element index) packed in 64 bits. With a probe hash `h` (keys bound for
    an `ExactCountTable`) the grouping value is the hash with its low bits replaced by the index: groups come
    out in hash order, which the table's ordered probing wants, and equal truncated hashes of different keys
    are caught by comparing neighbouring keys, in which case an exact lexicographic sort takes over. Without
    one (direct-address keys, which fit beside the index) the key itself is the grouping value.
    """
    n = lo.shape[0]
    index_bits = max(1, (n - 1).bit_length())
    index = np.arange(n, dtype=np.uint64)
    exact = h is None
    if exact and (hi is not None or key_bits + index_bits > 64):
        raise ValueError("keys without a probe hash must fit in one word beside the element index")
    if exact:
        composite = (lo << np.uint64(index_bits)) | index
    else:
        composite = (h & ~np.uint64((1 << index_bits) - 1)) | index
    composite.sort()
    order = (composite & np.uint64((1 << index_bits) - 1)).astype(np.intp)
    run_key = composite >> np.uint64(index_bits)
    starts_group = np.ones(n, bool)
    starts_group[1:] = run_key[1:] != run_key[:-1]
    if not exact:
        lo_sorted = lo[order]
        differs = lo_sorted[1:] != lo_sorted[:-1]
        if hi is not None:
            hi_sorted = hi[order]
            differs |= hi_sorted[1:] != hi_sorted[:-1]
        if np.any(differs & ~starts_group[1:]):  # two keys share a truncated hash: group them exactly
            order = np.lexsort((index, lo) if hi is None else (index, lo, hi))
            lo_sorted = lo[order]
            starts_group[1:] = lo_sorted[1:] != lo_sorted[:-1]
            if hi is not None:
                hi_sorted = hi[order]
                starts_group[1:] |= hi_sorted[1:] != hi_sorted[:-1]
    starts = np.flatnonzero(starts_group)
    return _Groups(order, starts, np.diff(np.append(starts, n)))


# ----------------------------------------------------------------------------------------------------------------
# Streaming causal counts


def as_token_array(tokens: np.ndarray | torch.Tensor, end: int) -> np.ndarray:
    """tokens[:end] as a numpy array: nothing at or after `end` is ever copied or read."""
    if end > len(tokens):
        raise ValueError(f"position {end - 1} is outside the token stream of length {len(tokens)}")
    head = tokens[:end]
    if isinstance(head, torch.Tensor):
        head = head.detach().cpu().numpy()
    return np.asarray(head)


@dataclass
class _SegmentGroup:
    """One gram length of a chunk computed in one segment: what its commit needs, looked up already."""

    lo: np.ndarray
    hi: np.ndarray | None
    h: np.ndarray | None
    sizes: np.ndarray
    firsts: np.ndarray | None
    found: Lookup


class CausalGramCounter:
    """For every position u, the inclusive occurrence count inc_k(u) of each k-gram ending at u (k = 1..K).

    inc_k(u) = #{e ≤ u : x[e−k+1..e] = x[u−k+1..u]} (0 while u < k − 1). For a target position t and context
    width w, the context count is inc_w(t − 1) − 1 (earlier occurrences of the context that were followed by a
    token before t) and the pair count is inc_{w+1}(t) − 1 (earlier occurrences of context + x_t).

    Lean exact storage. An occurrence of a k-gram G at u is *stored* (counted in table k) only when its
    (k−1)-suffix S = x[u−k+2..u] occurred before u. Every occurrence of G except possibly one is of that kind:
    the exception is an occurrence at the very first occurrence of S, at position F(S). So

        count(G) = stored(G) + [x[F(S) − k + 1] = first token of G],

    and F is known exactly: each stored gram keeps its first position, and a gram first seen where its own
    suffix was new has the suffix's first position. Most long grams occur once, right where their suffix is
    new, and then cost no table work at all: the high-order tables hold a fraction of the positions.

    State: `committed` tables hold the grams of tokens[:committed_upto]; the pending region
    [committed_upto, computed_upto) has per-position counts and first positions cached, computed from the
    committed tables plus the earlier positions of the region; `commit` folds a prefix of the region into the
    tables. Cache column j holds position committed_upto − 1 + j: column 0 is the last committed position,
    which the first pending target needs as its context.
    """

    def __init__(self, vocab_size: int, max_gram: int) -> None:
        self.packing = GramPacking(vocab_size, max_gram)
        self.vocab_size = vocab_size
        self.max_gram = max_gram
        self.committed = [new_count_table(self.packing, k, keeps_first=k < max_gram)
                          for k in range(1, max_gram + 1)]
        self.committed_upto = 0
        self.computed_upto = 0
        self._inc = np.zeros((max_gram, 1 << 12), np.int64)
        self._first = np.zeros((max_gram - 1, 1 << 12), np.int64)  # F_k(u), k = 1..K−1
        # grams of the pending region, once it was computed in two or more segments
        self._pending: list[CountTable] | None = None
        self._single_segment: list[_SegmentGroup] | None = None

    # -- keys of a stretch of the stream ------------------------------------------------------------------------

    def _stretch_keys(self, head: np.ndarray, start: int, end: int) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
        """Per gram length k: (index of the first position ≥ k − 1, keys of the grams ending at start..end−1)."""
        context = self.max_gram - 1
        if start >= context:
            window = head[start - context:end]
        else:  # the stream's first positions: pad in front; grams reaching into the pad are dropped below
            window = np.concatenate([np.zeros(context - start, head.dtype), head[:end]])
        if window.size and (int(window.max()) >= self.vocab_size or int(window.min()) < 0):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}): found {int(window.min())}.."
                             f"{int(window.max())}")
        n = end - start
        columns = [window[context - i: context - i + n] for i in range(self.max_gram)]
        keys = []
        for k, (lo, hi) in enumerate(self.packing.iter_keys(columns), start=1):
            valid_from = min(n, max(0, k - 1 - start))
            keys.append((valid_from, lo[valid_from:], None if hi is None else hi[valid_from:]))
        return keys

    def _hash(self, k: int, lo: np.ndarray, hi: np.ndarray | None) -> np.ndarray | None:
        """Probe hashes for gram length k; direct-address tables need none."""
        return None if isinstance(self.committed[k - 1], DenseCountTable) else _probe_hash(lo, hi)

    @staticmethod
    def _stored_positions(valid_from: int, n: int, suffix_inc: np.ndarray | None) -> np.ndarray:
        """Indices (into a stretch of n positions) of the stored k-gram occurrences: those whose (k−1)-suffix
        occurred before (inc_{k−1} ≥ 2); every unigram occurrence is stored (suffix_inc None)."""
        if suffix_inc is None:
            return np.arange(valid_from, n)
        return valid_from + np.flatnonzero(suffix_inc[valid_from:] >= 2)

    # -- extending the pending region ---------------------------------------------------------------------------

    def ensure_computed(self, head: np.ndarray, end: int) -> None:
        """Compute inclusive counts for positions up to end − 1, reading only head = tokens[:end]."""
        start = self.computed_upto
        if end <= start:
            return
        if end >= MAX_STREAM:
            raise ValueError("streams of 2^32 tokens or more are not supported")
        if start > self.committed_upto and self._pending is None:
            self._pending = self._pending_tables(head)
            self._single_segment = None
        first_segment = start == self.committed_upto
        record: list[_SegmentGroup] = []
        inc, first = self._cache_columns(start, end)
        n = end - start
        positions = np.arange(start, end)
        for k, (valid_from, lo, hi) in enumerate(self._stretch_keys(head, start, end), start=1):
            inc_k = inc[k - 1]
            inc_k[:valid_from] = 0
            inc_k[valid_from:] = 1  # a new gram unless stored below
            keeps_first = k < self.max_gram
            if keeps_first:
                first[k - 1] = positions
            stored = self._stored_positions(valid_from, n, inc[k - 2] if k > 1 else None)
            lo, hi = lo[stored - valid_from], _take(hi, stored - valid_from)
            h = self._hash(k, lo, hi)
            groups = _group_keys(lo, hi, h, self.packing.key_bits(k))
            lead = groups.first
            ulo, uhi, uh = lo[lead], _take(hi, lead), _take(h, lead)
            found = self.committed[k - 1].lookup(ulo, uhi, uh)
            before = found.count
            # first position of each gram: committed record, else pending record, else this segment
            firsts = positions[stored[lead]]
            if keeps_first:
                firsts = np.where(found.count > 0, found.first, firsts)
            if self._pending is not None:
                pending = self._pending[k - 1]
                pending_found = pending.lookup(ulo, uhi, uh)
                if keeps_first:
                    firsts = np.where((found.count == 0) & (pending_found.count > 0), pending_found.first, firsts)
                before = before + pending_found.count
            if k > 1:  # the one occurrence that is never stored: at the suffix's first position
                suffix_first = first[k - 2][stored[lead]]
                at = suffix_first - (k - 1)
                unstored = (at >= 0) & (head[np.maximum(at, 0)] == head[positions[stored[lead]] - (k - 1)])
                before = before + unstored
                if keeps_first:
                    firsts = np.where(unstored, suffix_first, firsts)
            if self._pending is not None:
                self._pending[k - 1].add(ulo, uhi, uh, groups.sizes, firsts if keeps_first else None,
                                         pending_found)
            inc_k[stored] = groups.inclusive_ranks(before)
            if keeps_first:
                first[k - 1][stored] = groups.spread(firsts)
            if first_segment:
                record.append(_SegmentGroup(ulo, uhi, uh, groups.sizes, firsts if keeps_first else None, found))
        self._single_segment = record if first_segment else None
        self.computed_upto = end

    def _cache_columns(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The (inc, first) cache columns of positions start..end−1 (views), growing the buffers when needed."""
        first_col, last_col = start - self.committed_upto + 1, end - self.committed_upto + 1
        if last_col > self._inc.shape[1]:
            width = max(last_col, 2 * self._inc.shape[1])
            for name in ("_inc", "_first"):
                old = getattr(self, name)
                grown = np.zeros((old.shape[0], width), np.int64)
                grown[:, :first_col] = old[:, :first_col]
                setattr(self, name, grown)
        return self._inc[:, first_col:last_col], self._first[:, first_col:last_col]

    def _stored_grams(self, head: np.ndarray, start: int, end: int
                      ) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray | None]]:
        """Per gram length: (lo, hi, hash, occurrences, first position) of the distinct grams stored for the
        positions start..end−1 of the pending region, from its cached counts."""
        inc, first = self._cache_columns(start, end)
        grams = []
        for k, (valid_from, lo, hi) in enumerate(self._stretch_keys(head, start, end), start=1):
            stored = self._stored_positions(valid_from, end - start, inc[k - 2] if k > 1 else None)
            lo, hi = lo[stored - valid_from], _take(hi, stored - valid_from)
            h = self._hash(k, lo, hi)
            groups = _group_keys(lo, hi, h, self.packing.key_bits(k))
            lead = groups.first
            firsts = first[k - 1][stored[lead]] if k < self.max_gram else None
            grams.append((lo[lead], _take(hi, lead), _take(h, lead), groups.sizes, firsts))
        return grams

    def _pending_tables(self, head: np.ndarray) -> list[CountTable]:
        """Tables of the stored occurrences in the pending region, rebuilt from its cached counts."""
        start, end = self.committed_upto, self.computed_upto
        tables = []
        for k, (lo, hi, h, sizes, firsts) in enumerate(self._stored_grams(head, start, end), start=1):
            table = new_count_table(self.packing, k, k < self.max_gram, end - start)
            table.add(lo, hi, h, sizes, firsts)
            tables.append(table)
        return tables

    def count_columns(self, start: int, end: int) -> np.ndarray:
        """(max_gram, end − start) inclusive counts of positions start..end−1, committed_upto − 1 ≤ start."""
        if start < self.committed_upto - 1 or end > self.computed_upto:
            raise ValueError(f"positions {start}..{end - 1} are outside the cached region "
                             f"{self.committed_upto - 1}..{self.computed_upto - 1}")
        return self._inc[:, start - self.committed_upto + 1: end - self.committed_upto + 1]

    def inclusive_counts(self, positions: np.ndarray) -> np.ndarray:
        """(max_gram, n) inclusive counts at positions in [committed_upto − 1, computed_upto)."""
        if positions.size == 0:
            return np.zeros((self.max_gram, 0), np.int64)
        if positions.size == positions[-1] - positions[0] + 1 and np.all(positions[1:] > positions[:-1]):
            return self.count_columns(int(positions[0]), int(positions[-1]) + 1)
        self.count_columns(int(positions.min()), int(positions.max()) + 1)  # bounds check
        return self._inc[:, positions - self.committed_upto + 1]

    # -- committing ----------------------------------------------------------------------------------------------

    def commit(self, head: np.ndarray, upto: int) -> None:
        """Fold the grams of tokens[committed_upto:upto] into the committed tables; head = tokens[:upto]."""
        if upto <= self.committed_upto:
            return
        self.ensure_computed(head, upto)
        if upto == self.computed_upto and self._single_segment is not None:  # looked up already
            for table, group in zip(self.committed, self._single_segment, strict=True):
                table.add(group.lo, group.hi, group.h, group.sizes, group.firsts, group.found)
        elif upto == self.computed_upto and self._pending is not None:
            for k, (table, pending) in enumerate(zip(self.committed, self._pending, strict=True), start=1):
                lo, hi, counts, firsts = pending.items()
                table.add(lo, hi, self._hash(k, lo, hi), counts, firsts)
        else:  # a prefix of the pending region, or a region whose pending tables were dropped
            for table, (lo, hi, h, sizes, firsts) in zip(
                    self.committed, self._stored_grams(head, self.committed_upto, upto), strict=True):
                table.add(lo, hi, h, sizes, firsts)
        kept, shift = self.computed_upto - upto + 1, upto - self.committed_upto  # positions upto − 1 onwards
        for buffer in (self._inc, self._first):
            buffer[:, :kept] = buffer[:, shift: shift + kept]
        self._pending = None  # the rest of the region (if any) rebuilds its own from the cache when needed
        self._single_segment = None
        self.committed_upto = upto

    # -- the counts for every candidate token (probes) -----------------------------------------------------------

    def candidate_pair_counts(self, head: np.ndarray, t: int, width: int) -> np.ndarray:
        """(V,) counts of context x[t−width..t−1] followed by each v, over tokens before t; head = tokens[:t].

        Committed part: for every candidate v, the grams S_j(v) = (x[t−j+1..t−1], v) for j = 1..width+1 are
        counted bottom-up with the same stored + unstored rule as the stream (their first positions carried
        along). Pending part: direct comparison over the pending region.
        """
        if t < width:
            return np.zeros(self.vocab_size, np.int64)
        candidates = np.arange(self.vocab_size)
        keys = self.packing.iter_keys([candidates, *[head[t - i] for i in range(1, width + 1)]])
        counts = firsts = np.zeros(self.vocab_size, np.int64)
        for j in range(1, width + 2):
            lo, hi = keys[j - 1]
            lo = np.broadcast_to(lo, candidates.shape).copy()
            hi = None if hi is None else np.broadcast_to(hi, candidates.shape).copy()
            found = self.committed[j - 1].lookup(lo, hi, self._hash(j, lo, hi))
            if j == 1:
                counts, firsts = found.count, found.first
                continue
            at = firsts - (j - 1)
            unstored = (counts > 0) & (at >= 0) & (head[np.clip(at, 0, max(t - 1, 0))] == head[t - j + 1])
            counts = found.count + unstored
            if j <= width:
                firsts = np.where(unstored, firsts, found.first)
        ends = np.arange(max(self.committed_upto, width), t)
        match = np.ones(ends.size, bool)
        for i in range(1, width + 1):
            match &= head[ends - i] == head[t - i]
        return counts + np.bincount(head[ends[match]].astype(np.intp), minlength=self.vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# The scored-positions ledger shared by every mixer


class ScoreLedger:
    """Target positions at or after `start` that have a score; commit needs every one of them."""

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
            grown = np.zeros(max(need, 2 * self._scored.size), bool)
            grown[: self._scored.size] = self._scored
            self._scored = grown
        self._scored[positions - self.start] = True

    def require_scored(self, upto: int) -> None:
        first_target = max(self.start, 1)
        if upto <= first_target:
            return
        have = np.zeros(upto - first_target, bool)
        known = self._scored[first_target - self.start: upto - self.start]
        have[: known.size] = known
        if not have.all():
            missing = first_target + int(np.argmin(have))
            raise ScoreOrderError(f"refusing to commit tokens up to {upto}: position {missing} has no committed "
                                  "score yet (score before update)")

    def advance(self, upto: int) -> None:
        self._scored = self._scored[upto - self.start:].copy()
        self.start = upto


def _positions_array(positions: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    return np.asarray(positions, np.int64).reshape(-1)


def _float_array(values: np.ndarray | torch.Tensor, n: int, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(values, np.float64).reshape(-1)
    if out.shape[0] != n:
        raise ValueError(f"{name} has {out.shape[0]} entries for {n} positions")
    return out


class NgramMixer(Protocol):
    """What the evaluation engine relies on; every mode implements it."""

    mode: str
    compliant: bool

    @property
    def committed_upto(self) -> int: ...

    def score(self, positions: np.ndarray, tokens: np.ndarray | torch.Tensor, model_target_logprob: np.ndarray,
              model_entropy: np.ndarray) -> np.ndarray: ...

    def mixed_nll(self, positions: np.ndarray, tokens: np.ndarray | torch.Tensor,
                  model_logprobs: torch.Tensor) -> torch.Tensor: ...

    def full_distribution(self, position: int, tokens: np.ndarray | torch.Tensor,
                          model_logprobs: torch.Tensor) -> torch.Tensor: ...

    def mark_scored(self, start: int, end: int) -> None: ...

    def commit(self, tokens: np.ndarray | torch.Tensor, upto: int) -> None: ...

    def prepare(self, tokens: np.ndarray | torch.Tensor, end: int) -> None: ...


class StreamingMixerBase:
    """Shared plumbing: argument conversion, the score ledger, and the score-before-update checks."""

    mode = ""
    compliant = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.ledger = ScoreLedger()

    @property
    def committed_upto(self) -> int:
        return self.ledger.start

    def score(self, positions: np.ndarray | torch.Tensor, tokens: np.ndarray | torch.Tensor,
              model_target_logprob: np.ndarray | torch.Tensor,
              model_entropy: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mixed NLL (nats, float64) of the targets at `positions`, all at or after committed_upto.

        Reads tokens[:max(positions) + 1] only; the value at t depends on tokens before t and on x_t's own
        entry of the mixed distribution.
        """
        pos = _positions_array(positions)
        if pos.size == 0:
            return np.zeros(0, np.float64)
        if pos.min() < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {int(pos.min())} is already committed (or is not a target): "
                                  "a committed position cannot be scored again")
        head = as_token_array(tokens, int(pos.max()) + 1)
        target_lp = _float_array(model_target_logprob, pos.size, "model_target_logprob")
        entropy = _float_array(model_entropy, pos.size, "model_entropy")
        nll = self._score(pos, head, target_lp, entropy)
        self.ledger.mark(pos)
        return nll

    def mixed_nll(self, positions: np.ndarray | torch.Tensor, tokens: np.ndarray | torch.Tensor,
                  model_logprobs: torch.Tensor) -> torch.Tensor:
        """`score` from (n, V) model logits or log-probabilities; float64 NLL on their device."""
        pos = _positions_array(positions)
        head = as_token_array(tokens, int(pos.max()) + 1 if pos.size else 0)
        targets = torch.as_tensor(head[pos].astype(np.int64))
        target_lp, entropy = model_statistics(model_logprobs, targets)
        nll = self.score(pos, head, target_lp, entropy)
        return torch.from_numpy(nll).to(model_logprobs.device)

    def prepare(self, tokens: np.ndarray | torch.Tensor, end: int) -> None:
        """Compute the counts of the targets up to end − 1 in one pass (e.g. a whole chunk), so that scoring it
        batch by batch is a cheap gather. Nothing is committed, and the count at each position is a prefix
        count (tokens up to that position only), so this changes no score; it only batches the work."""
        if end > self.committed_upto:
            self._prepare(as_token_array(tokens, end), end)

    def mark_scored(self, start: int, end: int) -> None:
        """Record positions start..end−1 as scored by a peer rank (after its scores were all-reduced)."""
        self.ledger.mark(np.arange(max(start, 1), end))

    def commit(self, tokens: np.ndarray | torch.Tensor, upto: int) -> None:
        """Fold tokens[committed_upto:upto] into the persistent state; every target there must be scored."""
        if upto < self.committed_upto:
            raise ScoreOrderError(f"commit({upto}) goes backwards: already committed up to {self.committed_upto}")
        self.ledger.require_scored(upto)
        self._commit(as_token_array(tokens, upto), upto)
        self.ledger.advance(upto)

    def _check_probe_position(self, position: int) -> None:
        if position < max(self.committed_upto, 1):
            raise ScoreOrderError(f"position {position} is already committed: its distribution is gone")

    def _score(self, pos: np.ndarray, head: np.ndarray, target_lp: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _commit(self, head: np.ndarray, upto: int) -> None:
        raise NotImplementedError

    def _prepare(self, head: np.ndarray, end: int) -> None:
        raise NotImplementedError


@dataclass
class GramCounts:
    """Counts at target positions for context widths 1..W (column w − 1): all from tokens before t."""

    context: np.ndarray  # (n, W) count(ctx)
    pair: np.ndarray  # (n, W) count(ctx, x_t)


class _ExactCountingMixer(StreamingMixerBase):
    """Shared by the compliant modes: exact causal counts, the probes, and the scoring entry point.

    On the scoring path counts stay as (W, n) inclusive-count views of the counter's cache: row w − 1 of
    `context_inc` is inc_w(t − 1) = count(ctx_w) + 1, row w − 1 of `pair_inc` is inc_{w+1}(t) =
    count(ctx_w, x_t) + 1.
    """

    compliant = True

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER) -> None:
        if max_order < MIN_ORDER:
            raise ValueError(f"max_order must be at least {MIN_ORDER}")
        super().__init__(vocab_size)
        self.max_order = max_order
        self.widths = max_order - 1
        self.counter = CausalGramCounter(vocab_size, max_gram=max_order)

    def _inclusive(self, pos: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.counter.ensure_computed(head, int(pos.max()) + 1)
        context_inc = self.counter.inclusive_counts(pos - 1)[: self.widths]
        pair_inc = self.counter.inclusive_counts(pos)[1: self.widths + 1]
        return context_inc, pair_inc

    def gram_counts(self, positions: np.ndarray | torch.Tensor, tokens: np.ndarray | torch.Tensor) -> GramCounts:
        """Context and pair counts at target positions (≥ committed_upto), without scoring them."""
        pos = _positions_array(positions)
        if pos.size == 0:
            return GramCounts(np.zeros((0, self.widths), np.int64), np.zeros((0, self.widths), np.int64))
        if pos.min() < max(self.committed_upto, 1):
            raise ScoreOrderError("gram counts are only available for positions that are not committed")
        context_inc, pair_inc = self._inclusive(pos, as_token_array(tokens, int(pos.max()) + 1))
        return GramCounts(context=np.maximum(context_inc - 1, 0).T.copy(), pair=np.maximum(pair_inc - 1, 0).T.copy())

    def _score(self, pos: np.ndarray, head: np.ndarray, target_lp: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        context_inc, pair_inc = self._inclusive(pos, head)
        return -np.log(self._mix_target(context_inc, pair_inc, np.exp(target_lp), entropy))

    def _commit(self, head: np.ndarray, upto: int) -> None:
        self.counter.commit(head, upto)

    def _prepare(self, head: np.ndarray, end: int) -> None:
        self.counter.ensure_computed(head, end)

    def candidate_counts(self, position: int, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """(W, V) count(ctx_w, v) for every width and candidate v, from tokens[:position] only."""
        self._check_probe_position(position)
        head = as_token_array(tokens, position)
        return np.stack([self.counter.candidate_pair_counts(head, position, w) for w in range(1, self.widths + 1)])

    def full_distribution(self, position: int, tokens: np.ndarray | torch.Tensor,
                          model_logprobs: torch.Tensor) -> torch.Tensor:
        """The whole mixed distribution at `position` (float64, (V,)), built from tokens[:position] only."""
        pair = self.candidate_counts(position, tokens)
        logp = torch.log_softmax(model_logprobs.detach().to("cpu", torch.float64).reshape(-1), dim=-1)
        entropy = float(-(logp.exp() * logp).sum())
        return torch.from_numpy(self._mix_full(pair, logp.exp().numpy(), entropy))

    def _mix_target(self, context_inc: np.ndarray, pair_inc: np.ndarray, p_model: np.ndarray,
                    entropy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _mix_full(self, pair: np.ndarray, p_model: np.ndarray, entropy: float) -> np.ndarray:
        raise NotImplementedError


class BackoffNgramMixer(_ExactCountingMixer):
    """Mode "exact": highest eligible order, exact maximum-likelihood n-gram distribution, entropy-adaptive α."""

    mode = "exact"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, min_count: int = DEFAULT_MIN_COUNT,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order)
        if min_count < 1:
            raise ValueError("min_count must be at least 1 (a context never seen has no distribution)")
        self.min_count = min_count
        self.alpha = alpha

    def chosen_width(self, context_counts: np.ndarray) -> np.ndarray:
        """Widest context seen at least min_count times, from (W, n) context counts (0 = none: model alone).

        A context's count never exceeds that of its own suffix, so the eligible widths are always 1..w and
        counting them gives w.
        """
        return (context_counts >= self.min_count).sum(axis=0)

    def _mix_target(self, context_inc: np.ndarray, pair_inc: np.ndarray, p_model: np.ndarray,
                    entropy: np.ndarray) -> np.ndarray:
        width = self.chosen_width(context_inc - 1)
        row, column = np.maximum(width - 1, 0), np.arange(width.size)
        context = context_inc[row, column] - 1
        p_ngram = (pair_inc[row, column] - 1) / np.maximum(context, 1)
        alpha = np.where(width > 0, self.alpha(entropy), 0.0)
        return p_model + alpha * (p_ngram - p_model)

    def _mix_full(self, pair: np.ndarray, p_model: np.ndarray, entropy: float) -> np.ndarray:
        context = pair.sum(axis=1)  # Σ_v count(ctx, v) = count(ctx): exact counts are normalised
        width = int(self.chosen_width(context[:, None])[0])
        if width == 0:
            return p_model
        alpha = float(self.alpha(np.array(entropy)))
        return (1.0 - alpha) * p_model + alpha * pair[width - 1] / context[width - 1]


class SmoothedNgramMixer(_ExactCountingMixer):
    """Mode "smoothed": every order interpolated with the one below, the chain ending in the model.

        p_0 = p_model,   p_w = (count(ctx_w, ·) + β·p_{w−1}) / (count(ctx_w) + β)   for w = 1..W,
        p_mix = (1 − α)·p_model + α·p_W   with the entropy-adaptive α of the backoff mode.

    Each p_w is a convex combination of an exact count distribution and a distribution, so it sums to 1,
    and so does p_mix; an unseen context leaves its level unchanged (no order is all-or-nothing, and no
    min_count threshold is needed). β = 2 was chosen on the sample *train* shard (bench/ngram.py --quality
    --swap-roles), not on validation text.
    """

    mode = "smoothed"

    def __init__(self, vocab_size: int, *, max_order: int = DEFAULT_MAX_ORDER, concentration: float = 2.0,
                 alpha: EntropyAlpha = EntropyAlpha()) -> None:
        super().__init__(vocab_size, max_order=max_order)
        if concentration <= 0:
            raise ValueError("concentration must be positive")
        self.concentration = concentration
        self.alpha = alpha

    def _mix_target(self, context_inc: np.ndarray, pair_inc: np.ndarray, p_model: np.ndarray,
                    entropy: np.ndarray) -> np.ndarray:
        p = p_model
        beta = self.concentration
        for w in range(self.widths):
            context, pair = np.maximum(context_inc[w] - 1, 0), np.maximum(pair_inc[w] - 1, 0)
            p = (pair + beta * p) / (context + beta)
        return p_model + self.alpha(entropy) * (p - p_model)

    def _mix_full(self, pair: np.ndarray, p_model: np.ndarray, entropy: float) -> np.ndarray:
        p = p_model
        beta = self.concentration
        for w in range(self.widths):
            p = (pair[w] + beta * p) / (pair[w].sum() + beta)
        alpha = float(self.alpha(np.array(entropy)))
        return (1.0 - alpha) * p_model + alpha * p




def make_mixer(mode: str, vocab_size: int) -> NgramMixer | None:
    """The mixer for a `--ngram` mode with its default settings (None for "off")."""
    if mode == "off":
        return None
    if mode == "exact":
        return BackoffNgramMixer(vocab_size)
    if mode == "smoothed":
        return SmoothedNgramMixer(vocab_size)
    if mode == "hashed-940":
        from service.engine.ngram_hashed import Hashed940Mixer

        return Hashed940Mixer(vocab_size)
    raise ValueError(f"unknown n-gram mode {mode!r}; expected one of {', '.join(NGRAM_MODES)}")
