"""Artifact format v1: a quantised model as plain data, and its reader (the writer is trainer/export.py).

The layout, the manifest schema, every check of the reader, in order, with its error class and every bound are
specified in docs/artifact-format.md (§1–§6). The file is hostile: nothing is unpickled or executed, every
manifest field is checked against an explicit bound before any size, count or loop depends on it, and each
refusal is its own ``ArtifactError`` subclass with a ``code`` slug; nothing else escapes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import struct
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from trainer.encodings import (
    ENCODINGS,
    FLOAT_DTYPE_NAMES,
    RAW,
    RAW_NUMPY_DTYPES,
    ROW_QMAX,
    SCALE_DTYPE,
    STORAGE_DTYPE,
    TORCH_DTYPES,
    QuantizedTensor,
    dequantize_tensor,
    num_rows,
)
from trainer.model import GPT, ModelConfig

MAGIC = b"\x89PGOLF\r\n"  # non-ASCII first byte and CRLF catch text-mode mangling, as in PNG
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII")  # magic, version, manifest length
HEADER_NBYTES = HEADER.size

SUBMISSION_LIMIT_BYTES = 16_000_000  # artifact + counted code, decimal bytes
MAX_MANIFEST_BYTES = 1 << 20  # a pr940 manifest is ~15 kB
MAX_RAW_NBYTES = 256 << 20  # hard bound on the declared decompressed payload
MAX_TENSOR_NDIM = 8
MAX_TENSORS = 4096  # a pr940 artifact has 190
MAX_NAME_CHARS = 256
MAX_MANIFEST_DEPTH = 8  # a valid manifest nests 4 deep (manifest → tensors → record → shape)
MAX_INT_DIGITS = 20  # any integer field of the format fits in 64 bits
MAX_CODE_FILES = 10_000
MAX_TRAINING_FIELDS = 256
MAX_TRAINING_STRING_CHARS = 4096
MAX_WORLD_SIZE = 1 << 16
MAX_COUNT = 2**63 - 1  # training.seed, steps, code byte counts: what a 64-bit integer holds
# Inclusive bounds of ModelConfig's numeric fields (docs/artifact-format.md §6.1). An integer field without one is
# refused; a float field without one must lie within ±DEFAULT_FLOAT_BOUND. Building the model checks the rest.
MODEL_CONFIG_BOUNDS: dict[str, tuple[float, float]] = {
    "vocab_size": (2, 1 << 17),
    "num_layers": (1, 64),
    "model_dim": (1, 8192),
    "num_heads": (1, 256),
    "num_kv_heads": (1, 256),
    "mlp_mult": (1, 16),
    "rope_dims": (0, 8192),
    "rope_train_seq_len": (1, 1 << 20),
    "xsa_last_n": (0, 64),
    "bigram_buckets": (0, 1 << 20),
    "bigram_dim": (0, 8192),
    "bos_id": (0, 1 << 17),
    "leaky_relu_slope": (-1.0, 1.0),
    "rope_base": (1.0, 1e12),
    "logit_softcap": (1e-3, 1e4),
    "tied_embed_init_std": (0.0, 10.0),
    "qk_gain_init": (-1e3, 1e3),
    "attn_gate_bias_init": (-1e3, 1e3),
}
DEFAULT_FLOAT_BOUND = 1e6
# Weights must also be finite in the dtypes the model computes in (bf16 under CUDA autocast), or it computes inf.
COMPUTE_DTYPES = (torch.bfloat16,)
_DECOMPRESS_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# Errors: one class per refusal, each with a stable slug for the service and verifier.


class ArtifactError(ValueError):
    code = "artifact_error"


class FileTooLarge(ArtifactError):
    code = "file_too_large"


class Truncated(ArtifactError):
    code = "truncated"


class TrailingData(ArtifactError):
    code = "trailing_data"


class BadMagic(ArtifactError):
    code = "bad_magic"


class UnsupportedVersion(ArtifactError):
    code = "unsupported_version"


class ManifestTooLarge(ArtifactError):
    code = "manifest_too_large"


class ManifestNotJSON(ArtifactError):
    code = "manifest_not_json"


class SchemaViolation(ArtifactError):
    code = "schema_violation"


class TokenizerFieldError(ArtifactError):
    code = "bad_tokenizer"


class DeclaredSizeTooLarge(ArtifactError):
    code = "declared_size_too_large"


class HashMismatch(ArtifactError):
    code = "hash_mismatch"


class ShapeMismatch(ArtifactError):
    code = "shape_mismatch"


class DecompressionBomb(ArtifactError):
    code = "decompression_bomb"


class PayloadCorrupt(ArtifactError):
    code = "payload_corrupt"


class InvalidTensorData(ArtifactError):
    code = "invalid_tensor_data"



@dataclass(frozen=True)
class Artifact:
    manifest: dict[str, Any]
    state_dict: dict[str, torch.Tensor]  # dequantised, in manifest order, each in its recorded dtype
    file_nbytes: int
    file_sha256: str

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**_config_kwargs(self.manifest["model_config"]))


def read_artifact(path: str | os.PathLike[str], *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES) -> Artifact:
    """Read and fully validate an artifact file (docs/artifact-format.md §6)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_file_bytes:
        raise FileTooLarge(f"{path}: {size} bytes exceeds the limit of {max_file_bytes} bytes")
    with path.open("rb") as fh:
        data = fh.read(max_file_bytes + 1)  # the file may have grown since stat(); never read past the bound
    return parse_artifact(data, max_file_bytes=max_file_bytes)


