"""N-gram mixing over the whole vocabulary (exact, smoothed, tilt) and the non-compliant hashed-940 reproduction.

The reference for every count is a plain-Python dictionary walk over the stream, which reads as the definition
(at target t, the continuations of each context among the positions s < t), and the reference for every mixed
vector is the mode's formula written out per position from those dictionaries.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from service.__main__ import tilt_log_line
from service.engine.ngram import (
    BackoffNgramMixer,
    Mixed,
    ScoreOrderError,
    SmoothedNgramMixer,
    TiltMixer,
    entropy_alpha,
    make_mixer,
    model_distribution,
)
from service.engine.ngram_counts import PrefixCounts
from service.engine.ngram_hashed import HASH_PRIMES, Hashed940Mixer
from service.engine.options import EvalOptions

WIDTHS = 6  # orders 2..7
REPO_ROOT = Path(__file__).resolve().parents[1]


def continuations(tokens: list[int], widths: int = WIDTHS) -> list[dict[int, dict[int, int]]]:
    """Per target t: {w: {v: occurrences of ctx_w(t)·v ending before t}} from a dictionary walk."""
    table: list[dict[tuple, dict[int, int]]] = [defaultdict(lambda: defaultdict(int)) for _ in range(widths + 1)]
    out = []
    for t, token in enumerate(tokens):
        out.append({w: dict(table[w][tuple(tokens[t - w:t])]) for w in range(1, widths + 1) if t >= w})
        for w in range(1, min(t, widths) + 1):  # only now does x_t join the counts
            table[w][tuple(tokens[t - w:t])][token] += 1
    return out


def repetitive_tokens(rng: np.random.Generator, n: int, vocab: int, alphabet: np.ndarray | None = None) -> np.ndarray:
    """Random text with plenty of repeated n-grams: phrases drawn from a small pool, with some noise."""
    symbols = alphabet if alphabet is not None else np.arange(vocab)
    phrases = [rng.choice(symbols, size=rng.integers(2, 9)) for _ in range(12)]
    out: list[int] = []
    while len(out) < n:
        out.extend(phrases[rng.integers(len(phrases))].tolist() if rng.random() < 0.8 else
                   rng.choice(symbols, size=3).tolist())
    return np.array(out[:n], np.uint16)


def dense(row: dict[int, int], vocab: int) -> np.ndarray:
    out = np.zeros(vocab)
    for v, c in row.items():
        out[v] = c
    return out


# ---------------------------------------------------------------------------------------------------------------
# Counts


SEQUENCES = [
    # small vocabularies (3-grams direct-addressed), sp1024 with extreme ids (1- and 2-grams direct-addressed),
    # a 13-bit vocabulary and 16-bit ids (only unigrams direct-addressed)
    (3, None), (7, None), (1024, np.array([0, 1, 2, 511, 939, 1022, 1023])),
    (5000, np.array([0, 4095, 4096, 4999, 17, 2048])), (65536, np.array([0, 65535, 65534, 1, 32768])),
]
CHUNKINGS = [[700], [2, 3, 9, 64, 65, 300, 700], [5, 257, 700]]  # boundaries inside every context width


@pytest.mark.parametrize("vocab,alphabet", SEQUENCES)
def test_counts_and_continuation_rows_match_the_reference(vocab: int, alphabet: np.ndarray | None) -> None:
    rng = np.random.default_rng(vocab)
    tokens = repetitive_tokens(rng, 700, vocab, alphabet)
    want = continuations(tokens.tolist())
    for boundaries in CHUNKINGS:
        counts = PrefixCounts(vocab, WIDTHS + 1)
        start = 1
        for end in boundaries:
            counts.prepare(tokens, end)
            positions = np.arange(start, end)
            context, pair = counts.context_counts(positions), counts.pair_counts(positions)
            for i, t in enumerate(positions):
                for w in range(1, WIDTHS + 1):
                    row = want[t].get(w, {})
                    assert context[w - 1, i] == sum(row.values()), (boundaries, t, w)
                    assert pair[w - 1, i] == row.get(int(tokens[t]), 0), (boundaries, t, w)
            for w in range(1, WIDTHS + 1):
                seen = positions[context[w - 1] > 0]
                query, token, count = counts.rows(w, seen)
                rows = np.zeros((seen.size, vocab))
                np.add.at(rows, (query, token), count)
                for i, t in enumerate(seen):
                    np.testing.assert_array_equal(rows[i], dense(want[t][w], vocab), err_msg=f"{boundaries} {t} {w}")
            counts.commit(tokens, end)
            start = end


# ---------------------------------------------------------------------------------------------------------------
# Mixed vectors against the formulas, position by position


def reference_vector(mode: str, rows: dict[int, dict[int, int]], logits: np.ndarray, vocab: int) -> np.ndarray:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    entropy = -(p * np.log(p)).sum()
    alpha = 0.05 + 0.55 / (1 + math.exp(-2.0 * (entropy - 4.0)))
    counts = {w: dense(row, vocab) for w, row in rows.items()}
    if mode == "exact":
        eligible = [w for w, c in counts.items() if c.sum() >= 2]
        if not eligible:
            return p
        c = counts[max(eligible)]
        return (1 - alpha) * p + alpha * c / c.sum()
    if mode == "smoothed":
        level = p
        for w in range(1, WIDTHS + 1):
            c = counts.get(w, np.zeros(vocab))
            level = (c + 2.0 * level) / (c.sum() + 2.0)
        return (1 - alpha) * p + alpha * level
    assert mode == "tilt"
    for w in range(WIDTHS, 0, -1):
        c = counts.get(w, np.zeros(vocab))
        if c.sum() >= 2 and c.max() / c.sum() >= 0.5:
            hint, beta = int(np.argmax(c)), 2.0 * c.max() / c.sum()
            tilted = p.copy()
            tilted[hint] *= math.exp(beta)
            return tilted / tilted.sum()
    return p


def mix_stream(mixer, tokens: np.ndarray, logits: torch.Tensor, boundaries: list[int], batch: int) -> list[Mixed]:
    """Mix every target chunk by chunk, the engine's way (prepare, batches, commit); one Mixed per batch."""
    out, start = [], 1
    for end in boundaries:
        mixer.prepare(tokens, end)
        for first in range(start, end, batch):
            positions = np.arange(first, min(first + batch, end))
            out.append((positions, mixer.mix(positions, tokens, torch.log_softmax(logits[positions], -1))))
        mixer.commit(tokens, end)
        start = end
    return out


