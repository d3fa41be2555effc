"""Tests of ``python -m verifier probe``: the engine passes in every compliant mode, broken evaluators fail.

The broken evaluators are small test doubles that plug into the probe harness the way real ones would: mixers
that the real engine runs (a cache that reads the whole stream, gold-only mixing), and stand-alone evaluators
(adaptation before scoring, rescoring). Each must fail the condition it breaks, and the honest counterpart
built the same way must pass, so a failure is the probes' doing and not the double's construction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.ngram import Mixed, NgramMixer, model_distribution
from service.engine.options import PLAIN, EvalOptions
from trainer.data.byte_accounting import ByteTables
from verifier.probe import Stream, probe_subject, scaled_hashed_buckets
from verifier.probe_subjects import EngineSubject, OrderEvent, ProbeRun, random_model

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
# Four chunks of 48 targets on 192 tokens: enough for caches and adaptation to be active at the probed positions.
OPTIONS = {"seq_len": 32, "stride": 8, "chunk_tokens": 48, "batch_windows": 8, "device": "cpu", **PLAIN}
NUM_TOKENS = 192


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tables() -> ByteTables:
    rng = np.random.default_rng(7)
    base = rng.integers(1, 5, size=VOCAB).astype(np.int16)
    lead = rng.random(VOCAB) < 0.4
    boundary = np.zeros(VOCAB, dtype=bool)
    base[1], lead[1], boundary[1] = 0, False, True
    return ByteTables(base, lead, boundary, "0" * 64, VOCAB)


def repetitive_tokens(n: int, seed: int = 0) -> np.ndarray:
    """Documents of recurring phrases: n-gram contexts recur, so caches have something to say."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, VOCAB, size=rng.integers(3, 7)) for _ in range(8)]
    out: list[int] = []
    while len(out) < n:
        out.append(1)
        for _ in range(rng.integers(3, 10)):
            out.extend(phrases[rng.integers(len(phrases))])
    return np.array(out[:n], dtype=np.uint16)


STREAMS = [Stream("random", np.random.default_rng(3).integers(0, VOCAB, NUM_TOKENS).astype(np.uint16), VOCAB),
           Stream("real", repetitive_tokens(NUM_TOKENS), VOCAB)]


def engine(mixer: type[NgramMixer] | None = None, **options: object) -> EngineSubject:
    factory = None if mixer is None else (lambda _mode, vocab: mixer(vocab))
    return EngineSubject(random_model(VOCAB), tiny_tables(), EvalOptions(**{**OPTIONS, **options}),
                         mixer_factory=factory)


def verdicts(subject: object) -> dict[str, str]:
    """Condition -> PASS/FAIL over both streams (FAIL if either fails)."""
    out: dict[str, str] = {}
    for row in probe_subject(subject, STREAMS):  # type: ignore[arg-type]
        condition = row.name.split()[0]
        if out.get(condition) != "FAIL":
            out[condition] = row.status
    return out


ALL_PASS = {"C1": "PASS", "C2": "PASS", "C3": "PASS", "C4": "PASS"}


# ---------------------------------------------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("options", [{}, {"ngram": "smoothed"}, {"ngram": "tilt"}, {"ttt": True, "ngram": "exact"}],
                         ids=["plain", "ngram-smoothed", "ngram-tilt", "ttt+ngram-exact"])
def test_engine_passes_every_probe_in_compliant_modes(options: dict) -> None:
    subject = engine(**options)
    rows = probe_subject(subject, STREAMS)
    assert {row.status for row in rows} == {"PASS"}, [row for row in rows if row.status != "PASS"]
    base = subject.run(STREAMS[1].tokens)
    updates = [event for event in base.order if event.kind == "update"]
    # The recorder sees the engine's updates: TTT on every chunk but the last, an n-gram commit per chunk.
    expected = (3 if options.get("ttt") else 0) + (4 if options.get("ngram") else 0)
    assert len(updates) == expected


def test_hashed_940_fails_c2_with_its_measured_sum() -> None:
    from service.engine.ngram_hashed import Hashed940Mixer

    buckets = scaled_hashed_buckets(NUM_TOKENS)
    subject = engine(ngram="hashed-940")
    subject.mixer_factory = lambda _mode, vocab: Hashed940Mixer(vocab, buckets=buckets)
    rows = {row.name: row for row in probe_subject(subject, STREAMS)}
    for stream in ("random", "real"):
        c2 = rows[f"C2 {stream}"]
        assert c2.status == "FAIL" and "not a distribution" in c2.reason
        low, high = map(float, re.search(r"min ([\d.e+-]+), max ([\d.e+-]+)", c2.figure).groups())
        assert high > 1.01 and low > 1.0  # printed: the formula's mass at every sampled position exceeds 1
        # It is causal, scores each target once and updates only from scored tokens: C2 is its only failure.
        assert {rows[f"{c} {stream}"].status for c in ("C1", "C3", "C4")} == {"PASS"}