def parse_artifact(data: bytes, *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES) -> Artifact:
    """Validate and decode artifact bytes already in memory (same checks as ``read_artifact``)."""
    if len(data) > max_file_bytes:
        raise FileTooLarge(f"artifact is {len(data)} bytes, over the limit of {max_file_bytes} bytes")
    manifest, payload_start = _read_header_and_manifest(data)
    validate_manifest(manifest)
    payload_info = manifest["payload"]

    expected_end = payload_start + payload_info["compressed_nbytes"]
    if len(data) < expected_end:
        raise Truncated(
            f"payload truncated: file has {len(data) - payload_start} payload bytes, "
            f"manifest declares {payload_info['compressed_nbytes']}"
        )
    if len(data) > expected_end:
        raise TrailingData(f"{len(data) - expected_end} unexpected bytes after the declared payload")
    compressed = data[payload_start:]
    digest = hashlib.sha256(compressed).hexdigest()
    if digest != payload_info["compressed_sha256"]:
        raise HashMismatch(
            f"compressed payload sha256 {digest} does not match manifest {payload_info['compressed_sha256']}"
        )

    check_against_model(manifest)
    raw = _bounded_decompress(compressed, payload_info["raw_nbytes"])
    raw_digest = hashlib.sha256(raw).hexdigest()
    if raw_digest != payload_info["raw_sha256"]:
        raise HashMismatch(f"raw payload sha256 {raw_digest} does not match manifest {payload_info['raw_sha256']}")

    state_dict = {r["name"]: _finite_as_used(r["name"], dequantize_tensor(_decode_tensor(r, raw)))
                  for r in manifest["tensors"]}
    return Artifact(manifest, state_dict, len(data), hashlib.sha256(data).hexdigest())


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[GPT, Artifact]:
    """Read an artifact and return a fresh GPT (eval mode) with its weights loaded strictly.

    Built on the meta device and assigned, so no random init is computed and thrown away; parameters keep the
    recorded dtype and are copies (test-time training updates them in place).
    """
    artifact = read_artifact(path)
    with torch.device("meta"):
        model = GPT(artifact.model_config)
    # strict: every parameter is assigned (a tensor left on meta would fail loudly in .to(device) anyway)
    model.load_state_dict({k: v.clone() for k, v in artifact.state_dict.items()}, strict=True, assign=True)
    return model.to(device).eval(), artifact


