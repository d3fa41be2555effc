"""Exact n-gram mixing (modes "exact", "smoothed") and the non-compliant `hashed-940` reproduction.

The reference for every count is a plain-Python dictionary walk over the stream, which reads as the
definition: at target t, count(ctx) and count(ctx, x_t) over the positions s < t.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.ngram import (
    BackoffNgramMixer,
    EntropyAlpha,
    ScoreOrderError,
    SmoothedNgramMixer,
    make_mixer,
    model_statistics,
)
from service.engine.ngram_hashed import HASH_PRIMES, Hashed940Mixer

WIDTHS = 6  # orders 2..7


def reference_counts(tokens: list[int], widths: int = WIDTHS) -> tuple[np.ndarray, np.ndarray]:
    """(N, W) count(ctx_w) and count(ctx_w, x_t) at every position t, from positions strictly before t."""
    context = [defaultdict(int) for _ in range(widths + 1)]
    pair = [defaultdict(int) for _ in range(widths + 1)]
    out_context = np.zeros((len(tokens), widths), np.int64)
    out_pair = np.zeros((len(tokens), widths), np.int64)
    for t, token in enumerate(tokens):
        for w in range(1, widths + 1):
            if t >= w:
                ctx = tuple(tokens[t - w:t])
                out_context[t, w - 1] = context[w][ctx]
                out_pair[t, w - 1] = pair[w][ctx + (token,)]
        for w in range(1, widths + 1):  # only now does x_t join the counts
            if t >= w:
                ctx = tuple(tokens[t - w:t])
                context[w][ctx] += 1
                pair[w][ctx + (token,)] += 1
    return out_context, out_pair


def reference_width(context_row: np.ndarray, min_count: int = 2) -> int:
    eligible = [w for w in range(1, len(context_row) + 1) if context_row[w - 1] >= min_count]
    return max(eligible, default=0)


def repetitive_tokens(rng: np.random.Generator, n: int, vocab: int, alphabet: np.ndarray | None = None) -> np.ndarray:
    """Random text with plenty of repeated n-grams: phrases drawn from a small pool, with some noise."""
    symbols = alphabet if alphabet is not None else np.arange(vocab)
    phrases = [rng.choice(symbols, size=rng.integers(2, 9)) for _ in range(12)]
    out: list[int] = []
    while len(out) < n:
        out.extend(phrases[rng.integers(len(phrases))].tolist() if rng.random() < 0.8 else
                   rng.choice(symbols, size=3).tolist())
    return np.array(out[:n], np.uint16)


def stream_counts(mixer: BackoffNgramMixer, tokens: np.ndarray, boundaries: list[int],
                  calls_per_chunk: int = 1, shuffle: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Counts at every target position, scoring chunk by chunk (several calls per chunk if asked)."""
    n = len(tokens)
    context = np.zeros((n, WIDTHS), np.int64)
    pair = np.zeros((n, WIDTHS), np.int64)
    start = 1
    for end in boundaries:
        positions = np.arange(start, end)
        for part in np.array_split(positions, calls_per_chunk):
            if part.size == 0:
                continue
            if shuffle is not None:
                part = shuffle.permutation(part)
            counts = mixer.gram_counts(part, tokens)
            context[part], pair[part] = counts.context, counts.pair
            mixer.score(part, tokens, np.full(part.size, -3.0), np.full(part.size, 4.0))
        mixer.commit(tokens, end)
        start = end
    return context, pair


SEQUENCES = [
    # (vocab, alphabet): small vocabularies, sp1024 (one- and two-word keys, extreme ids), a 13-bit vocabulary
    # whose 5-grams straddle the word boundary, and 16-bit ids (the widest rows)
    (3, None),
    (7, None),
    (1024, np.array([0, 1, 2, 511, 939, 1022, 1023])),
    (5000, np.array([0, 4095, 4096, 4999, 17, 2048])),
    (65536, np.array([0, 65535, 65534, 1, 32768])),
]


