"""Exact byte accounting for bits per byte, as the reference metric defines it (reference-stack §3).

A target counts ``base_bytes[t] + (has_leading_space[t] and not is_boundary[previous token])`` bytes: the '▁' of
a word-initial piece is not counted after BOS or another boundary (control, unknown, unused piece); byte-fallback
pieces count one byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORD_MARK = "\u2581"  # '▁'


@dataclass(frozen=True)
class ByteTables:
    base_bytes: np.ndarray  # int16 [V]
    has_leading_space: np.ndarray  # bool [V]
    is_boundary: np.ndarray  # bool [V]
    sha256: str  # of the tokenizer model file
    vocab_size: int  # SentencePiece vocabulary size

    @classmethod
    def from_model_file(cls, path: Path | str, vocab_size: int | None = None) -> ByteTables:
        """Tables of ``max(sp vocab, vocab_size)`` entries."""
        import sentencepiece as spm

        path = Path(path)
        blob = path.read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=blob)
        sp_vocab = sp.vocab_size()
        size = max(sp_vocab, vocab_size or 0)
        base = np.zeros(size, dtype=np.int16)
        lead = np.zeros(size, dtype=bool)
        boundary = np.ones(size, dtype=bool)  # ids beyond the sp vocab: boundary, 0 bytes
        for i in range(sp_vocab):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(WORD_MARK):
                lead[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(base, lead, boundary, hashlib.sha256(blob).hexdigest(), sp_vocab)

    def target_bytes(self, prev_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
        prev_ids = np.asarray(prev_ids, dtype=np.int64)
        target_ids = np.asarray(target_ids, dtype=np.int64)
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].astype(np.int64) + space

    def total_bytes(self, tokens: np.ndarray, block: int = 1 << 22) -> int:
        """Σ bytes of targets 1..N−1, in blocks: a 62M-token stream needs no 500 MB temporary."""
        total = 0
        for lo in range(1, len(tokens), block):
            hi = min(lo + block, len(tokens))
            total += int(self.target_bytes(tokens[lo - 1 : hi - 1], tokens[lo:hi]).sum())
        return total