def check_vectors(mode: str, tokens: np.ndarray, logits: torch.Tensor, boundaries: list[int], vocab: int,
                  reference_every: int = 1) -> None:
    """Every vector sums to 1 within 1e-6, its target entry equals the scored shortcut, and it equals the
    formula's vector (at every `reference_every`-th position)."""
    mixer = make_mixer(mode, vocab)
    want = continuations(tokens.tolist())
    for positions, mixed in mix_stream(mixer, tokens, logits, boundaries, batch=37):
        probs = mixed.probs.numpy()
        assert probs.shape == (positions.size, vocab) and probs.min() >= 0
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6, rtol=0)
        np.testing.assert_allclose(probs[np.arange(positions.size), tokens[positions]], mixed.shortcut.numpy(),
                                   rtol=1e-10, atol=0)
        for i, t in enumerate(positions):
            if t % reference_every == 0:
                ref = reference_vector(mode, want[t], torch.log_softmax(logits[t], -1).double().numpy(), vocab)
                np.testing.assert_allclose(probs[i], ref, rtol=1e-9, atol=1e-15, err_msg=f"{mode} t={t}")


@pytest.mark.parametrize("mode", ["exact", "smoothed", "tilt"])
def test_vectors_are_normalised_scored_and_equal_the_formula_on_random_tokens(mode: str) -> None:
    rng = np.random.default_rng(11)
    vocab = 40
    tokens = repetitive_tokens(rng, 900, vocab)
    logits = torch.from_numpy(rng.normal(0, 2.5, (900, vocab))).float()
    check_vectors(mode, tokens, logits, [64, 65, 500, 900], vocab)
    uniform = np.random.default_rng(1).integers(0, vocab, 400).astype(np.uint16)  # few repeats: mostly the model
    check_vectors(mode, uniform, logits[:400], [200, 400], vocab)


