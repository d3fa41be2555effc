"""Window and chunk planning: every target position 1..N−1 is scored exactly once, in contiguous chunks."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.options import EvalOptions
from service.engine.windows import build_batch, plan_chunks, plan_windows, rank_share

GEOMETRIES = [
    # (num_tokens, seq_len, stride, chunk_tokens)
    (2, 8, 4, 16),  # a single target
    (5, 8, 4, 16),  # N < seq: one short window
    (9, 8, 4, 16),  # N − 1 == seq exactly
    (10, 8, 4, 16),  # one target past the first window
    (1000, 64, 16, 128),  # ragged tail
    (1001, 64, 16, 128),  # targets a multiple of the chunk
    (777, 64, 64, 100),  # non-overlapping (stride == seq), chunk not a multiple of stride
    (333, 32, 1, 50),  # stride 1
    (500, 32, 7, 3),  # chunk smaller than the stride: empty chunks dropped
    (4097, 256, 64, 1024),
]


def scored_positions(plan) -> np.ndarray:
    return np.concatenate([np.arange(a, e + 1) for a, e in zip(plan.score_from, plan.ends, strict=True)])


@pytest.mark.parametrize("num_tokens,seq_len,stride,chunk_tokens", GEOMETRIES)
def test_every_target_is_scored_exactly_once(num_tokens: int, seq_len: int, stride: int, chunk_tokens: int) -> None:
    plan = plan_windows(num_tokens, seq_len, stride)
    positions = scored_positions(plan)
    assert len(positions) == num_tokens - 1
    assert np.array_equal(np.sort(positions), np.arange(1, num_tokens))
    # Windows never exceed seq_len inputs and never read past the last token.
    assert np.all(plan.ends - plan.starts <= seq_len) and np.all(plan.ends <= num_tokens - 1)
    # Every scored target except those of the first window has at least seq − stride tokens of context.
    later = plan.score_from[1:] - 1 - plan.starts[1:]
    assert np.all(later == seq_len - stride)


@pytest.mark.parametrize("num_tokens,seq_len,stride,chunk_tokens", GEOMETRIES)
def test_chunks_are_contiguous_and_match_their_windows(num_tokens: int, seq_len: int, stride: int,
                                                       chunk_tokens: int) -> None:
    plan = plan_windows(num_tokens, seq_len, stride)
    chunks = plan_chunks(plan, chunk_tokens)
    assert chunks[0].target_lo == 1 and chunks[-1].target_hi == num_tokens
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.target_hi == after.target_lo and before.window_hi == after.window_lo
    for chunk in chunks:
        assert chunk.num_targets > 0
        first_scored_x = plan.score_from[chunk.window_lo : chunk.window_hi] - 1
        assert np.all(first_scored_x // chunk_tokens == first_scored_x[0] // chunk_tokens)
        covered = np.concatenate([np.arange(plan.score_from[w], plan.ends[w] + 1)
                                  for w in range(chunk.window_lo, chunk.window_hi)])
        assert np.array_equal(covered, np.arange(chunk.target_lo, chunk.target_hi))


@pytest.mark.parametrize("num_tokens,seq_len,stride,chunk_tokens", GEOMETRIES)
def test_batches_point_each_output_at_its_target(num_tokens: int, seq_len: int, stride: int,
                                                 chunk_tokens: int) -> None:
    rng = np.random.default_rng(num_tokens)
    tokens = rng.integers(0, 50_000, size=num_tokens)
    plan = plan_windows(num_tokens, seq_len, stride)
    seen = []
    for lo in range(0, len(plan), 3):
        batch = build_batch(tokens, plan, lo, min(lo + 3, len(plan)))
        starts = plan.starts[lo:][batch.rows]
        # Output (row, col) sees inputs tokens[start .. start+col] and predicts tokens[start+col+1].
        assert np.array_equal(batch.positions, starts + batch.cols + 1)
        assert np.array_equal(batch.inputs[batch.rows, batch.cols], tokens[batch.positions - 1])
        assert np.all(batch.cols < (plan.ends - plan.starts)[lo:][batch.rows])
        seen.append(batch.positions)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(1, num_tokens))


def test_default_chunks_hold_exactly_the_reference_target_ranges() -> None:
    """Reference §7.3: with chunk C a multiple of the stride, chunk c scores targets c·C+1 … (c+1)·C."""
    chunk_tokens = 131_072
    num_tokens = 3 * chunk_tokens + 12_345 + 1
    chunks = plan_chunks(plan_windows(num_tokens, 2048, 64), chunk_tokens)
    assert len(chunks) == 4
    for c, chunk in enumerate(chunks[:-1]):
        assert (chunk.target_lo, chunk.target_hi) == (c * chunk_tokens + 1, (c + 1) * chunk_tokens + 1)
    assert (chunks[-1].target_lo, chunks[-1].target_hi) == (3 * chunk_tokens + 1, num_tokens)


def test_fixed_tail_rule_drops_the_reference_double_counted_windows() -> None:
    """62,021,632 targets at seq 2048 / stride 64: the old rule kept 969,088 windows, whose last 31 only
    re-scored the tail; the fixed rule keeps 969,057."""
    plan = plan_windows(62_021_632 + 1, 2048, 64)
    assert len(plan) == 969_088 - 31
    assert int((plan.ends + 1 - plan.score_from).sum()) == 62_021_632


def test_rank_shares_split_contiguously() -> None:
    for count, world in [(0, 2), (1, 2), (7, 3), (64, 8)]:
        shares = [rank_share(10, 10 + count, r, world) for r in range(world)]
        assert shares[0][0] == 10 and shares[-1][1] == 10 + count
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_impossible_geometries_are_refused() -> None:
    # The planner trusts its geometry: EvalOptions.validate is the one check, run before any plan is made.
    with pytest.raises(ValueError, match="stride"):
        EvalOptions(seq_len=8, stride=16).validate()
    with pytest.raises(ValueError):
        EvalOptions(seq_len=0, stride=1).validate()
    with pytest.raises(ValueError, match="chunk_tokens"):
        EvalOptions(chunk_tokens=0).validate()
    assert len(plan_windows(1, 8, 4)) == 0
