from pathlib import Path

import numpy as np
import pytest

from trainer.data.shards import HEADER_BYTES, MAGIC, ShardError, read_shard, shard_paths
from trainer.data.writer import write_shard


def raw_shard(header: list[int], body: bytes) -> bytes:
    words = np.zeros(256, dtype="<i4")
    words[: len(header)] = header
    return words.tobytes() + body


def test_round_trip_keeps_every_token(tmp_path: Path) -> None:
    tokens = np.array([1, 5, 1023, 0, 65535], dtype=np.uint16)
    path = tmp_path / "x_val_000000.bin"
    assert write_shard(path, tokens) == HEADER_BYTES + 2 * tokens.size
    assert path.stat().st_size == 1024 + 2 * 5
    np.testing.assert_array_equal(read_shard(path), tokens)
    np.testing.assert_array_equal(read_shard(path, mmap=True), tokens)
    assert not list(tmp_path.glob("*.partial"))


def test_header_layout_is_the_official_one(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    header = np.frombuffer(path.read_bytes()[:1024], dtype="<i4")
    assert list(header[:3]) == [MAGIC, 1, 10] and not header[3:].any()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (raw_shard([123, 1, 2], b"\0" * 4), "bad magic 123"),
        (raw_shard([MAGIC, 2, 2], b"\0" * 4), "unsupported version 2"),
        (raw_shard([MAGIC, 1, 3], b"\0" * 4), "truncated: header declares 3 tokens"),
        (raw_shard([MAGIC, 1, 2], b"\0" * 6), "size mismatch: header declares 2 tokens"),
        (raw_shard([MAGIC, 1, 0], b""), "empty shard"),
        (raw_shard([MAGIC, 1, -5], b""), "negative token count"),
        (b"\0" * 100, "truncated header"),
    ],
    ids=["magic", "version", "truncated", "size-mismatch", "empty", "negative", "short-header"],
)
def test_malformed_shards_are_refused_naming_file_and_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad_val_000000.bin"
    path.write_bytes(content)
    with pytest.raises(ShardError) as info:
        read_shard(path)
    assert problem in str(info.value)
    assert str(path) in str(info.value)


def test_token_outside_vocabulary_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.bin"
    write_shard(path, np.array([1, 2, 1024, 3], dtype=np.uint16))
    read_shard(path, vocab_size=1025)
    with pytest.raises(ShardError, match=r"token id 1024 at position 2 is outside the vocabulary \(size 1024\)"):
        read_shard(path, vocab_size=1024)


def test_missing_file_is_a_shard_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="cannot read shard"):
        read_shard(tmp_path / "nope.bin")


def test_shard_paths_are_sorted_and_split_specific(tmp_path: Path) -> None:
    for name in ["d_train_000001.bin", "d_train_000000.bin", "d_val_000000.bin"]:
        write_shard(tmp_path / name, np.array([1], dtype=np.uint16))
    assert [p.name for p in shard_paths(tmp_path, "train")] == ["d_train_000000.bin", "d_train_000001.bin"]
    assert [p.name for p in shard_paths(tmp_path, "val")] == ["d_val_000000.bin"]
    with pytest.raises(FileNotFoundError):
        shard_paths(tmp_path / "empty", "val")
