"""The evaluation loop on a real (tiny) GPT: exact-once scoring, causality, score-first TTT, timeouts.

Every test runs ``evaluate_model`` end to end on a short token stream; per-position NLLs come from its ledger's
commits (observed from outside the engine), training calls are recorded by a GPT subclass, so the ordering checks
do not trust the engine's own trace.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

from service.engine.dist import DistContext
from service.engine.events import Totals
from service.engine.ngram import ScoreOrderError
from service.engine.options import PLAIN, RECIPES, EvalOptions, TTTRecipe
from service.engine.run import evaluate_model
from service.engine.scoring import ChunkScores, DistributionCheck, ScoreLedger
from service.engine.ttt import TTTUpdater
from service.engine.windows import Chunk, plan_chunks, plan_windows
from service.judge import judged, order_problems
from trainer.data.byte_accounting import ByteTables
from trainer.model import GPT, ModelConfig

VOCAB = 64
TINY = ModelConfig(vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                   rope_dims=4, bigram_buckets=32, bigram_dim=8, xsa_last_n=3)
# Strong enough that training visibly moves later scores on a random-init model.
STRONG_SGD = TTTRecipe(name="test-sgd", optimizer="sgd", lr=0.05, epochs=2, freeze_blocks=1, grad_clip=1.0,
                       lr_schedule="cosine", chunk_tokens=32_768, momentum=0.9, batch_sequences=3)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Two oversubscribed cores run these small matmuls far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tables() -> ByteTables:
    rng = np.random.default_rng(7)
    base = rng.integers(1, 5, size=VOCAB).astype(np.int16)
    lead = rng.random(VOCAB) < 0.4
    boundary = np.zeros(VOCAB, dtype=bool)
    base[1], lead[1], boundary[1] = 0, False, True  # id 1 is BOS: no bytes, and no space after it
    return ByteTables(base, lead, boundary, "0" * 64, VOCAB)


def tiny_model(seed: int = 0, cls: type[GPT] = GPT) -> GPT:
    torch.manual_seed(seed)
    model = cls(TINY)
    with torch.no_grad():  # a random init with zero-init projections scores uniformly; perturb it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def repetitive_tokens(n: int, seed: int = 0) -> np.ndarray:
    """Documents (BOS-separated) built from a few recurring phrases, so n-gram contexts recur."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, VOCAB, size=rng.integers(3, 9)) for _ in range(12)]
    out: list[int] = []
    while len(out) < n:
        out.append(1)
        for _ in range(rng.integers(3, 12)):
            out.extend(phrases[rng.integers(len(phrases))] if rng.random() < 0.7 else rng.integers(2, VOCAB, 4))
    return np.array(out[:n], dtype=np.uint16)


@contextlib.contextmanager
def observing_commits(observe: Callable[[Chunk, np.ndarray], None]) -> Iterator[None]:
    """Calls ``observe(chunk, per-position float64 NLL)`` right after every ledger commit, from outside the engine."""
    commit = ScoreLedger.commit

    def recording(ledger: ScoreLedger, scores: ChunkScores) -> Totals:
        totals = commit(ledger, scores)
        observe(scores.chunk, scores.sums[0].cpu().numpy())
        return totals

    with mock.patch.object(ScoreLedger, "commit", recording):
        yield


def run(model: GPT, tokens: np.ndarray, options: EvalOptions, **kwargs) -> tuple[list[dict], np.ndarray]:
    """All events, and the per-position NLL (index p for target p; NaN where never committed)."""
    nll = np.full(len(tokens), np.nan)

    def observe(chunk: Chunk, chunk_nll: np.ndarray) -> None:
        nll[chunk.target_lo : chunk.target_hi] = chunk_nll

    with observing_commits(observe):
        events = list(judged(evaluate_model(model, tokens, tiny_tables(), options, **kwargs)))
    return events, nll


def options(**overrides) -> EvalOptions:
    # Plain unless a test asks for TTT or n-gram mixing: EvalOptions defaults to the measured TTT + n-gram mode.
    base = {"seq_len": 32, "stride": 8, "chunk_tokens": 96, "batch_windows": 5, **PLAIN}
    return EvalOptions(**{**base, **overrides})


def terminal(events: list[dict]) -> dict:
    assert events[0]["type"] == "start"
    assert all(e["type"] == "chunk" for e in events[1:-1])
    return events[-1]


# ---------------------------------------------------------------------------------------------------------------
# Plain scoring