@pytest.mark.parametrize("vocab,alphabet", SEQUENCES)
def test_counts_order_and_ngram_probability_match_the_reference(vocab: int, alphabet: np.ndarray | None) -> None:
    rng = np.random.default_rng(vocab)
    tokens = repetitive_tokens(rng, 700, vocab, alphabet)
    want_context, want_pair = reference_counts(tokens.tolist())
    chunkings = [
        ([700], 1, None),
        ([2, 3, 9, 64, 65, 300, 700], 1, None),  # boundaries inside every context width
        ([5, 257, 700], 3, rng),  # several score calls per chunk, positions out of order
    ]
    for boundaries, calls, shuffle in chunkings:
        mixer = BackoffNgramMixer(vocab)
        context, pair = stream_counts(mixer, tokens, boundaries, calls, shuffle)
        np.testing.assert_array_equal(context[1:], want_context[1:], err_msg=f"context counts, {boundaries}")
        np.testing.assert_array_equal(pair[1:], want_pair[1:], err_msg=f"pair counts, {boundaries}")
        widths = mixer.chosen_width(context[1:].T)
        assert widths.tolist() == [reference_width(row) for row in want_context[1:]]


def test_ngram_probability_is_count_ratio_at_the_chosen_order() -> None:
    rng = np.random.default_rng(5)
    tokens = repetitive_tokens(rng, 400, 5)
    want_context, want_pair = reference_counts(tokens.tolist())
    alpha = EntropyAlpha()
    mixer = BackoffNgramMixer(5, alpha=alpha)
    positions = np.arange(1, 400)
    target_lp, entropy = np.log(np.full(399, 0.2)), rng.uniform(0.0, 7.0, 399)
    nll = mixer.score(positions, tokens, target_lp, entropy)
    for t, value in zip(positions, nll, strict=True):
        w = reference_width(want_context[t])
        if w == 0:
            expected = 0.2
        else:
            a = float(alpha(np.array(entropy[t - 1])))
            expected = (1 - a) * 0.2 + a * want_pair[t, w - 1] / want_context[t, w - 1]
        assert value == pytest.approx(-np.log(expected), rel=1e-12)


def test_entropy_alpha_follows_the_reference_formula() -> None:
    alpha = EntropyAlpha()
    assert float(alpha(np.array(4.0))) == pytest.approx(0.05 + 0.55 / 2)
    assert float(alpha(np.array(0.0))) == pytest.approx(0.05 + 0.55 / (1 + np.exp(8.0)))
    assert float(alpha(np.array(50.0))) == pytest.approx(0.60)


@pytest.mark.parametrize("mode_class", [BackoffNgramMixer, SmoothedNgramMixer])
def test_full_distribution_is_normalised_and_matches_the_score(mode_class: type) -> None:
    rng = np.random.default_rng(11)
    vocab = 40
    tokens = repetitive_tokens(rng, 3000, vocab)
    logits = torch.from_numpy(rng.normal(0, 2.5, (3000, vocab)))
    mixer = mode_class(vocab)
    want_context, want_pair = reference_counts(tokens.tolist())
    start = 1
    for end in (1000, 1800, 3000):
        positions = np.arange(start, end)
        probes = rng.choice(positions, 6, replace=False)
        # probes first (the distribution is fixed before x_t is scored), then the score
        dists = {int(t): mixer.full_distribution(int(t), tokens, logits[t]) for t in probes}
        nll = mixer.mixed_nll(positions, tokens, logits[positions])
        for t, dist in dists.items():
            assert abs(float(dist.sum()) - 1.0) < 1e-6
            assert float(dist.min()) >= 0.0
            assert float(-torch.log(dist[int(tokens[t])])) == pytest.approx(float(nll[t - start]), abs=1e-9)
            counts = mixer.candidate_counts(t, tokens)
            np.testing.assert_array_equal(counts.sum(axis=1), want_context[t])
            np.testing.assert_array_equal(counts[np.arange(WIDTHS), tokens[t]], want_pair[t])
        mixer.commit(tokens, end)
        start = end


def test_full_distribution_ignores_the_target_and_every_later_token() -> None:
    rng = np.random.default_rng(3)
    tokens = repetitive_tokens(rng, 1200, 30)
    logits = torch.from_numpy(rng.normal(0, 2.0, 30))
    mixer = BackoffNgramMixer(30)
    positions = np.arange(1, 600)
    mixer.score(positions, tokens, np.full(599, -3.0), np.full(599, 4.0))
    mixer.commit(tokens, 600)
    for t in (600, 777, 1100):
        before = mixer.full_distribution(t, tokens, logits)
        changed = tokens.copy()
        changed[t:] = rng.integers(0, 30, 1200 - t)
        changed[t] = (tokens[t] + 1) % 30
        assert torch.equal(before, mixer.full_distribution(t, changed, logits))