def _read_header_and_manifest(data: bytes) -> tuple[dict[str, Any], int]:
    if data[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise Truncated(f"file is {len(data)} bytes, shorter than the {HEADER_NBYTES}-byte header")
        raise BadMagic(f"not a pgolf artifact: first bytes are {data[:8]!r}, expected {MAGIC!r}")
    if len(data) < HEADER_NBYTES:
        raise Truncated(f"file is {len(data)} bytes, shorter than the {HEADER_NBYTES}-byte header")
    _, version, manifest_nbytes = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"artifact format version {version} is not supported (this reader: 1)")
    if manifest_nbytes > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest declares {manifest_nbytes} bytes, over the {MAX_MANIFEST_BYTES} limit")
    payload_start = HEADER_NBYTES + manifest_nbytes
    if len(data) < payload_start:
        raise Truncated(
            f"manifest truncated: {len(data) - HEADER_NBYTES} of {manifest_nbytes} declared bytes present"
        )
    try:
        manifest = json.loads(
            data[HEADER_NBYTES:payload_start].decode("utf-8"),
            parse_float=_finite_float,
            parse_int=_bounded_int,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestNotJSON(f"manifest is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise SchemaViolation(f"manifest must be a JSON object, got {type(manifest).__name__}")
    _check_depth(manifest)
    return manifest, payload_start


def _bounded_int(text: str) -> int:
    # No integer of the format needs more than 64 bits: refuse longer literals here, with the reader's own error,
    # rather than at Python's 4,300-digit limit, and keep every later comparison on small integers.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(text)} characters (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _check_depth(manifest: dict[str, Any]) -> None:
    """Refuse nesting deeper than any valid manifest has, iteratively (no recursion on attacker data)."""
    level: list[Any] = [manifest]
    for _ in range(MAX_MANIFEST_DEPTH):
        deeper = []
        for container in level:
            for child in container.values() if type(container) is dict else container:
                if type(child) is dict or type(child) is list:
                    deeper.append(child)
        if not deeper:
            return
        level = deeper
    raise SchemaViolation(f"manifest nests deeper than {MAX_MANIFEST_DEPTH} levels")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(text: str) -> float:
    raise ValueError(f"{text} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_show(key)}")
        obj[key] = value
    return obj


def _bounded_decompress(compressed: bytes, raw_nbytes: int) -> bytearray:
    """Decompress at most ``raw_nbytes + 1`` bytes: one byte more than declared is proof of a lie."""
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    out = bytearray()
    try:
        with dctx.stream_reader(io.BytesIO(compressed), read_across_frames=True) as reader:
            while len(out) <= raw_nbytes:
                chunk = reader.read(min(_DECOMPRESS_CHUNK, raw_nbytes + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise PayloadCorrupt(f"payload is not a valid zstd stream: {exc}") from None
    if len(out) > raw_nbytes:
        raise DecompressionBomb(f"payload decompresses past its declared raw size of {raw_nbytes} bytes")
    if len(out) < raw_nbytes:
        raise PayloadCorrupt(f"payload decompresses to {len(out)} bytes, manifest declares {raw_nbytes}")
    return out


def _finite_as_used(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Refuse a float tensor that is not finite in its restored dtype or in a dtype the model computes in: finite
    as stored is not enough (fp32 1e5 restored to float16, q · scale = 127 · 65504, fp32 max in bfloat16)."""
    if not tensor.is_floating_point():
        return tensor
    for dtype in (tensor.dtype, *COMPUTE_DTYPES):
        if not bool(torch.isfinite(tensor if dtype == tensor.dtype else tensor.to(dtype)).all()):
            raise InvalidTensorData(f"{name}: values are not finite in {str(dtype).removeprefix('torch.')}")
    return tensor


def _decode_tensor(record: Mapping[str, Any], raw: bytes | bytearray) -> QuantizedTensor:
    name, encoding, dtype = record["name"], record["encoding"], record["dtype"]
    storage = RAW_NUMPY_DTYPES[dtype] if encoding == RAW else STORAGE_DTYPE[encoding]
    values = np.frombuffer(raw, dtype=storage, count=record["nbytes"] // storage.itemsize, offset=record["offset"])
    scales = None
    if encoding in ROW_QMAX:
        qmax = ROW_QMAX[encoding]
        if values.size and int(np.abs(values.astype(np.int16)).max()) > qmax:
            raise InvalidTensorData(f"{name}: {encoding} values outside [-{qmax}, {qmax}]")
        scales = np.frombuffer(
            raw,
            dtype=SCALE_DTYPE,
            count=record["scale_nbytes"] // SCALE_DTYPE.itemsize,
            offset=record["scale_offset"],
        )
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise InvalidTensorData(f"{name}: scales must be finite and positive")
    elif encoding == RAW and dtype == "bool":
        if values.size and np.frombuffer(values.tobytes(), dtype=np.uint8).max() > 1:
            raise InvalidTensorData(f"{name}: bool bytes other than 0 and 1")
    # fp16/fp32 values: their finiteness is checked once restored (_finite_as_used)
    return QuantizedTensor(name, encoding, dtype, tuple(record["shape"]), values, scales)  # views of raw


# Manifest schema. Field sets are exact: a missing or unknown key is a violation (the training section alone may
# carry extra scalar fields, for run metadata the trainer adds later).

_TOP_LEVEL = ("model_config", "tokenizer", "tensors", "payload", "training", "code_bytes")
_PAYLOAD = ("compression", "level", "compressed_nbytes", "compressed_sha256", "raw_nbytes", "raw_sha256")
_TRAINING_REQUIRED = ("seed", "steps", "world_size", "device", "train_time_ms", "code_version")
_TENSOR_KEYS = ("name", "encoding", "dtype", "shape", "offset", "nbytes")
_SCALE_KEYS = ("scale_offset", "scale_nbytes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require_keys(obj: Any, where: str, required: Sequence[str], *, extra_ok: bool = False) -> None:
    if not isinstance(obj, dict):
        raise SchemaViolation(f"{where} must be an object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SchemaViolation(f"{where} is missing {', '.join(missing)}")
    extra = sorted(set(obj) - set(required))
    if extra and not extra_ok:
        raise SchemaViolation(f"{where} has unknown field(s) {', '.join(extra)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SchemaViolation(message)


def _show(value: Any, limit: int = 80) -> str:
    """repr of an untrusted value, cut short: refusal messages must not echo a megabyte of manifest."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Every field of a manifest against the schema (the writer runs it on what it writes, too)."""
    _require_keys(manifest, "manifest", _TOP_LEVEL)
    _config_kwargs(manifest["model_config"])
    _validate_payload(manifest["payload"])
    _validate_tensor_table(manifest["tensors"], manifest["payload"]["raw_nbytes"])
    _validate_training(manifest["training"])
    _validate_code_bytes(manifest["code_bytes"])
    _validate_tokenizer(manifest["tokenizer"], manifest["model_config"]["vocab_size"])


def _config_kwargs(config: Any) -> dict[str, Any]:
    """Check a model_config object against ModelConfig's fields, types and MODEL_CONFIG_BOUNDS; return kwargs."""
    hints, names = _model_config_fields()
    _require_keys(config, "model_config", names)
    kwargs: dict[str, Any] = {}
    for name in names:
        value, hint = config[name], hints[name]
        where = f"model_config.{name}"
        if hint is bool:
            _require(isinstance(value, bool), f"{where} must be a boolean, got {_show(value)}")
        elif hint is int:
            _require(_is_int(value), f"{where} must be an integer, got {_show(value)}")
            if name not in MODEL_CONFIG_BOUNDS:  # a new integer field: bound it before it sizes anything
                raise SchemaViolation(f"{where}: this reader has no bound for the field")
            _require_within(value, MODEL_CONFIG_BOUNDS[name], where)
        elif hint is float:
            _require(_is_number(value), f"{where} must be a finite number, got {_show(value)}")
            value = float(value)
            _require_within(value, MODEL_CONFIG_BOUNDS.get(name, (-DEFAULT_FLOAT_BOUND, DEFAULT_FLOAT_BOUND)), where)
        else:  # a ModelConfig field type this reader does not know how to validate
            raise SchemaViolation(f"{where}: unsupported field type {hint!r}")
        kwargs[name] = value
    return kwargs


@functools.cache
def _model_config_fields() -> tuple[dict[str, Any], list[str]]:
    return typing.get_type_hints(ModelConfig), [f.name for f in fields(ModelConfig)]


def _require_within(value: float, bounds: tuple[float, float], where: str) -> None:
    lo, hi = bounds
    _require(lo <= value <= hi, f"{where} is {_show(value)}, outside the bounds [{lo:g}, {hi:g}]")


def _validate_sha256(value: Any, where: str, error: type[ArtifactError] = SchemaViolation) -> None:
    if not (isinstance(value, str) and _SHA256_HEX.fullmatch(value)):
        raise error(f"{where} must be 64 lowercase hex digits, got {_show(value)}")


def _validate_payload(payload: Any) -> None:
    _require_keys(payload, "payload", _PAYLOAD)
    compression = payload["compression"]
    _require(compression == "zstd", f"payload.compression must be 'zstd', got {_show(compression)}")
    level = payload["level"]
    _require(_is_int(level) and 1 <= level <= 22, f"payload.level must be a zstd level 1-22, got {_show(level)}")
    for key in ("compressed_nbytes", "raw_nbytes"):
        _require(_is_int(payload[key]) and payload[key] >= 0, f"payload.{key} must be a non-negative integer")
    for key in ("compressed_sha256", "raw_sha256"):
        _validate_sha256(payload[key], f"payload.{key}")
    if payload["raw_nbytes"] > MAX_RAW_NBYTES:
        raise DeclaredSizeTooLarge(
            f"declared raw payload size {payload['raw_nbytes']} bytes exceeds the bound of {MAX_RAW_NBYTES}"
        )


def _validate_tensor_table(tensors: Any, raw_nbytes: int) -> None:
    """Tensor records must be well-typed and tile the raw payload exactly: no gaps, no overlaps, no tail."""
    _require(isinstance(tensors, list) and tensors, "tensors must be a non-empty list")
    _require(len(tensors) <= MAX_TENSORS, f"tensors lists {len(tensors)} records, more than the bound {MAX_TENSORS}")
    seen: set[str] = set()
    cursor = 0
    for index, record in enumerate(tensors):
        where = f"tensors[{index}]"
        _require(isinstance(record, dict), f"{where} must be an object")
        encoding = record.get("encoding")
        if encoding not in ENCODINGS:  # messages that echo a value are built only on failure: this loop is hot
            raise SchemaViolation(f"{where}.encoding {_show(encoding)} is not one of {', '.join(ENCODINGS)}")
        _require_keys(record, where, _TENSOR_KEYS + (_SCALE_KEYS if encoding in ROW_QMAX else ()))
        name = record["name"]
        _require(isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS,
                 f"{where}.name must be a string of 1 to {MAX_NAME_CHARS} characters")
        _require(name not in seen, f"{where}: duplicate tensor name {name!r}")
        seen.add(name)
        where = f"tensor {name!r}"
        dtype = record["dtype"]
        allowed = RAW_NUMPY_DTYPES if encoding == RAW else FLOAT_DTYPE_NAMES
        if not (isinstance(dtype, str) and dtype in allowed):
            raise SchemaViolation(f"{where}: dtype {_show(dtype)} cannot use encoding {encoding!r}")
        shape = record["shape"]
        # No dimension can exceed the payload bound, so the element count below is a product of small numbers.
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_NDIM
                and all(_is_int(d) and 0 <= d <= MAX_RAW_NBYTES for d in shape)):
            raise SchemaViolation(f"{where}: shape must be a list of at most {MAX_TENSOR_NDIM} non-negative integers "
                                  f"of at most {MAX_RAW_NBYTES}, got {_show(shape)}")
        numel = math.prod(shape)
        itemsize = (RAW_NUMPY_DTYPES[dtype] if encoding == RAW else STORAGE_DTYPE[encoding]).itemsize
        regions = [("offset", "nbytes", numel * itemsize)]
        if encoding in ROW_QMAX:
            _require(numel > 0, f"{where}: a row-quantised tensor cannot be empty")
            regions.append(("scale_offset", "scale_nbytes", num_rows(shape) * SCALE_DTYPE.itemsize))
        for offset_key, size_key, expected_size in regions:
            offset, size = record[offset_key], record[size_key]
            _require(_is_int(offset) and offset >= 0, f"{where}: {offset_key} must be a non-negative integer")
            _require(_is_int(size) and size == expected_size, f"{where}: {size_key} must be {expected_size}")
            if offset != cursor:
                raise SchemaViolation(f"{where}: {offset_key} {offset} "
                                      f"{'overlaps' if offset < cursor else 'leaves a gap'}; expected {cursor}")
            cursor += size
    _require(cursor == raw_nbytes, f"tensors cover {cursor} bytes but payload.raw_nbytes is {raw_nbytes}")


def _validate_training(training: Any) -> None:
    _require_keys(training, "training", _TRAINING_REQUIRED, extra_ok=True)
    _require(len(training) <= MAX_TRAINING_FIELDS, f"training has more than {MAX_TRAINING_FIELDS} fields")
    _require(_is_int(training["seed"]) and abs(training["seed"]) <= MAX_COUNT, "training.seed must be an integer")
    _require(_is_int(training["steps"]) and 0 <= training["steps"] <= MAX_COUNT,
             "training.steps must be a non-negative integer")
    _require(
        _is_int(training["world_size"]) and 1 <= training["world_size"] <= MAX_WORLD_SIZE,
        f"training.world_size must be an integer in [1, {MAX_WORLD_SIZE}]",
    )
    _require(
        _is_number(training["train_time_ms"]) and 0 <= training["train_time_ms"] <= MAX_COUNT,
        "training.train_time_ms must be a non-negative number",
    )
    for key in ("device", "code_version"):
        _require(isinstance(training[key], str), f"training.{key} must be a string")
    for key, value in training.items():
        _require(len(key) <= MAX_NAME_CHARS, f"training has a field name over {MAX_NAME_CHARS} characters")
        _require(
            value is None or isinstance(value, bool) or _is_number(value)
            or (isinstance(value, str) and len(value) <= MAX_TRAINING_STRING_CHARS),
            f"training.{key} must be a string (at most {MAX_TRAINING_STRING_CHARS} characters), number, boolean "
            f"or null",
        )


def _validate_code_bytes(code_bytes: Any) -> None:
    _require_keys(code_bytes, "code_bytes", ("total", "files"))
    files = code_bytes["files"]
    _require(
        isinstance(files, dict) and len(files) <= MAX_CODE_FILES
        and all(len(path) <= MAX_NAME_CHARS and _is_int(n) and 0 <= n <= MAX_COUNT for path, n in files.items()),
        f"code_bytes.files must map at most {MAX_CODE_FILES} paths (of at most {MAX_NAME_CHARS} characters) to "
        f"non-negative integers",
    )
    _require(
        _is_int(code_bytes["total"]) and code_bytes["total"] == sum(files.values()),
        "code_bytes.total must equal the sum of code_bytes.files",
    )


def _validate_tokenizer(tokenizer: Any, model_vocab_size: int) -> None:
    if not isinstance(tokenizer, dict) or set(tokenizer) != {"sha256", "vocab_size"}:
        raise TokenizerFieldError(
            f"tokenizer must be an object with exactly sha256 and vocab_size, got {_show(tokenizer)}")
    _validate_sha256(tokenizer["sha256"], "tokenizer.sha256", TokenizerFieldError)
    vocab = tokenizer["vocab_size"]
    if not (_is_int(vocab) and vocab > 0):
        raise TokenizerFieldError(f"tokenizer.vocab_size must be a positive integer, got {_show(vocab)}")
    if vocab != model_vocab_size:
        raise TokenizerFieldError(
            f"tokenizer.vocab_size {vocab} disagrees with model_config.vocab_size {model_vocab_size}"
        )


def check_against_model(manifest: Mapping[str, Any]) -> None:
    """The tensor table against the model the config builds (on the meta device, cheap: the config is within its
    bounds): parameter count first, then names, shapes and dtype kinds."""
    records = {r["name"]: r for r in manifest["tensors"]}
    expected = _expected_tensors(ModelConfig(**_config_kwargs(manifest["model_config"])))
    # Every parameter takes at least one byte of the decompressed payload (int8 containers are the smallest).
    parameters = sum(math.prod(shape) for shape, _ in expected.values())
    raw_nbytes = manifest["payload"]["raw_nbytes"]
    if parameters > raw_nbytes:
        raise ShapeMismatch(
            f"model_config describes {parameters} parameters, which need at least {parameters} bytes, but "
            f"payload.raw_nbytes declares {raw_nbytes}"
        )
    missing = [n for n in expected if n not in records]
    unexpected = [n for n in records if n not in expected]
    if missing or unexpected:
        raise ShapeMismatch(
            f"tensor names disagree with the model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for name, (shape, is_float) in expected.items():
        record = records[name]
        if tuple(record["shape"]) != shape:
            raise ShapeMismatch(f"{name}: artifact shape {record['shape']} but model expects {list(shape)}")
        if TORCH_DTYPES[record["dtype"]].is_floating_point != is_float:
            raise ShapeMismatch(f"{name}: artifact dtype {record['dtype']} but model has a "
                                f"{'float' if is_float else 'non-float'} tensor")


@functools.lru_cache(maxsize=16)
def _expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name → (shape, is floating point) of GPT(config)'s state_dict; cached, the same few configs recur."""
    try:
        with torch.device("meta"):
            state = GPT(config).state_dict()
    except Exception as exc:  # untrusted config: any failure to build (even ZeroDivisionError) means invalid
        raise SchemaViolation(f"model_config does not build a model: {type(exc).__name__}: {exc}") from None
    return {name: (tuple(t.shape), t.is_floating_point()) for name, t in state.items()}