# ---------------------------------------------------------------------------------------------------------------
# Broken mixers that the real engine runs


class WholeStreamCacheMixer(NgramMixer):
    """Mixes a unigram cache of the *whole* validation stream, which the engine's mixer interface hands over."""

    mode = "whole-stream-cache"
    compliant = True  # it claims to be
    alpha = 0.3

    def mix(self, positions: np.ndarray, tokens: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        self.stream = np.asarray(tokens)
        return super().mix(positions, tokens, logprobs)

    def cache(self, tokens: np.ndarray, t: int) -> torch.Tensor:
        counts = np.bincount(np.asarray(tokens), minlength=self.vocab_size) + 1.0
        return torch.from_numpy(counts / counts.sum())

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        p, _ = model_distribution(logprobs)
        stream = getattr(self, "stream", head)
        probs = torch.stack([(1 - self.alpha) * p[i] + self.alpha * self.cache(stream, int(t))
                             for i, t in enumerate(pos)])
        return Mixed(probs, probs.gather(1, torch.from_numpy(head[pos].astype(np.int64))[:, None]).squeeze(1))

    def _commit(self, head: np.ndarray, upto: int) -> None:
        pass


class PrefixCacheMixer(WholeStreamCacheMixer):
    """The honest counterpart: the same cache over the tokens before the position only."""

    def cache(self, tokens: np.ndarray, t: int) -> torch.Tensor:
        return super().cache(tokens[:t], t)


class GoldOnlyBigramMixer(NgramMixer):
    """Mixes a bigram cache (of committed tokens only) into the gold token's probability, and only on a hit;
    the stated vector is that formula evaluated for every candidate, Σ_v p(v) = 1 + α·(1 − Σ_{seen v} p(v)) > 1.
    """

    mode = "gold-only"
    compliant = True
    alpha = 0.3

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.pairs = np.zeros((vocab_size, vocab_size))

    def formula(self, p_model: torch.Tensor, previous: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(self.pairs[previous])
        p_cache = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1)
        return torch.where(rows > 0, (1 - self.alpha) * p_model + self.alpha * p_cache, p_model)

    def _mix(self, pos: np.ndarray, head: np.ndarray, logprobs: torch.Tensor) -> Mixed:
        p, _ = model_distribution(logprobs)
        probs = self.formula(p, head[pos - 1])
        return Mixed(probs, probs.gather(1, torch.from_numpy(head[pos].astype(np.int64))[:, None]).squeeze(1))

    def _commit(self, head: np.ndarray, upto: int) -> None:
        for t in range(max(self.committed_upto, 1), upto):
            self.pairs[head[t - 1], head[t]] += 1


class UnderstatingGoldOnlyMixer(GoldOnlyBigramMixer):
    """The same scoring, but it reports the model's softmax as its distribution to the probes."""

    def full_distribution(self, position: int, tokens: np.ndarray, logprobs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logprobs.double(), dim=-1)


def test_probe_harness_accepts_an_honest_plug_in_mixer() -> None:
    assert verdicts(engine(PrefixCacheMixer, ngram="exact")) == ALL_PASS


def test_a_cache_that_reads_the_future_fails_c1_and_c2() -> None:
    found = verdicts(engine(WholeStreamCacheMixer, ngram="exact"))
    # Causality is broken (C1) and the distribution moves with x_t (C2); order and single pass are intact.
    assert found == {"C1": "FAIL", "C2": "FAIL", "C3": "PASS", "C4": "PASS"}


@pytest.mark.parametrize("mixer", [GoldOnlyBigramMixer, UnderstatingGoldOnlyMixer])
def test_a_gold_only_mixer_fails_c2(mixer: type[GoldOnlyBigramMixer]) -> None:
    subject = engine(mixer, ngram="exact")
    rows = {row.name: row for row in probe_subject(subject, STREAMS)}
    assert rows["C2 real"].status == "FAIL"
    reason = rows["C2 real"].reason
    if mixer is GoldOnlyBigramMixer:
        assert "not a distribution" in reason
    else:  # its stated distribution sums to 1, but the scores do not come from it
        assert "does not come from that distribution" in reason and "not a distribution" not in reason
    assert all(rows[f"{c} real"].status == "PASS" for c in ("C1", "C3", "C4"))


# ---------------------------------------------------------------------------------------------------------------
# Stand-alone broken evaluators: adaptation before scoring, rescoring


class ChunkedUnigramEvaluator:
    """A toy adaptive evaluator: Laplace-smoothed unigram counts, adapted chunk by chunk.

    ``train_first`` adapts on a chunk before scoring it (the ruled-out adapt-then-score TTT); ``passes=2``
    scores the stream again after adapting on all of it and adds the second pass (rescoring).
    """

    def __init__(self, vocab_size: int, *, train_first: bool = False, passes: int = 1, chunk: int = 48) -> None:
        self.vocab_size, self.train_first, self.passes, self.chunk = vocab_size, train_first, passes, chunk

    def run(self, tokens: np.ndarray, sample_positions: Sequence[int] = ()) -> ProbeRun:
        n = len(tokens)
        result = ProbeRun(np.zeros(n), np.zeros(n, np.int64))
        counts = np.ones(self.vocab_size)
        for _ in range(self.passes):
            for lo in range(1, n, self.chunk):
                hi = min(lo + self.chunk, n)
                if self.train_first:
                    counts += np.bincount(tokens[lo:hi], minlength=self.vocab_size)
                    result.order.append(OrderEvent("update", lo, hi, "train"))
                p = counts / counts.sum()
                result.distributions.update({t: p.copy() for t in sample_positions if lo <= t < hi})
                result.nll[lo:hi] += -np.log(p[tokens[lo:hi]])
                result.times_scored[lo:hi] += 1
                result.order.append(OrderEvent("score", lo, hi, f"chunk at {lo}"))
                if not self.train_first:
                    counts += np.bincount(tokens[lo:hi], minlength=self.vocab_size)
                    result.order.append(OrderEvent("update", lo, hi, "train"))
        result.nll[result.times_scored == 0] = np.nan
        return result


def test_toy_score_first_evaluator_passes() -> None:
    assert verdicts(ChunkedUnigramEvaluator(VOCAB)) == ALL_PASS


def test_adapting_on_a_chunk_before_scoring_it_fails_c3_c1_and_c2() -> None:
    found = verdicts(ChunkedUnigramEvaluator(VOCAB, train_first=True))
    assert found == {"C1": "FAIL", "C2": "FAIL", "C3": "FAIL", "C4": "PASS"}
    row = next(r for r in probe_subject(ChunkedUnigramEvaluator(VOCAB, train_first=True), STREAMS[:1])
               if r.name == "C3 random")
    assert "updated state with targets [1, 49) when only targets < 1 were scored" in row.figure


def test_rescoring_fails_c4() -> None:
    subject = ChunkedUnigramEvaluator(VOCAB, passes=2)
    rows = {row.name: row for row in probe_subject(subject, STREAMS[:1])}
    assert rows["C4 random"].status == "FAIL"
    assert rows["C4 random"].reason == f"0 targets never scored, {NUM_TOKENS - 1} scored more than once"


# ---------------------------------------------------------------------------------------------------------------
# The command line


def probe_cli(*args: str | Path, data: tuple[Path, Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "verifier", "probe", "--data", str(data[0]), "--tokenizer",
                           str(data[1]), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def real_data(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """FineWeb sample when present, else the embedded corpus."""
    sample = Path(os.environ.get("PGOLF_SHARED_DATA") or REPO_ROOT.parent / "shared/data/fineweb_sample")
    if (sample / "tokenizers/fineweb_1024_bpe.model").is_file():
        return sample / "datasets/fineweb10B_sp1024", sample / "tokenizers/fineweb_1024_bpe.model"
    embedded = request.getfixturevalue("embedded_data")
    return embedded, embedded / "tokenizer.model"


def test_cli_fails_hashed_940_on_c2_and_prints_the_sum(real_data: tuple[Path, Path]) -> None:
    done = probe_cli("--mode", "hashed-940", data=real_data)
    assert done.returncode == 1, done.stderr[-2000:]
    table = done.stdout
    for stream in ("random", "real"):
        assert re.search(rf"^C2 {stream}\s+FAIL\s+sum p in \[1\+[\d.]+e\+\d\d, ", table, re.M), table
        for condition in ("C1", "C3", "C4"):
            assert re.search(rf"^{condition} {stream}\s+PASS", table, re.M), table
    assert table.rstrip().endswith("hashed-940 FAIL (C2)")


def test_cli_passes_the_plain_engine(real_data: tuple[Path, Path]) -> None:
    done = probe_cli("--mode", "plain", data=real_data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert len(re.findall(r"^C[1-4] (random|real)\s+PASS", done.stdout, re.M)) == 8
    assert re.search(r"^C3 real\s+PASS\s+no state updated", done.stdout, re.M)
    assert done.stdout.rstrip().endswith("plain PASS")