@pytest.mark.parametrize("mode", ["exact", "smoothed", "hashed-940"])
def test_scores_up_to_t_do_not_depend_on_later_tokens(mode: str) -> None:
    rng = np.random.default_rng(8)
    tokens = repetitive_tokens(rng, 2000, 50)
    changed = tokens.copy()
    cut = 1234
    changed[cut + 1:] = rng.integers(0, 50, 2000 - cut - 1)
    target_lp, entropy = np.full(2000, -3.5), rng.uniform(2.0, 6.0, 2000)
    results = []
    for stream in (tokens, changed):
        mixer = make_mixer(mode, 50)
        nll = []
        for start, end in ((1, 700), (700, 2000)):
            positions = np.arange(start, end)
            nll.append(mixer.score(positions, stream, target_lp[positions], entropy[positions]))
            mixer.commit(stream, end)
        results.append(np.concatenate(nll))
    np.testing.assert_array_equal(results[0][:cut], results[1][:cut])  # positions 1..cut
    assert not np.array_equal(results[0][cut:], results[1][cut:])


@pytest.mark.parametrize("mode", ["exact", "smoothed"])
def test_streaming_equals_one_shot_whatever_the_chunking(mode: str) -> None:
    rng = np.random.default_rng(21)
    tokens = repetitive_tokens(rng, 5000, 200)
    target_lp, entropy = rng.uniform(-8, -0.1, 5000), rng.uniform(0.5, 7.0, 5000)

    def run(boundaries: list[int], calls: int) -> np.ndarray:
        mixer = make_mixer(mode, 200)
        out, start = [], 1
        for end in boundaries:
            for part in np.array_split(np.arange(start, end), calls):
                out.append(mixer.score(part, tokens, target_lp[part], entropy[part]))
            mixer.commit(tokens, end)
            start = end
        return np.concatenate(out)

    one_shot = run([5000], 1)
    for boundaries, calls in (([64, 65, 1000, 4097, 5000], 1), ([777, 5000], 4), ([2, 3, 4, 5, 6, 7, 8, 5000], 2)):
        np.testing.assert_array_equal(run(boundaries, calls), one_shot)
    prepared = make_mixer(mode, 200)  # prepare() batches the work and changes no score
    prepared.prepare(tokens, 3000)
    head = prepared.score(np.arange(1, 3000), tokens, target_lp[1:3000], entropy[1:3000])
    np.testing.assert_array_equal(head, one_shot[:2999])


def test_state_refuses_tokens_whose_score_is_not_committed() -> None:
    tokens = np.arange(100, dtype=np.uint16) % 7
    mixer = BackoffNgramMixer(7)
    with pytest.raises(ScoreOrderError, match="position 1 has no committed score"):
        mixer.commit(tokens, 10)
    mixer.score(np.arange(1, 10), tokens, np.full(9, -2.0), np.full(9, 3.0))
    with pytest.raises(ScoreOrderError, match="position 10 has no committed score"):
        mixer.commit(tokens, 11)
    mixer.score(np.array([12, 13]), tokens, np.full(2, -2.0), np.full(2, 3.0))
    with pytest.raises(ScoreOrderError, match="position 10"):
        mixer.commit(tokens, 14)
    mixer.commit(tokens, 10)
    assert mixer.committed_upto == 10
    with pytest.raises(ScoreOrderError, match="already committed"):
        mixer.score(np.array([9]), tokens, np.array([-2.0]), np.array([3.0]))
    with pytest.raises(ScoreOrderError, match="already committed"):
        mixer.full_distribution(5, tokens, torch.zeros(7))
    mixer.mark_scored(10, 12)  # scored by a peer rank
    mixer.commit(tokens, 14)
    assert mixer.committed_upto == 14