@pytest.mark.parametrize("num_tokens,seq_len,stride,chunk_tokens", [
    (300, 32, 8, 96), (301, 32, 8, 50), (20, 32, 8, 96), (257, 32, 32, 64), (150, 16, 5, 7)])
def test_every_target_scored_once_and_bytes_exact(num_tokens: int, seq_len: int, stride: int,
                                                 chunk_tokens: int) -> None:
    tokens = repetitive_tokens(num_tokens)
    events, nll = run(tiny_model(), tokens, options(seq_len=seq_len, stride=stride, chunk_tokens=chunk_tokens))
    end = terminal(events)
    assert end["type"] == "end", end
    assert end["targets_scored"] == num_tokens - 1 == events[0]["targets"]
    assert not np.isnan(nll[1:]).any()
    compliance = end["compliance"]
    assert compliance["scored_once"] and compliance["positions_not_scored_once"] == 0
    assert compliance["compliant"] and compliance["score_before_update"]
    expected_bytes = tiny_tables().total_bytes(tokens)
    assert end["bytes"] == events[0]["bytes"] == expected_bytes
    assert end["nll_sum"] == pytest.approx(float(nll[1:].sum()), rel=1e-12)
    assert end["val_bpb"] == pytest.approx(end["nll_sum"] / (math.log(2) * expected_bytes), rel=1e-12)
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [c["target_range"] for c in chunks] == [
        [c.target_lo, c.target_hi] for c in plan_chunks(plan_windows(num_tokens, seq_len, stride), chunk_tokens)]
    assert sum(c["targets"] for c in chunks) == num_tokens - 1
    json.loads(json.dumps(events))  # the stream is plain JSON


def test_batched_scores_equal_window_by_window_reference() -> None:
    """Each target's NLL equals a direct forward of its own window: padding and batching change nothing."""
    tokens = repetitive_tokens(203)
    model = tiny_model()
    seq_len, stride = 32, 8
    _, nll = run(model, tokens, options(seq_len=seq_len, stride=stride, batch_windows=7))
    plan = plan_windows(len(tokens), seq_len, stride)
    expected = np.full(len(tokens), np.nan)
    with torch.no_grad():
        for start, end, first in zip(plan.starts, plan.ends, plan.score_from, strict=True):
            window = torch.from_numpy(tokens[start:end].astype(np.int64))[None]
            logprobs = torch.log_softmax(model.forward_logits(window)[0].double(), dim=-1)
            for p in range(first, end + 1):
                expected[p] = -float(logprobs[p - 1 - start, int(tokens[p])])
    np.testing.assert_allclose(nll[1:], expected[1:], rtol=1e-5, atol=1e-6)


