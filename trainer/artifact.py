"""Artifact format v1 and the evaluation's reader (layout, checks in order, codes, bounds: docs/artifact-format.md).

The file is hostile: nothing is unpickled or executed, and every field the evaluation reads is bounded before
anything depends on it.
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
from collections.abc import Callable, Mapping, Sequence
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
from trainer.limits import SUBMISSION_LIMIT_BYTES
from trainer.model import GPT, ModelConfig

MAGIC = b"\x89PGOLF\r\n"  # non-ASCII first byte and CRLF catch text-mode mangling, as in PNG
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII")  # magic, version, manifest length
HEADER_NBYTES = HEADER.size

MAX_MANIFEST_BYTES = 1 << 20  # a pr940 manifest is ~15 kB
MAX_RAW_NBYTES = 256 << 20
MAX_TENSOR_NDIM = 8
MAX_TENSORS = 4096  # a pr940 artifact has 190
MAX_NAME_CHARS = 256
MAX_MANIFEST_DEPTH = 8  # a valid manifest nests 4 deep (manifest → tensors → record → shape)
MAX_INT_DIGITS = 20
MAX_COUNT = 2**63 - 1  # what a 64-bit integer holds
# Inclusive bounds of ModelConfig's numeric fields. An integer field without one is refused; a float field without
# one must lie within ±DEFAULT_FLOAT_BOUND. Building the model checks the rest.
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
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # dequantised, in manifest order, each in its recorded dtype
    file_nbytes: int
    file_sha256: str


MetadataCheck = Callable[[dict[str, Any]], None]  # trainer/artifact_metadata.py's, for artifacts from outside


def read_artifact(path: str | os.PathLike[str], *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES,
                  check_metadata: MetadataCheck | None = None) -> Artifact:
    path = Path(path)
    size = path.stat().st_size
    if size > max_file_bytes:
        raise FileTooLarge(f"{path}: {size} bytes exceeds the limit of {max_file_bytes} bytes")
    with path.open("rb") as fh:
        data = fh.read(max_file_bytes + 1)  # the file may have grown since stat(); never read past the bound
    return parse_artifact(data, max_file_bytes=max_file_bytes, check_metadata=check_metadata)


def parse_artifact(data: bytes, *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES,
                   check_metadata: MetadataCheck | None = None) -> Artifact:
    if len(data) > max_file_bytes:
        raise FileTooLarge(f"artifact is {len(data)} bytes, over the limit of {max_file_bytes} bytes")
    manifest, payload_start = _read_header_and_manifest(data)
    config = validate_manifest(manifest, check_metadata)
    payload_info = manifest["payload"]

    expected_end = payload_start + payload_info["compressed_nbytes"]
    if len(data) < expected_end:
        raise Truncated(f"payload truncated: file has {len(data) - payload_start} payload bytes, "
                        f"manifest declares {payload_info['compressed_nbytes']}")
    if len(data) > expected_end:
        raise TrailingData(f"{len(data) - expected_end} unexpected bytes after the declared payload")
    compressed = data[payload_start:]
    digest = hashlib.sha256(compressed).hexdigest()
    if digest != payload_info["compressed_sha256"]:
        raise HashMismatch(f"compressed payload sha256 {digest} does not match manifest "
                           f"{payload_info['compressed_sha256']}")

    check_against_model(manifest, config)
    raw = _bounded_decompress(compressed, payload_info["raw_nbytes"])
    raw_digest = hashlib.sha256(raw).hexdigest()
    if raw_digest != payload_info["raw_sha256"]:
        raise HashMismatch(f"raw payload sha256 {raw_digest} does not match manifest {payload_info['raw_sha256']}")

    state_dict = {r["name"]: _finite_as_used(r["name"], dequantize_tensor(_decode_tensor(r, raw)))
                  for r in manifest["tensors"]}
    return Artifact(manifest, config, state_dict, len(data), hashlib.sha256(data).hexdigest())


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[GPT, Artifact]:
    """A GPT in eval mode holding the artifact's weights, in their recorded dtypes."""
    artifact = read_artifact(path)
    with torch.device("meta"):  # no random init computed and thrown away
        model = GPT(artifact.model_config)
    # Copies: test-time training updates them in place. Strict: a tensor left on meta would fail in .to(device).
    model.load_state_dict({k: v.clone() for k, v in artifact.state_dict.items()}, strict=True, assign=True)
    return model.to(device).eval(), artifact