def test_hashed_940_reproduces_the_upstream_formula() -> None:
    """The vectorised mixer against a per-position transcription of reference-stack.md §8.1: tables updated
    after every 64-target segment, as the PR head updated after each window's scored segment."""
    rng = np.random.default_rng(2)
    vocab, buckets = 64, 1 << 12
    tokens = repetitive_tokens(rng, 1500, vocab)
    target_lp, entropy = rng.uniform(-6, -0.5, 1500), rng.uniform(1.0, 7.0, 1500)
    mixer = Hashed940Mixer(vocab, buckets=buckets)
    got = []
    for start, end in ((1, 513), (513, 1500)):  # engine chunks hold whole segments
        positions = np.arange(start, end)
        for part in np.array_split(positions, 3):  # the engine's batching does not matter
            got.append(mixer.score(part, tokens, target_lp[part], entropy[part]))
        mixer.commit(tokens, end)
    got_nll = np.concatenate(got)

    mask, wrap = buckets - 1, (1 << 64) - 1

    def keys(j: int, w: int) -> tuple[int, int]:
        h = 0
        for k in range(w):
            h ^= (int(tokens[j - w + k]) * HASH_PRIMES[k]) & wrap
        return h & mask, (h ^ (int(tokens[j]) * HASH_PRIMES[w])) & mask

    ctx_counts = [defaultdict(int) for _ in range(7)]
    full_counts = [defaultdict(int) for _ in range(7)]
    want = []
    for segment_start in range(1, 1500, 64):
        segment = range(segment_start, min(segment_start + 64, 1500))
        for j in segment:
            p_model = float(np.exp(target_lp[j]))
            alpha = 0.05 + 0.55 / (1 + np.exp(-2 * (entropy[j] - 4.0)))
            p_mix = p_model
            for w in range(6, 0, -1):
                ctx_key, full_key = keys(j, w)
                if j >= w and ctx_counts[w][ctx_key] >= 2:
                    p_ng = min(full_counts[w][full_key], ctx_counts[w][ctx_key]) / ctx_counts[w][ctx_key]
                    p_mix = (1 - alpha) * p_model + alpha * p_ng
                    break
            want.append(-np.log(max(p_mix, 1e-12)))
        for j in segment:  # score first, then add the segment
            for w in range(1, min(j, 6) + 1):
                ctx_key, full_key = keys(j, w)
                ctx_counts[w][ctx_key] += 1
                full_counts[w][full_key] += 1
    np.testing.assert_allclose(got_nll, want, rtol=1e-12)


@pytest.mark.parametrize("update_every", [64, None])
def test_hashed_940_does_not_depend_on_the_batching_of_calls(update_every: int | None) -> None:
    rng = np.random.default_rng(9)
    tokens = repetitive_tokens(rng, 4000, 100)
    target_lp, entropy = rng.uniform(-6, -0.5, 4000), rng.uniform(1.0, 7.0, 4000)

    def run(batch: int, prepare: bool) -> np.ndarray:
        mixer = Hashed940Mixer(100, buckets=1 << 10, update_every=update_every)
        out = []
        for start, end in ((1, 1281), (1281, 4000)):
            if prepare:
                mixer.prepare(tokens, end)
            for first in range(start, end, batch):
                part = np.arange(first, min(first + batch, end))
                out.append(mixer.score(part, tokens, target_lp[part], entropy[part]))
            mixer.commit(tokens, end)
        return np.concatenate(out)

    whole = run(4000, False)
    np.testing.assert_array_equal(run(100, False), whole)
    np.testing.assert_array_equal(run(37, True), whole)