def test_non_overlapping_mode_scores_each_block_with_in_block_context() -> None:
    tokens = repetitive_tokens(100)
    model = tiny_model()
    _, nll = run(model, tokens, options(seq_len=32, stride=32))
    with torch.no_grad():
        block = torch.from_numpy(tokens[32:64].astype(np.int64))[None]  # second block: targets 33..64
        logprobs = torch.log_softmax(model.forward_logits(block)[0].double(), dim=-1)
    expected = -logprobs[torch.arange(32), torch.from_numpy(tokens[33:65].astype(np.int64))].numpy()
    np.testing.assert_allclose(nll[33:65], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Causality (C1): changing tokens after t never changes a score at a position ≤ t


@pytest.mark.parametrize("mode", ["plain", "ttt-pr940", "ttt-strong", "ngram-exact", "ngram-smoothed",
                                  "ttt+ngram"])
def test_scores_up_to_t_ignore_every_later_token(mode: str) -> None:
    kwargs: dict = {}
    opts = options(chunk_tokens=96)
    if mode.startswith("ttt"):
        opts = options(chunk_tokens=96, ttt=True)
        if mode != "ttt-pr940":
            kwargs["ttt_recipe"] = STRONG_SGD
    if "ngram" in mode:
        opts = options(chunk_tokens=96, ttt=opts.ttt, ngram=mode.split("-")[-1] if "-" in mode else "exact")
    original = repetitive_tokens(400, seed=1)
    model = tiny_model()
    _, reference = run(copy.deepcopy(model), original, opts, **kwargs)
    rng = np.random.default_rng(5)
    for t in (50, 96, 97, 150, 290):  # inside chunk 0, chunk edges, inside later chunks
        changed = original.copy()
        changed[t + 1 :] = rng.integers(2, VOCAB, size=len(original) - t - 1)
        _, nll = run(copy.deepcopy(model), changed, opts, **kwargs)
        np.testing.assert_array_equal(nll[1 : t + 1], reference[1 : t + 1], err_msg=f"{mode}: t={t}")
        assert not np.array_equal(nll[t + 1 :], reference[t + 1 :])  # the change is seen from t + 1 on


# ---------------------------------------------------------------------------------------------------------------
# Score-first TTT (C3)


class RecordingGPT(GPT):
    """Logs every training forward (inputs and targets) next to the engine's commits, in call order."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple] = []

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(("train", input_ids.detach().clone(), target_ids.detach().clone()))
        return super().forward(input_ids, target_ids)


def locate(tokens: np.ndarray, row: np.ndarray) -> int:
    """The unique start s with tokens[s : s + len(row)] == row."""
    view = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), len(row))
    hits = np.flatnonzero((view == row).all(axis=1))
    assert len(hits) == 1, f"sequence found {len(hits)} times"
    return int(hits[0])


@pytest.mark.parametrize("recipe", [RECIPES["pr940"], RECIPES["legal-sgd"], STRONG_SGD])
def test_ttt_never_trains_on_a_target_before_its_score_is_committed(recipe: TTTRecipe) -> None:
    rng = np.random.default_rng(11)
    tokens = rng.integers(2, VOCAB, size=333).astype(np.uint16)  # random: every 33-gram is unique
    model = tiny_model(cls=RecordingGPT)
    opts = options(chunk_tokens=72, ttt=True)  # chunks of 72 targets: sequences of 32, 32 and a ragged 8

    def observe(chunk, _nll: np.ndarray) -> None:
        model.calls.append(("commit", chunk.target_hi))

    with observing_commits(observe):
        events = list(judged(evaluate_model(model, tokens, tiny_tables(), opts, ttt_recipe=recipe)))
    end = terminal(events)
    assert end["type"] == "end" and end["compliance"]["score_before_update"]
    frontier = 1
    trained_after_commit: dict[int, int] = {}
    for call in model.calls:
        if call[0] == "commit":
            frontier = call[1]
            continue
        _, inputs, targets = call
        for x, y in zip(inputs.numpy(), targets.numpy(), strict=True):
            start = locate(tokens, np.concatenate([x, y[-1:]]))
            last_target = start + len(x)
            assert last_target < frontier, f"trained on target {last_target}, committed only < {frontier}"
            trained_after_commit[frontier] = max(trained_after_commit.get(frontier, 0), last_target)
    chunks = [e for e in events if e["type"] == "chunk"]
    assert len(chunks) >= 4
    # Every chunk but the last is trained on, up to its own last target; the last chunk never is.
    for chunk in chunks[:-1]:
        lo, hi = chunk["target_range"]
        assert chunk["trained_range"] == [lo, hi]
        assert trained_after_commit[hi] == hi - 1
    assert chunks[-1]["trained_range"] is None
    assert chunks[-1]["target_range"][1] not in trained_after_commit
    sequences = [math.ceil((c["targets"]) / opts.seq_len) for c in chunks[:-1]]
    expected_steps = sum(recipe.epochs * math.ceil(n / recipe.batch_sequences) for n in sequences)
    assert end["compliance"]["ttt"]["optimizer_steps"] == expected_steps


def test_ttt_adapts_later_chunks_and_leaves_the_first_untouched() -> None:
    tokens = repetitive_tokens(400, seed=2)
    model = tiny_model()
    plain_events, plain = run(copy.deepcopy(model), tokens, options())
    ttt_events, adapted = run(copy.deepcopy(model), tokens, options(ttt=True), ttt_recipe=STRONG_SGD)
    first = plain_events[1]["target_range"]
    np.testing.assert_array_equal(adapted[first[0] : first[1]], plain[first[0] : first[1]])
    assert abs(adapted[first[1] :].sum() - plain[first[1] :].sum()) > 1e-3 * plain[first[1] :].sum()
    assert terminal(ttt_events)["compliance"]["compliant"]


def test_micro_batching_does_not_change_the_ttt_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = repetitive_tokens(300, seed=6)
    opts = options(chunk_tokens=72, ttt=True)  # 3 sequences per step, one of them ragged
    whole = terminal(run(tiny_model(), tokens, opts, ttt_recipe=STRONG_SGD)[0])
    from service.engine import ttt

    monkeypatch.setattr(ttt, "MICRO_BATCH_SEQUENCES", 1)
    split = terminal(run(tiny_model(), tokens, opts, ttt_recipe=STRONG_SGD)[0])
    assert split["val_bpb"] == pytest.approx(whole["val_bpb"], rel=1e-6)
    assert split["compliance"]["trace_digest"] == whole["compliance"]["trace_digest"]


def test_ledger_refuses_out_of_order_commits_and_uncommitted_training() -> None:
    tokens = repetitive_tokens(200)
    plan = plan_windows(len(tokens), 32, 8)
    chunks = plan_chunks(plan, 64)
    ledger = ScoreLedger(tokens, tiny_tables())

    def scores_for(chunk) -> ChunkScores:
        return ChunkScores(chunk, torch.stack([torch.ones(chunk.num_targets, dtype=torch.float64)] * 2))

    with pytest.raises(ScoreOrderError):
        ledger.commit(scores_for(chunks[1]))  # skipping chunk 0
    with pytest.raises(ScoreOrderError):
        ledger.committed_span(0, 2)  # target 1 is not committed yet
    ledger.commit(scores_for(chunks[0]))
    span = ledger.committed_span(0, chunks[0].target_hi)
    assert span.last_target == chunks[0].target_hi - 1
    with pytest.raises(ScoreOrderError):
        ledger.committed_span(0, chunks[0].target_hi + 1)  # one target too far
    model = tiny_model()
    other = ScoreLedger(tokens, tiny_tables())
    updater = TTTUpdater(model, STRONG_SGD, other, seq_len=32, num_chunks=len(chunks), dist=DistContext(),
                         device=torch.device("cpu"))
    with pytest.raises(ScoreOrderError):
        updater.train(span, 0)  # a span from another evaluation's ledger


def test_forged_traces_fail_the_score_before_update_check() -> None:
    tokens = repetitive_tokens(200)
    chunks = plan_chunks(plan_windows(len(tokens), 32, 8), 64)
    ledger = ScoreLedger(tokens, tiny_tables())

    for chunk in chunks:
        ledger.commit(ChunkScores(chunk, torch.stack([torch.ones(chunk.num_targets, dtype=torch.float64)] * 2)))
    trace = ledger.trace

    def score_before_update() -> bool:  # the judge reads the trace entries as the chunk events carry them
        events = [{"index": entry["chunk"], "target_range": entry["scored"], "trained_range": entry["trained"],
                   "order_trace": entry} for entry in trace.chunks]
        return not order_problems(events, chunks[-1].index)

    assert score_before_update()
    trace.chunks[0]["trained"], trace.chunks[0]["step_max_targets"] = [1, chunks[0].target_hi], [5]
    assert score_before_update()
    trace.chunks[0]["step_max_targets"] = [chunks[0].target_hi]  # a step past the frontier
    assert not score_before_update()
    trace.chunks[0]["step_max_targets"] = [5]
    trace.chunks[-1]["trained"], trace.chunks[-1]["step_max_targets"] = [chunks[-1].target_lo, 10], [9]
    assert not score_before_update()  # the last chunk was trained on


class CachingGPT(GPT):
    """Caches a tensor lazily on first use, built under inference_mode (trainer.model.GPT caches nothing)."""

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if getattr(self, "cached_scale", None) is None:
            self.cached_scale = torch.ones(1)
        return super().forward_logits(input_ids) * self.cached_scale


def test_a_model_that_caches_under_inference_mode_fails_loudly_instead_of_training_wrongly() -> None:
    """The engine's models rebuild their rotary tables every forward, so nothing scored under inference_mode is
    saved for backward; a model that did cache stops the run with an error event, nothing is trained silently."""
    events = run(tiny_model(cls=CachingGPT), repetitive_tokens(200), options(ttt=True))[0]
    end = terminal(events)
    assert end["type"] == "error" and end["code"] == "internal" and "Inference tensors" in end["reason"], end
    assert not any(e["type"] == "chunk" and e["trained_range"] for e in events)
    plain = terminal(run(tiny_model(), repetitive_tokens(200), options(ttt=True))[0])
    assert plain["type"] == "end" and plain["compliance"]["ttt"]["chunks_trained"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# Budget, n-gram modes, errors


class ClockedGPT(GPT):
    """Every scoring forward advances a fake clock by one second."""

    now = [0.0]

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ClockedGPT.now[0] += 1.0
        return super().forward_logits(input_ids)


def test_timeout_stops_between_chunks_with_partial_figures() -> None:
    ClockedGPT.now[0] = 0.0
    tokens = repetitive_tokens(400)
    events, nll = run(tiny_model(cls=ClockedGPT), tokens, options(max_seconds=9.5),
                      clock=lambda: ClockedGPT.now[0])
    timeout = terminal(events)
    chunks = [e for e in events if e["type"] == "chunk"]
    assert timeout["type"] == "timeout" and "budget" in timeout["reason"]
    assert 1 <= timeout["chunks_done"] == len(chunks) < events[0]["chunks"]
    assert timeout["elapsed_s"] <= 9.5
    assert timeout["targets_scored"] == sum(c["targets"] for c in chunks) < len(tokens) - 1
    assert timeout["bytes"] == sum(c["bytes"] for c in chunks)
    assert timeout["nll_sum"] == pytest.approx(np.nansum(nll), rel=1e-12)
    assert timeout["partial_val_bpb"] == pytest.approx(chunks[-1]["running_bpb"], rel=1e-12)
    assert not timeout["compliance"]["scored_once"]


def test_hashed_940_is_marked_non_compliant_with_its_measured_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = repetitive_tokens(600, seed=3)
    end = terminal(run(tiny_model(), tokens, options(ngram="hashed-940"))[0])
    assert end["type"] == "end"
    ngram = end["compliance"]["ngram"]
    assert end["compliance"]["compliant"] is False and ngram["mixer_compliant"] is False
    assert ngram["probability_sum"]["positions"] > 0
    exact = terminal(run(tiny_model(), tokens, options(ngram="exact"))[0])
    assert exact["compliance"]["compliant"] and exact["compliance"]["ngram"]["normalised"]
    # 600 tokens hardly collide in 2^22 buckets; 64 buckets collide as the full val set does in 2^22.
    from service.engine import ngram_hashed
    from service.engine import run as engine_run

    monkeypatch.setattr(engine_run, "make_mixer", lambda mode, vocab: ngram_hashed.Hashed940Mixer(vocab, buckets=64))
    crowded = terminal(run(tiny_model(), tokens, options(ngram="hashed-940"))[0])
    assert crowded["compliance"]["ngram"]["probability_sum"]["max"] > 1.01
    assert not crowded["compliance"]["ngram"]["normalised"] and not crowded["compliance"]["compliant"]


def test_bad_options_and_empty_streams_give_error_events() -> None:
    events, _ = run(tiny_model(), repetitive_tokens(100), options(stride=64))
    assert events == [events[0]] and events[0]["type"] == "error" and events[0]["code"] == "bad_options"
    events, _ = run(tiny_model(), repetitive_tokens(1), options())
    assert events[0]["type"] == "error" and events[0]["code"] == "bad_data"


def test_a_recipe_run_directly_brings_its_own_chunk() -> None:
    # evaluate_model(ttt_recipe=R) with no chunk in the options chunks by R's reference chunk, not by the named
    # recipe's, so the start event's chunk_tokens and ttt_recipe_settings.chunk_tokens agree.
    recipe = replace(STRONG_SGD, chunk_tokens=64)
    events, _ = run(tiny_model(), repetitive_tokens(200), options(chunk_tokens=None, ttt=True), ttt_recipe=recipe)
    config = events[0]["config"]
    assert config["chunk_tokens"] == config["ttt_recipe_settings"]["chunk_tokens"] == 64
    assert events[0]["chunks"] == len(events) - 2 >= 3  # 199 targets in chunks of 64


def test_a_nan_distribution_sum_or_gap_reaches_the_c2_figures() -> None:
    # Python's min/max drop a NaN depending on argument order; after one good batch a NaN sum used to vanish.
    good, bad = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, float("nan")], dtype=torch.float64)
    for first, second in ((good, bad), (bad, good)):
        check = DistributionCheck()
        for batch in (first, second):
            check.add(batch, batch.numel(), gaps=torch.where(batch.isnan(), batch, 0.0))  # NaN gap where NaN sum
        assert math.isnan(check.sum_error_max) and math.isnan(check.gap_max)
        merged = DistributionCheck()
        merged.add(good, 3)
        merged.merge(check)  # ranks are merged the same way
        assert math.isnan(merged.sum_error_max) and math.isnan(merged.gap_max)
    honest = DistributionCheck()
    honest.add(good, 3, gaps=torch.zeros(3, dtype=torch.float64))
    assert honest.sum_error_max == 0.0 and honest.gap_max == 0.0
