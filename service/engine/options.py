"""Options of one evaluation, shared by the CLI, the HTTP service and the Python API."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Kept here, free of torch, so the CLI and the HTTP service can name the modes without loading the engine.
NGRAM_MODES = ("off", "exact", "smoothed", "tilt", "hashed-940")
TTT_RECIPE_NAMES = ("pr940", "legal-sgd")


UPSTREAM_SUFFIX = ".ptz"  # what every upstream script names its artifact (final_model.int8.ptz, ….int6.ptz)


def is_upstream_artifact(path: Path | str) -> bool:
    """Upstream artifacts are told apart by their name; the .pgolf reader checks its own magic."""
    return Path(path).suffix.lower() == UPSTREAM_SUFFIX


@dataclass(frozen=True)
class EvalOptions:
    artifact: Path | None = None  # the submission artifact (None only for evaluate_model with an in-memory model)
    data_dir: Path | None = None  # directory holding the *_val_*.bin shards
    tokenizer: Path | None = None  # SentencePiece model of the data; default DATA_DIR/tokenizer.model
    seq_len: int = 2048
    stride: int = 64  # stride == seq_len gives the non-overlapping evaluation
    chunk_tokens: int = 131_072  # TTT chunk; also the granularity of the streamed chunk events
    batch_windows: int = 32  # windows per forward pass (per rank)
    ttt: bool = False
    ttt_recipe: str = "pr940"
    ngram: str = "off"  # off | exact | smoothed | tilt | hashed-940 (the last is the upstream, non-compliant scoring)
    max_seconds: float = 600.0  # wall-clock budget, checked between chunks
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_tokens: int | None = None  # evaluate only a prefix of the stream (a preview, not a full-val score)
    # Upstream (.ptz) artifacts only: the submission's train_gpt.py, whose Hyperparameters give the model config,
    # and the KEY=VALUE settings of its run command. Both are ignored, with a note, for a .pgolf artifact.
    code: Path | None = None
    env: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ValueError with a plain message for any option outside its domain."""
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if not 1 <= self.stride <= self.seq_len:
            raise ValueError(f"stride must be in [1, seq_len={self.seq_len}], got {self.stride}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.batch_windows < 1:
            raise ValueError(f"batch_windows must be positive, got {self.batch_windows}")
        if self.ttt_recipe not in TTT_RECIPE_NAMES:
            raise ValueError(f"unknown TTT recipe {self.ttt_recipe!r}; choose one of {', '.join(TTT_RECIPE_NAMES)}")
        if self.ngram not in NGRAM_MODES:
            raise ValueError(f"unknown n-gram mode {self.ngram!r}; choose one of {', '.join(NGRAM_MODES)}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one target), got {self.max_tokens}")

    def resolved_tokenizer(self) -> Path:
        if self.tokenizer is not None:
            return Path(self.tokenizer)
        if self.data_dir is None:
            raise ValueError("no tokenizer given and no data directory to look for tokenizer.model in")
        return Path(self.data_dir) / "tokenizer.model"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings) for the start event."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}