@pytest.mark.shared_data
@pytest.mark.parametrize("mode", ["exact", "smoothed", "tilt"])
def test_vectors_on_real_tokens(mode: str, fineweb_data: Path) -> None:
    """FineWeb sample tokens (the 1024-token vocabulary, 2-grams direct-addressed), two chunks."""
    from trainer.data.shards import read_shard

    tokens = read_shard(fineweb_data / "fineweb_val_000000.bin", vocab_size=1024)[:1500]
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 2.0, (1500, 1024))).float()
    check_vectors(mode, tokens, logits, [700, 1500], 1024, reference_every=7)


def test_tilt_hints_and_stats() -> None:
    rng = np.random.default_rng(5)
    tokens = repetitive_tokens(rng, 600, 30)
    logits = torch.from_numpy(rng.normal(0, 1.0, (600, 30))).float()
    mixer = TiltMixer(30)
    want = continuations(tokens.tolist())
    hinted = hits = 0
    for positions, _mixed in mix_stream(mixer, tokens, logits, [300, 600], batch=64):
        for t in positions:
            logp = torch.log_softmax(logits[t], -1).double().numpy()
            ref, plain = reference_vector("tilt", want[t], logp, 30), reference_vector("tilt", {}, logp, 30)
            moved = not np.array_equal(ref, plain)
            hinted += moved
            hits += moved and ref[tokens[t]] > plain[tokens[t]]
    stats = mixer.take_stats()
    assert stats["total"] == 599 and stats["gated"] == stats["token_gate"] == hinted > 100
    assert stats["hint_hits"] == hits and stats["within_gate"] == stats["word_gate"] == stats["agree2plus"] == 0
    assert mixer.take_stats()["total"] == 0  # counters restart after each take
    assert tilt_log_line(stats) == (f"ngram_tilt:hints total=599 gated={hinted} token_gate={hinted} within_gate=0 "
                               "word_gate=0 agree2plus=0")


# ---------------------------------------------------------------------------------------------------------------
# Causality, chunking, score before update


@pytest.mark.parametrize("mode", ["exact", "smoothed", "tilt", "hashed-940"])
def test_distributions_up_to_t_do_not_depend_on_later_tokens(mode: str) -> None:
    rng = np.random.default_rng(8)
    tokens = repetitive_tokens(rng, 1200, 50)
    changed = tokens.copy()
    cut = 777
    changed[cut + 1:] = rng.integers(0, 50, 1200 - cut - 1)
    logits = torch.from_numpy(rng.normal(0, 2.0, (1200, 50))).float()
    runs = []
    for stream in (tokens, changed):
        batches = mix_stream(make_mixer(mode, 50), stream, logits, [500, 1200], batch=100)
        runs.append((torch.cat([m.probs for _, m in batches]), torch.cat([m.shortcut for _, m in batches])))
    rows = cut if mode != "hashed-940" else None  # hashed-940 checks a few vectors per batch only
    if rows is not None:
        assert torch.equal(runs[0][0][:rows], runs[1][0][:rows])
    assert torch.equal(runs[0][1][:cut], runs[1][1][:cut])  # positions 1..cut
    assert not torch.equal(runs[0][1][cut:], runs[1][1][cut:])


@pytest.mark.parametrize("mode", ["exact", "smoothed", "tilt"])
def test_vectors_do_not_depend_on_chunking_or_batching(mode: str) -> None:
    rng = np.random.default_rng(21)
    tokens = repetitive_tokens(rng, 3000, 200)
    logits = torch.from_numpy(rng.normal(0, 2.0, (3000, 200))).float()

    def vectors(boundaries: list[int], batch: int) -> torch.Tensor:
        return torch.cat([m.probs for _, m in mix_stream(make_mixer(mode, 200), tokens, logits, boundaries, batch)])

    one_shot = vectors([3000], 3000)
    for boundaries, batch in (([64, 65, 1000, 2049, 3000], 500), ([777, 3000], 97), ([2, 3, 4, 5, 6, 7, 3000], 1000)):
        torch.testing.assert_close(vectors(boundaries, batch), one_shot, rtol=1e-13, atol=1e-15)


