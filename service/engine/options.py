"""Options of one evaluation, shared by the CLI, the HTTP service and the Python API; torch-free, so those can
name the modes and recipes without loading the engine. The defaults were chosen by measurement (README,
"Measured"); ``PLAIN`` is the reference's plain sliding-window score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from trainer.limits import EVAL_LIMIT_SECONDS

NGRAM_MODES = ("off", "exact", "smoothed", "tilt", "hashed-940")
UNTRAINED_CHUNK_TOKENS = 131_072  # without TTT the chunk is only the granularity of the streamed events
FALLBACK_SEQ_LEN = 2048  # the challenge's sequence length, for a model whose artifact does not record its own


@dataclass(frozen=True)
class TTTRecipe:
    name: str
    optimizer: str  # "adamw" | "sgd"
    lr: float
    epochs: int
    freeze_blocks: int
    grad_clip: float
    lr_schedule: str  # "constant" | "cosine" over chunks
    chunk_tokens: int  # the reference chunk, used unless the options name one
    weight_decay: float = 0.0
    momentum: float = 0.0
    batch_sequences: int = 32  # sequences per optimizer step, across all ranks

    def lr_for_chunk(self, chunk_index: int, num_chunks: int) -> float:
        if self.lr_schedule == "constant" or num_chunks <= 1:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * chunk_index / (num_chunks - 1)))


RECIPES: dict[str, TTTRecipe] = {  # docs/evaluation.md §4
    "pr940": TTTRecipe(name="pr940", optimizer="adamw", lr=1e-4, epochs=4, freeze_blocks=2, grad_clip=1.0,
                       lr_schedule="constant", chunk_tokens=131_072, batch_sequences=64),
    "legal-sgd": TTTRecipe(name="legal-sgd", optimizer="sgd", lr=0.002, epochs=3, freeze_blocks=0, grad_clip=1.0,
                           lr_schedule="cosine", chunk_tokens=32_768, momentum=0.9),
}
TTT_RECIPE_NAMES = tuple(RECIPES)

PLAIN = {"ttt": False, "ngram": "off"}


UPSTREAM_SUFFIX = ".ptz"  # what every upstream script names its artifact (final_model.int8.ptz, ….int6.ptz)


def is_upstream_artifact(path: Path | str) -> bool:
    """Upstream artifacts are told apart by their name; the .pgolf reader checks its own magic."""
    return Path(path).suffix.lower() == UPSTREAM_SUFFIX


@dataclass(frozen=True)
class EvalOptions:
    artifact: Path | None = None  # the submission artifact (None only for evaluate_model with an in-memory model)
    data_dir: Path | None = None  # holds the *_val_*.bin shards
    tokenizer: Path | None = None  # default DATA_DIR/tokenizer.model
    seq_len: int | None = None  # None: the artifact's training sequence length (FALLBACK_SEQ_LEN if unrecorded)
    stride: int | None = 64  # None (or seq_len): the non-overlapping evaluation
    chunk_tokens: int | None = None  # None: the TTT recipe's chunk (UNTRAINED_CHUNK_TOKENS without TTT)
    batch_windows: int = 32  # per forward pass and rank
    ttt: bool = True
    ttt_recipe: str = "legal-sgd"
    ngram: str = "smoothed"  # one of NGRAM_MODES
    max_seconds: float = EVAL_LIMIT_SECONDS  # wall-clock budget, checked between chunks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_tokens: int | None = None  # evaluate only a prefix of the stream (a preview, not a full-val score)
    # .ptz only (ignored, with a note, for .pgolf): the submission's train_gpt.py and its run command's KEY=VALUEs.
    code: Path | None = None
    env: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ValueError for any option outside its domain; the one check of the window geometry."""
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.stride is not None and (self.stride < 1 or (self.seq_len is not None and self.stride > self.seq_len)):
            raise ValueError(f"stride must be in [1, seq_len={self.seq_len}], got {self.stride}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.batch_windows < 1:
            raise ValueError(f"batch_windows must be positive, got {self.batch_windows}")
        if self.ttt_recipe not in RECIPES:
            raise ValueError(f"unknown TTT recipe {self.ttt_recipe!r}; choose one of {', '.join(TTT_RECIPE_NAMES)}")
        if self.ngram not in NGRAM_MODES:
            raise ValueError(f"unknown n-gram mode {self.ngram!r}; choose one of {', '.join(NGRAM_MODES)}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one target), got {self.max_tokens}")

    def resolved(self, train_seq_len: int | None = None, recipe: TTTRecipe | None = None) -> EvalOptions:
        """seq_len from the artifact's ``train_seq_len``, the chunk from the TTT recipe run (``recipe``, else the
        named one), unless given."""
        seq_len = self.seq_len if self.seq_len is not None else (train_seq_len or FALLBACK_SEQ_LEN)
        chunk_tokens = self.chunk_tokens
        if chunk_tokens is None:  # an unknown recipe leaves None, for validate() to refuse the name
            recipe = recipe or RECIPES.get(self.ttt_recipe)
            if not self.ttt:
                chunk_tokens = UNTRAINED_CHUNK_TOKENS
            elif recipe:
                chunk_tokens = recipe.chunk_tokens
        return replace(self, seq_len=seq_len, stride=seq_len if self.stride is None else self.stride,
                       chunk_tokens=chunk_tokens)

    def resolved_tokenizer(self) -> Path:  # the engine refuses a missing data_dir first
        return Path(self.tokenizer) if self.tokenizer is not None else Path(self.data_dir) / "tokenizer.model"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings) for the start event."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}
