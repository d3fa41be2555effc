"""Writing artifacts (format v1, specified in docs/artifact-format.md): quantise, encode, fit to the budget.

``write_artifact`` encodes one quantisation; ``export_to_budget`` walks the fit-to-budget ladder (reference §6.4)
and writes the first rung that fits beside the counted code. Every encoded file is checked with the reader's own
manifest and model checks before it is written. Evaluation never imports this module (it only reads).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import zstandard

from trainer.artifact import FORMAT_VERSION, HEADER, MAGIC, SUBMISSION_LIMIT_BYTES, check_against_model
from trainer.artifact_metadata import validate_manifest
from trainer.encodings import INT5_ROW, INT6_ROW, QuantizedTensor
from trainer.model import ModelConfig
from trainer.quant import PGOLF_SCHEME, block_index, quantize_state_dict, quantize_tensor

if TYPE_CHECKING:
    from trainer.code_bytes import CodeBytes

ZSTD_LADDER_LEVELS = (16, 1, 17, 2)  # PR #761 fork order: first level that fits wins


class BudgetExceeded(RuntimeError):
    """No rung of the fit-to-budget ladder produced an artifact under the limit."""


def encode_artifact(
    tensors: Sequence[QuantizedTensor],
    *,
    model_config: ModelConfig,
    tokenizer_sha256: str,
    vocab_size: int,
    training: Mapping[str, Any],
    code_bytes: CodeBytes,
    level: int,
) -> bytes:
    """The complete file bytes for already-quantised tensors. Validates what it writes with the reader's checks."""
    records, raw = _layout_payload(tensors)
    compressed = zstandard.ZstdCompressor(level=level).compress(raw)
    manifest = {
        "model_config": asdict(model_config),
        "tokenizer": {"sha256": tokenizer_sha256, "vocab_size": vocab_size},
        "tensors": records,
        "payload": {
            "compression": "zstd",
            "level": level,
            "compressed_nbytes": len(compressed),
            "compressed_sha256": hashlib.sha256(compressed).hexdigest(),
            "raw_nbytes": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
        },
        "training": dict(training),
        "code_bytes": {"total": code_bytes.total, "files": dict(code_bytes.files)},
    }
    check_against_model(manifest, validate_manifest(manifest))
    manifest_bytes = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes)) + manifest_bytes + compressed


def _layout_payload(tensors: Sequence[QuantizedTensor]) -> tuple[list[dict[str, Any]], bytes]:
    records: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for qt in tensors:
        values = qt.values.tobytes()
        record: dict[str, Any] = {
            "name": qt.name,
            "encoding": qt.encoding,
            "dtype": qt.dtype,
            "shape": list(qt.shape),
            "offset": offset,
            "nbytes": len(values),
        }
        chunks.append(values)
        offset += len(values)
        if qt.scales is not None:
            scales = qt.scales.tobytes()
            record["scale_offset"] = offset
            record["scale_nbytes"] = len(scales)
            chunks.append(scales)
            offset += len(scales)
        records.append(record)
    return records, b"".join(chunks)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_artifact(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    tokenizer_sha256: str,
    vocab_size: int,
    training: Mapping[str, Any],
    *,
    code_bytes: CodeBytes,
    int5_blocks: Iterable[int] = (),
    level: int = ZSTD_LADDER_LEVELS[0],
    scheme: str = PGOLF_SCHEME,
) -> int:
    """Quantise ``state_dict`` and write one artifact atomically (temp file + rename). Returns its size."""
    data = encode_artifact(
        quantize_state_dict(state_dict, int5_blocks=int5_blocks, scheme=scheme),
        model_config=model_config,
        tokenizer_sha256=tokenizer_sha256,
        vocab_size=vocab_size,
        training=training,
        code_bytes=code_bytes,
        level=level,
    )
    _write_atomically(Path(path), data)
    return len(data)


@dataclass(frozen=True)
class LadderAttempt:
    label: str  # "int6", or "int6+int5xK" with K blocks downgraded
    level: int
    int5_blocks: tuple[int, ...]
    nbytes: int
    fits: bool


