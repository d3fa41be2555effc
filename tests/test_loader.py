from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data.loader import DistributedTokenLoader, rank_span
from trainer.data.shards import load_validation_tokens
from trainer.data.writer import write_shard
from trainer.evaluate import whole_sequences


@pytest.fixture()
def stream_dir(tmp_path: Path) -> Path:
    # Two train shards of different lengths so spans cross a shard boundary and wrap around.
    write_shard(tmp_path / "d_train_000000.bin", np.arange(0, 700, dtype=np.uint16))
    write_shard(tmp_path / "d_train_000001.bin", np.arange(700, 1000, dtype=np.uint16))
    write_shard(tmp_path / "d_val_000000.bin", np.arange(2000, 2107, dtype=np.uint16))
    return tmp_path


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_spans_are_disjoint_and_cover_the_chunk(world_size: int) -> None:
    chunk = 8 * 17
    covered = np.zeros(chunk, dtype=int)
    for rank in range(world_size):
        start, end = rank_span(chunk, rank, world_size)
        covered[start:end] += 1
    assert (covered == 1).all()


def test_each_rank_gets_its_contiguous_span_of_the_same_chunk(stream_dir: Path) -> None:
    world, seq, global_tokens = 4, 8, 4 * 2 * 8
    loaders = [DistributedTokenLoader(stream_dir, rank, world) for rank in range(world)]
    for step in range(12):  # 12 steps × 4 ranks × 17 tokens > 1000: crosses shards and wraps
        xs, ys = zip(*(loader.next_batch(global_tokens, seq, 1) for loader in loaders), strict=True)
        spans = [torch.cat([x.flatten(), y.flatten()[-1:]]) for x, y in zip(xs, ys, strict=True)]
        whole = torch.cat(spans).numpy()
        start = step * world * 17
        expected = np.arange(start, start + world * 17) % 1000
        np.testing.assert_array_equal(whole, expected)
        for x, y in zip(xs, ys, strict=True):
            assert x.shape == (2, seq) and x.dtype == torch.int64
            torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1])


def test_grad_accumulation_keeps_the_global_batch_invariant(stream_dir: Path) -> None:
    """1 rank × 2 micro-steps sees exactly the tokens that 2 ranks × 1 micro-step see."""
    single = DistributedTokenLoader(stream_dir, 0, 1)
    pair = [DistributedTokenLoader(stream_dir, r, 2) for r in range(2)]
    for _ in range(5):
        micro = [single.next_batch(64, 16, 2) for _ in range(2)]
        ranks = [loader.next_batch(64, 16, 1) for loader in pair]
        for (x1, y1), (x2, y2) in zip(micro, ranks, strict=True):
            torch.testing.assert_close(x1, x2)
            torch.testing.assert_close(y1, y2)


def test_batch_that_does_not_split_into_sequences_is_refused(stream_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a positive multiple"):
        DistributedTokenLoader(stream_dir, 0, 2).next_batch(100, 16, 1)
    with pytest.raises(ValueError, match="outside world size"):
        DistributedTokenLoader(stream_dir, 2, 2)


def test_validation_truncates_like_the_reference(stream_dir: Path) -> None:
    full = load_validation_tokens(stream_dir)
    assert full.size == 107
    truncated = whole_sequences(full, 16)
    assert truncated.size == (106 // 16) * 16 + 1 == 97
    np.testing.assert_array_equal(truncated, full[:97])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        whole_sequences(full, 200)
