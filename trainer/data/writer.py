"""Writing a data directory: shards in the official format (read by trainer/data/shards.py) and the manifest that
records the val split's digest (read by trainer/data/val_manifest.py). Only the data builders and tests write;
an evaluation only reads, so this module is not counted code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from trainer.data.shards import HEADER_BYTES, HEADER_WORDS, MAGIC, VERSION, read_shard
from trainer.data.val_manifest import MANIFEST_NAME, tokens_sha256

MAX_TOKENS = 2**31 - 1  # the header's int32 token count


def write_shard(path: Path | str, tokens: np.ndarray) -> int:
    """Write tokens in the official format atomically (temporary name, then rename). Returns bytes written."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"{path}: a shard needs a non-empty 1-D token array, got shape {tokens.shape}")
    if tokens.size > MAX_TOKENS:
        raise ValueError(f"{path}: {tokens.size} tokens exceed the format's limit of {MAX_TOKENS}")
    if tokens.min() < 0 or tokens.max() >= 2**16:
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
    return HEADER_BYTES + 2 * tokens.size



def write_val_manifest(data_dir: Path | str, val_files: list[str]) -> str:
    """Write DATA_DIR/manifest.json recording the digest of the val shards ``val_files`` (in order), for a data
    directory that has no manifest of its own (a download, or data laid out by hand). Returns the digest."""
    data_dir = Path(data_dir)
    tokens = np.concatenate([read_shard(data_dir / name) for name in val_files])
    digest = tokens_sha256(tokens)
    manifest = {"name": data_dir.name, "splits": {"val": {"files": list(val_files), "tokens": int(tokens.size),
                                                          "tokens_sha256": digest}}}
    partial = data_dir / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, data_dir / MANIFEST_NAME)
    return digest
