"""The identity of a validation stream, so "scored the full validation set" is a comparison of two digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a data manifest is a few kB; anything larger is not one of ours


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).hexdigest()


def recorded_val_sha256(data_dir: Path | str) -> str | None:
    """``splits.val.tokens_sha256`` of DATA_DIR/manifest.json, or None."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        digest = json.loads(path.read_text(encoding="utf-8"))["splits"]["val"]["tokens_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and len(digest) == 64 else None