def _read_header_and_manifest(data: bytes) -> tuple[dict[str, Any], int]:
    if data[: len(MAGIC)] != MAGIC and not MAGIC.startswith(data):  # a prefix of the magic is a truncated file
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
        raise Truncated(f"manifest truncated: {len(data) - HEADER_NBYTES} of {manifest_nbytes} declared bytes present")
    try:
        manifest = json.loads(
            data[HEADER_NBYTES:payload_start].decode("utf-8"),
            parse_float=_finite_float,
            parse_int=_bounded_int,
            parse_constant=_finite_float,  # NaN, Infinity, -Infinity
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestNotJSON(f"manifest is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise SchemaViolation(f"manifest must be a JSON object, got {type(manifest).__name__}")
    _check_depth(manifest)
    return manifest, payload_start


def _bounded_int(text: str) -> int:
    # No integer of the format needs more than 64 bits: refused here, not at Python's 4,300-digit limit.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(text)} characters (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _check_depth(manifest: dict[str, Any]) -> None:
    # Iterative: no recursion on attacker data.
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
        raise ValueError(f"{text} is not a finite JSON number")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_show(key)}")
        obj[key] = value
    return obj


def _bounded_decompress(compressed: bytes, raw_nbytes: int) -> bytearray:
    # At most raw_nbytes + 1 bytes: one byte more than declared is proof of a lie.
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
    # Finite as stored is not enough: fp32 1e5 restored to float16, q · scale = 127 · 65504, fp32 max in bfloat16.
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
        scales = np.frombuffer(raw, dtype=SCALE_DTYPE, count=record["scale_nbytes"] // SCALE_DTYPE.itemsize,
                               offset=record["scale_offset"])
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise InvalidTensorData(f"{name}: scales must be finite and positive")
    elif encoding == RAW and dtype == "bool":
        if values.size and values.view(np.uint8).max() > 1:
            raise InvalidTensorData(f"{name}: bool bytes other than 0 and 1")
    # fp16/fp32 values: finiteness is checked once restored (_finite_as_used)
    return QuantizedTensor(name, encoding, dtype, tuple(record["shape"]), values, scales)  # views of raw


# Manifest schema. Field sets are exact: a missing or unknown key is a violation.

_TOP_LEVEL = ("model_config", "tokenizer", "tensors", "payload", "training", "code_bytes")
_PAYLOAD = ("compression", "level", "compressed_nbytes", "compressed_sha256", "raw_nbytes", "raw_sha256")
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
    # Refusal messages must not echo a megabyte of manifest.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate_manifest(manifest: dict[str, Any], check_metadata: MetadataCheck | None = None) -> ModelConfig:
    """The schema of what the evaluation reads; ``check_metadata`` checks the rest, where it stands in the schema."""
    _require_keys(manifest, "manifest", _TOP_LEVEL)
    config = ModelConfig(**_config_kwargs(manifest["model_config"]))
    _validate_payload(manifest["payload"])
    _validate_tensor_table(manifest["tensors"], manifest["payload"]["raw_nbytes"])
    if check_metadata is not None:
        check_metadata(manifest)
    # Of the metadata, the engine reads code_bytes.total and training.train_seq_len.
    _require_keys(manifest["training"], "training", (), extra_ok=True)
    seq_len = manifest["training"].get("train_seq_len")
    lo, hi = MODEL_CONFIG_BOUNDS["rope_train_seq_len"]
    _require(not _is_int(seq_len) or lo <= seq_len <= hi, f"training.train_seq_len {seq_len} is outside [{lo}, {hi}]")
    _require_keys(manifest["code_bytes"], "code_bytes", (), extra_ok=True)
    total = manifest["code_bytes"].get("total")
    _require(_is_int(total) and 0 <= total <= MAX_COUNT, "code_bytes.total must be a non-negative integer")
    _validate_tokenizer(manifest["tokenizer"], config.vocab_size)
    return config


def _config_kwargs(config: Any) -> dict[str, Any]:
    hints, names = typing.get_type_hints(ModelConfig), [f.name for f in fields(ModelConfig)]
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
        raise DeclaredSizeTooLarge(f"declared raw payload size {payload['raw_nbytes']} bytes exceeds the bound of "
                                   f"{MAX_RAW_NBYTES}")


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


def _validate_tokenizer(tokenizer: Any, model_vocab_size: int) -> None:
    if not isinstance(tokenizer, dict) or set(tokenizer) != {"sha256", "vocab_size"}:
        raise TokenizerFieldError(
            f"tokenizer must be an object with exactly sha256 and vocab_size, got {_show(tokenizer)}")
    _validate_sha256(tokenizer["sha256"], "tokenizer.sha256", TokenizerFieldError)
    vocab = tokenizer["vocab_size"]
    if not (_is_int(vocab) and vocab > 0):
        raise TokenizerFieldError(f"tokenizer.vocab_size must be a positive integer, got {_show(vocab)}")
    if vocab != model_vocab_size:
        raise TokenizerFieldError(f"tokenizer.vocab_size {vocab} disagrees with model_config.vocab_size "
                                  f"{model_vocab_size}")


def check_against_model(manifest: Mapping[str, Any], config: ModelConfig) -> None:
    """Names, shapes and dtype kinds against the model the config builds (on the meta device; the config is within
    its bounds, so cheaply). The table tiles the payload, so the parameters fit in it too."""
    records = {r["name"]: r for r in manifest["tensors"]}
    expected = _expected_tensors(config)
    missing = [n for n in expected if n not in records]
    unexpected = [n for n in records if n not in expected]
    if missing or unexpected:
        # The first 5 of each, whole; the unexpected ones are the manifest's, so they are bounded too.
        raise ShapeMismatch(f"tensor names disagree with the model: missing {missing[:5]}{'…' * (len(missing) > 5)}, "
                            f"unexpected {_show(unexpected[:5], 600)}{'…' * (len(unexpected) > 5)}")
    for name, (shape, is_float) in expected.items():
        record = records[name]
        if tuple(record["shape"]) != shape:
            raise ShapeMismatch(f"{name}: artifact shape {record['shape']} but model expects {list(shape)}")
        if TORCH_DTYPES[record["dtype"]].is_floating_point != is_float:
            raise ShapeMismatch(f"{name}: artifact dtype {record['dtype']} but model has a "
                                f"{'float' if is_float else 'non-float'} tensor")


@functools.lru_cache(maxsize=16)
def _expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    # name → (shape, is floating point); cached, the same few configs recur.
    try:
        with torch.device("meta"):
            state = GPT(config).state_dict()
    except Exception as exc:  # untrusted config: any failure to build (even ZeroDivisionError) means invalid
        raise SchemaViolation(f"model_config does not build a model: {type(exc).__name__}: {exc}") from None
    return {name: (tuple(t.shape), t.is_floating_point()) for name, t in state.items()}
