"""Token, document and byte statistics of a data split, with the exact byte accounting of the metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.data.byte_accounting import ByteTables
from trainer.data.shards import read_shard, shard_paths


def resolve_tokenizer(data_dir: Path | str, tokenizer: Path | str | None) -> Path:
    """The tokenizer given, or the one named by ``manifest.json`` in the data directory (embedded corpus)."""
    if tokenizer is not None:
        return Path(tokenizer)
    manifest = Path(data_dir) / "manifest.json"
    if manifest.exists():
        name = json.loads(manifest.read_text()).get("tokenizer", {}).get("file")
        if name:
            return Path(data_dir) / name
    raise FileNotFoundError(f"no --tokenizer given and {manifest} names none")


def split_stats(data_dir: Path | str, tokenizer: Path | str, split: str = "val") -> dict:
    import sentencepiece as spm

    tables = ByteTables.from_model_file(tokenizer)
    bos_id = spm.SentencePieceProcessor(model_file=str(tokenizer)).bos_id()
    paths = shard_paths(data_dir, split)
    parts = [read_shard(p, len(tables.base_bytes)) for p in paths]
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    byte_count = tables.total_bytes(tokens)
    targets = int(tokens.size - 1)
    return {
        "split": split,
        "shards": [p.name for p in paths],
        "tokens": int(tokens.size),
        "docs": int(np.count_nonzero(tokens == bos_id)),
        "targets": targets,
        "bytes": byte_count,
        "bytes_per_token": byte_count / targets if targets else 0.0,
        "tokenizer_sha256": tables.sha256,
        "vocab_size": tables.vocab_size,
    }