def test_committed_positions_cannot_be_scored_again_and_commits_never_go_back() -> None:
    """The engine's ledger decides when a chunk's scores are committed (tests/test_engine_scoring.py); the mixer
    refuses what would break the order on its side: rescoring a committed position, committing backwards."""
    tokens = np.arange(100, dtype=np.uint16) % 7
    mixer = BackoffNgramMixer(7)
    logits = torch.zeros(100, 7)
    mixer.mix(np.arange(1, 10), tokens, logits[1:10])
    mixer.commit(tokens, 10)
    assert mixer.committed_upto == 10
    with pytest.raises(ScoreOrderError, match="already committed"):
        mixer.mix(np.array([9, 10]), tokens, logits[:2])
    with pytest.raises(ScoreOrderError, match="already committed"):
        mixer.full_distribution(5, tokens, torch.zeros(7))
    with pytest.raises(ScoreOrderError, match="not a target"):
        BackoffNgramMixer(7).mix(np.array([0]), tokens, logits[:1])
    with pytest.raises(ScoreOrderError, match="goes backwards"):
        mixer.commit(tokens, 9)
    mixer.commit(tokens, 14)
    assert mixer.committed_upto == 14


@pytest.mark.parametrize("mode", ["exact", "smoothed", "tilt"])
def test_prepare_up_to_a_committed_end_is_a_no_op(mode: str) -> None:
    """The committed counts already cover every target before ``committed_upto``: preparing to an end at or before
    it changes nothing (and raises nothing), so the next vectors equal those of a mixer never asked."""
    tokens = np.arange(100, dtype=np.uint16) % 7
    logits = torch.randn(100, 7, generator=torch.Generator().manual_seed(0))
    asked, untouched = make_mixer(mode, 7), make_mixer(mode, 7)
    for mixer in (asked, untouched):
        mixer.commit(tokens, 14)
    for end in (5, 14):
        asked.prepare(tokens, end)
    positions = np.arange(14, 30)
    torch.testing.assert_close(asked.mix(positions, tokens, logits[14:30]).probs,
                               untouched.mix(positions, tokens, logits[14:30]).probs, rtol=0, atol=0)


def test_full_distribution_is_the_scored_vector_and_ignores_the_target() -> None:
    rng = np.random.default_rng(3)
    tokens = repetitive_tokens(rng, 800, 30)
    logits = torch.from_numpy(rng.normal(0, 2.0, (800, 30))).float()
    for mode in ("exact", "smoothed", "tilt"):
        mixer = make_mixer(mode, 30)
        mix_stream(mixer, tokens, logits, [400], batch=400)
        for t in (400, 555, 799):
            before = mixer.full_distribution(t, tokens, logits[t])
            changed = tokens.copy()
            changed[t:] = rng.integers(0, 30, 800 - t)
            changed[t] = (tokens[t] + 1) % 30
            assert torch.equal(before, mixer.full_distribution(t, changed, logits[t]))
        scored = mixer.mix(np.arange(400, 800), tokens, logits[400:800]).probs
        assert torch.equal(scored[399], before)


# ---------------------------------------------------------------------------------------------------------------
# The engine's own check catches a gold-only mixer


class GoldOnlyMixer(BackoffNgramMixer):
    """Mixes the n-gram term into the target's entry only, keeping the model's probability everywhere else (the
    2026-04-02 refusal): a vector that does not sum to 1."""

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        honest = super()._mix(pos, head, logprobs)
        probs, _ = model_distribution(logprobs)
        probs[torch.arange(pos.size), torch.from_numpy(head[pos].astype(np.int64))] = honest.shortcut
        return Mixed(probs, honest.shortcut)