def test_hashed_940_is_marked_non_compliant_and_its_probabilities_sum_above_one() -> None:
    rng = np.random.default_rng(4)
    tokens = repetitive_tokens(rng, 60_000, 1024, rng.choice(1024, 300, replace=False))
    logits = torch.from_numpy(rng.normal(0, 1.0, 1024))
    hashed = Hashed940Mixer(1024)  # the upstream 2^22 buckets
    exact = BackoffNgramMixer(1024)
    assert hashed.compliant is False and exact.compliant is True
    for mixer in (hashed, exact):
        positions = np.arange(1, 50_000)
        mixer.score(positions, tokens, np.full(positions.size, -6.0), np.full(positions.size, 5.0))
        mixer.commit(tokens, 50_000)
    probes = range(50_000, 50_200)
    sums = [hashed.measured_probability_sum(t, tokens, logits) for t in probes]
    assert max(sums) > 1.5
    assert all(s >= 1.0 - 1e-9 for s in sums)
    # the probe evaluates the very formula that scores the target (segments of the chunk included)
    values = [float(hashed.full_distribution(t, tokens, logits)[int(tokens[t])]) for t in probes]
    targets = torch.from_numpy(tokens[probes].astype(np.int64))
    target_lp, entropy = model_statistics(logits.expand(len(probes), -1), targets)
    nll = hashed.score(np.array(probes), tokens, target_lp, entropy)
    np.testing.assert_allclose(np.exp(-nll), values, rtol=1e-9)
    for t in range(50_000, 50_010):
        assert abs(float(exact.full_distribution(t, tokens, logits).sum()) - 1.0) < 1e-6


def test_model_statistics_gives_target_log_probability_and_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, -1.0]], dtype=torch.float64)
    target_lp, entropy = model_statistics(logits, torch.tensor([2, 0]))
    assert target_lp[0].item() == pytest.approx(np.log(0.25))
    assert entropy[0].item() == pytest.approx(np.log(4.0))
    p = torch.softmax(logits[1], -1)
    assert target_lp[1].item() == pytest.approx(float(torch.log(p[0])))
    assert entropy[1].item() == pytest.approx(float(-(p * p.log()).sum()))
    # log-probabilities in, same answer out
    again = model_statistics(torch.log_softmax(logits, -1), torch.tensor([2, 0]))
    torch.testing.assert_close(again[0], target_lp)


def test_tokens_may_be_a_torch_tensor_and_mixed_nll_takes_logits() -> None:
    rng = np.random.default_rng(6)
    tokens = repetitive_tokens(rng, 800, 16)
    logits = torch.from_numpy(rng.normal(0, 1.0, (800, 16)))
    positions = np.arange(1, 800)
    a = BackoffNgramMixer(16).mixed_nll(positions, torch.from_numpy(tokens.astype(np.int64)), logits[positions])
    target_lp, entropy = model_statistics(logits[positions], torch.from_numpy(tokens[positions].astype(np.int64)))
    b = BackoffNgramMixer(16).score(positions, tokens, target_lp, entropy)
    np.testing.assert_array_equal(a.numpy(), b)


def test_make_mixer_modes() -> None:
    assert make_mixer("off", 1024) is None
    assert make_mixer("exact", 1024).mode == "exact"
    assert make_mixer("smoothed", 1024).mode == "smoothed"
    assert make_mixer("hashed-940", 1024).mode == "hashed-940"
    with pytest.raises(ValueError, match="unknown n-gram mode"):
        make_mixer("hashed", 1024)


@pytest.mark.shared_data
def test_counts_on_real_text_match_direct_comparison(fineweb_data: Path) -> None:
    """Half the sample val shard in engine-sized chunks (tables grow and rebuild, 7-grams take two words):
    counts at sampled positions against a direct scan of the prefix."""
    from trainer.data.shards import read_shard

    tokens = read_shard(fineweb_data / "fineweb_val_000000.bin", vocab_size=1024)[:300_000]
    mixer = BackoffNgramMixer(1024)
    rng = np.random.default_rng(0)
    checked = 0
    start = 1
    for end in range(65_536, 300_001, 65_536):
        positions = np.arange(start, end)
        probes = np.sort(rng.choice(positions, 8, replace=False))
        counts = mixer.gram_counts(probes, tokens)
        mixer.score(positions, tokens, np.full(positions.size, -5.0), np.full(positions.size, 5.0))
        mixer.commit(tokens, end)
        for row, t in enumerate(probes):
            for w in range(1, WIDTHS + 1):
                ends = np.arange(w, t)
                match = np.ones(ends.size, bool)
                for i in range(1, w + 1):
                    match &= tokens[ends - i] == tokens[t - i]
                assert counts.context[row, w - 1] == match.sum()
                assert counts.pair[row, w - 1] == (match & (tokens[ends] == tokens[t])).sum()
                checked += 1
        start = end
    assert checked == 4 * 8 * WIDTHS
