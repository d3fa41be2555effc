"""The official shard format: 256 little-endian int32 header words (magic 20240520, version 1, token count,
zeros), then `count` little-endian uint16 token ids, nothing more. Every reader refuses a malformed file here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4


class ShardError(ValueError):
    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.problem = problem


def read_header(path: Path | str) -> int:
    """The token count, once the header and the file size agree with the format."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise ShardError(path, f"cannot read shard ({exc.strerror or exc})") from exc
    if len(raw) < HEADER_BYTES:
        raise ShardError(path, f"truncated header: {len(raw)} bytes, expected {HEADER_BYTES}")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise ShardError(path, f"bad magic {int(header[0])}, expected {MAGIC}")
    if int(header[1]) != VERSION:
        raise ShardError(path, f"unsupported version {int(header[1])}, expected {VERSION}")
    count = int(header[2])
    if count < 0:
        raise ShardError(path, f"negative token count {count}")
    if count == 0:
        raise ShardError(path, "empty shard: token count is 0")
    expected = HEADER_BYTES + 2 * count
    declared = f"header declares {count} tokens ({expected} bytes), file has {size} bytes"
    if size < expected:
        raise ShardError(path, f"truncated: {declared}")
    if size > expected:
        raise ShardError(path, f"size mismatch: {declared}")
    return count


def read_shard(path: Path | str, vocab_size: int | None = None, *, mmap: bool = False) -> np.ndarray:
    """The token ids, each below ``vocab_size`` if given; ``mmap`` maps the file (training)."""
    path = Path(path)
    count = read_header(path)
    if mmap:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    else:
        tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            position = int(np.argmax(tokens >= vocab_size))
            raise ShardError(path, f"token id {top} at position {position} is outside the vocabulary "
                                   f"(size {vocab_size})")
    return tokens


def shard_paths(data_dir: Path | str, split: str) -> list[Path]:
    data_dir = Path(data_dir)
    paths = sorted(data_dir.glob(f"*_{split}_*.bin"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin) in {data_dir}")
    return paths


def load_validation_tokens(data_dir: Path | str, vocab_size: int | None = None) -> np.ndarray:
    """All val shards, in order (the training-time truncation is trainer.evaluate's)."""
    parts = [read_shard(p, vocab_size) for p in shard_paths(data_dir, "val")]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