class ModelVectorMixer(BackoffNgramMixer):
    """Reports the model's softmax as its vector while its shortcut mixes: the score is not from the vector."""

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        return Mixed(model_distribution(logprobs)[0], super()._mix(pos, head, logprobs).shortcut)


@pytest.mark.parametrize("broken,figure", [(GoldOnlyMixer, "sum_error_max"), (ModelVectorMixer, "scored_gap_max")])
def test_engine_check_catches_a_gold_only_mixer(broken: type, figure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_engine_scoring import options, run, terminal, tiny_model
    from test_engine_scoring import repetitive_tokens as documents

    from service.engine import run as engine_run

    tokens = documents(500, seed=2)
    honest = terminal(run(tiny_model(), tokens, options(ngram="exact"))[0])
    assert honest["compliance"]["compliant"] and honest["compliance"]["ngram"]["normalised"]
    monkeypatch.setattr(engine_run, "make_mixer", lambda mode, vocab: broken(vocab))
    events, _ = run(tiny_model(), tokens, options(ngram="exact"))
    end = terminal(events)
    assert end["compliance"]["ngram"][figure] > 1e-3 and not end["compliance"]["ngram"]["normalised"]
    assert end["compliance"]["compliant"] is False
    assert max(e["distribution"][figure] for e in events[1:-1]) > 1e-3  # and each chunk event shows it


# ---------------------------------------------------------------------------------------------------------------
# hashed-940, the non-compliant reproduction


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
        for part in np.array_split(np.arange(start, end), 3):  # the engine's batching does not matter
            got.append(mixer.score(part, tokens, target_lp[part], entropy[part]))
        mixer.commit(tokens, end)
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
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-12)


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
    assert hashed.compliant is False and hashed.scores_from_vector is False
    positions = np.arange(1, 50_000)
    hashed.score(positions, tokens, np.full(positions.size, -6.0), np.full(positions.size, 5.0))
    hashed.commit(tokens, 50_000)
    probes = np.arange(50_000, 50_200)
    sums = [hashed.measured_probability_sum(int(t), tokens, logits) for t in probes]
    assert max(sums) > 1.5 and all(s >= 1.0 - 1e-9 for s in sums)
    # the vector evaluates the very formula that scores the target
    mixed = hashed.mix(probes, tokens, logits.expand(probes.size, -1))
    assert mixed.rows is not None and mixed.probs.shape[0] == hashed.vectors_per_batch
    at = mixed.rows.numpy()
    np.testing.assert_allclose(mixed.probs.numpy()[np.arange(at.size), tokens[probes[at]]],
                               mixed.shortcut.numpy()[at], rtol=1e-9)


def test_make_mixer_modes_and_no_hashed_import_for_compliant_modes() -> None:
    assert make_mixer("off", 1024) is None
    for mode in ("exact", "smoothed", "tilt", "hashed-940"):
        assert make_mixer(mode, 1024).mode == mode
    with pytest.raises(ValueError, match="unknown n-gram mode"):  # the one check of the mode names
        EvalOptions(ngram="hashed").validate()
    probe = ("import sys; from service.engine.run import make_mixer; "
             "[make_mixer(m, 64) for m in ('exact', 'smoothed', 'tilt')]; "
             "print('service.engine.ngram_hashed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_entropy_alpha_follows_the_reference_formula() -> None:
    alpha = entropy_alpha
    assert float(alpha(torch.tensor(4.0))) == pytest.approx(0.05 + 0.55 / 2)
    assert float(alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(0.05 + 0.55 / (1 + np.exp(8.0)))
    assert float(alpha(torch.tensor(50.0))) == pytest.approx(0.60)


def test_smoothed_concentration_and_exact_min_count_are_validated() -> None:
    with pytest.raises(ValueError, match="concentration"):
        SmoothedNgramMixer(10, concentration=0)
    with pytest.raises(ValueError, match="min_count"):
        BackoffNgramMixer(10, min_count=0)