@dataclass(frozen=True)
class ExportResult:
    path: Path
    artifact_nbytes: int
    code_nbytes: int
    limit: int  # the artifact's own limit: budget minus counted code bytes
    winner: LadderAttempt
    attempts: list[LadderAttempt]  # every try, in order, the winner last

    @property
    def total_nbytes(self) -> int:
        return self.artifact_nbytes + self.code_nbytes


def int5_downgrade_order(num_layers: int) -> list[int]:
    """Middle layer first, then outward, right before left: 11 layers give 5, 6, 4, 7, 3, 8, 2, 9, 1, 10, 0."""
    middle = num_layers // 2
    order = [middle]
    for distance in range(1, num_layers):
        order += [i for i in (middle + distance, middle - distance) if 0 <= i < num_layers]
    return order


def export_to_budget(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    tokenizer_sha256: str,
    vocab_size: int,
    training: Mapping[str, Any],
    *,
    code_bytes: CodeBytes,
    budget_bytes: int = SUBMISSION_LIMIT_BYTES,
    log: Callable[[str], None] = print,
    scheme: str = PGOLF_SCHEME,
) -> ExportResult:
    """Write the first artifact that fits ``budget_bytes - code_bytes.total`` (reference §6.4).

    Phase 1 tries all-int6 at zstd levels 16, 1, 17, 2. Phase 2 downgrades block matrices to int5 one block at a
    time from the middle layer outward, retrying the levels after each block. ``scheme`` picks the row
    quantiser (trainer/quant.py: pgolf's clip search, or the seed's own export). Every attempt is logged as
    ``quant_try <label> zstd-<level>: N bytes (limit L)``. If nothing fits, raises BudgetExceeded and writes nothing.
    """
    limit = budget_bytes - code_bytes.total
    names = list(state_dict)
    int6 = {name: quantize_tensor(name, t, block_encoding=INT6_ROW, scheme=scheme) for name, t in state_dict.items()}
    int5_cache: dict[str, QuantizedTensor] = {}
    attempts: list[LadderAttempt] = []

    def encoded_for(blocks: tuple[int, ...], level: int) -> bytes:
        tensors = []
        for name in names:
            if block_index(name) in blocks and int6[name].encoding == INT6_ROW:
                if name not in int5_cache:
                    int5_cache[name] = quantize_tensor(name, state_dict[name], block_encoding=INT5_ROW,
                                                       scheme=scheme)
                tensors.append(int5_cache[name])
            else:
                tensors.append(int6[name])
        return encode_artifact(
            tensors,
            model_config=model_config,
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            training=training,
            code_bytes=code_bytes,
            level=level,
        )

    downgrade = int5_downgrade_order(model_config.num_layers)
    for count in range(len(downgrade) + 1):
        blocks = tuple(downgrade[:count])
        label = "int6" if count == 0 else f"int6+int5x{count}"
        for level in ZSTD_LADDER_LEVELS:
            data = encoded_for(blocks, level)
            attempt = LadderAttempt(label, level, blocks, len(data), len(data) <= limit)
            attempts.append(attempt)
            log(f"quant_try {label} zstd-{level}: {len(data)} bytes (limit {limit})")
            if attempt.fits:
                out = Path(path)
                _write_atomically(out, data)
                log(f"quant_choice {label} zstd-{level} int5_blocks:{list(blocks)}")
                log(f"Serialized model {label}+zstd-{level}: {len(data)} bytes")
                log(f"Code size: {code_bytes.total} bytes")
                log(f"Total submission size: {len(data) + code_bytes.total} bytes")
                return ExportResult(out, len(data), code_bytes.total, limit, attempt, attempts)
    smallest = min(a.nbytes for a in attempts)
    raise BudgetExceeded(
        f"no quantisation fits: smallest artifact {smallest} bytes > limit {limit} "
        f"(budget {budget_bytes} - code {code_bytes.total}) after {len(attempts)} attempts; nothing written"
    )
