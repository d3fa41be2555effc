"""Safe reader for upstream Parameter Golf artifacts: ``final_model.int8.ptz`` and ``final_model.int6.ptz``.

An upstream artifact is ``compress(torch.save(obj))``. The compressor is found by its magic bytes (zstd, xz or
legacy lzma, zlib; brotli has no magic and is tried last), and every decompression stops one byte past a bound
derived from the model the submission's config builds. ``torch.save`` writes a zip archive whose members are
stored uncompressed: ``<prefix>/data.pkl`` (the pickle) and one ``<prefix>/data/<key>`` record per storage.

Safety model. ``torch.load`` is never called. Even with ``weights_only=True`` it admits a few dozen torch globals
(parameter, sparse and subclass rebuilders, dtypes, devices, ``_codecs.encode``) and allocates each storage at
the size the pickle declares. Here the pickle goes through an unpickler whose ``find_class`` admits exactly what
``torch.save`` of a dict of plain dense tensors emits: ``torch._utils._rebuild_tensor_v2``, the typed storage
classes and ``collections.OrderedDict``, each replaced by an inert stand-in of this module (so nothing of torch
runs during unpickling either). Any other global is refused before it is resolved, so no callable named by the
file is ever called. Storages are then read from their zip records by this module, after checking that each
record holds exactly the bytes the pickle declares and that every tensor view lies inside its storage.

The decoded object must be one of the two upstream formats (reference-stack §6):

* ``int8_clean_per_row_v1`` (root ``train_gpt.py``, ``quantize_state_dict_int8``): per-row int8 ``q`` with fp16
  row scales (or a scalar fp32 scale for non-matrices), the dtype each tensor had, fp16/fp32 passthrough tensors;
* the ``{"w": result, "m": meta}`` dict of PR #549/#940's ``mixed_quantize_int6``: ``name.q`` / ``name.scale``
  per quantised tensor with ``meta[name] = {"type": "int6" | "int5" | "int8"}``, passthrough tensors otherwise.

Dequantisation is upstream's: ``q * scale[row]`` in fp32, then cast to the tensor's dtype in the upstream model.
The result is checked name for name and shape for shape against pgolf's GPT built from the submission's config
(``trainer.upstream_config``). Each refusal is an ``ArtifactError`` with its own code.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard

from trainer.artifact import (
    MAX_RAW_NBYTES,
    ArtifactError,
    DecompressionBomb,
    FileTooLarge,
    InvalidTensorData,
    PayloadCorrupt,
    ShapeMismatch,
    TrailingData,
    _is_int,
)
from trainer.limits import SUBMISSION_LIMIT_BYTES
from trainer.model import GPT, ModelConfig

MAX_PICKLE_BYTES = 8 << 20  # a PR #940 data.pkl is ~20 kB
MAX_ZIP_MEMBERS = 4096  # one record per tensor plus a handful of metadata members
MAX_TENSOR_NDIM = 8
# Headroom above the tensors' own bytes for the pickle, zip headers and torch's 64-byte record alignment.
RAW_OVERHEAD_BYTES = 16 << 20
_CHUNK = 1 << 20

INT8_FORMAT = "int8_clean_per_row_v1"
MIXED_INT6_FORMAT = "mixed_int6"
# Largest |q| each upstream quantiser writes: int8 clamps to ±127; int6/int5 use the asymmetric [-(qmax+1), qmax].
_Q_RANGE = {"int8": (-127, 127), "int6": (-32, 31), "int5": (-16, 15)}
_PASSTHROUGH_META = ("passthrough", "passthrough_ctrl", "passthrough_fp16")
_FLOAT_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# Errors (same family as the .pgolf reader's; the codes are the service's and verifier's slugs)


class UnknownCompression(ArtifactError):
    code = "unknown_compression"


class ZipBomb(ArtifactError):
    code = "zip_bomb"


class NotTorchZip(ArtifactError):
    code = "not_torch_zip"


class ForbiddenPickleGlobal(ArtifactError):
    code = "forbidden_pickle_global"


class MalformedPickle(ArtifactError):
    code = "malformed_pickle"


class StorageOutOfBounds(ArtifactError):
    code = "storage_out_of_bounds"


class NotATensor(ArtifactError):
    code = "not_a_tensor"


class UnknownUpstreamFormat(ArtifactError):
    code = "unknown_upstream_format"


class MissingTensors(ArtifactError):
    code = "missing_tensors"


class UnexpectedTensors(ArtifactError):
    code = "unexpected_tensors"


# --------------------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class UpstreamArtifact:
    state_dict: dict[str, torch.Tensor]  # dequantised, fp32, in pgolf's state-dict order
    model_config: ModelConfig
    quant_format: str  # INT8_FORMAT or MIXED_INT6_FORMAT
    compression: str  # zstd | xz | lzma | zlib | brotli
    file_nbytes: int
    file_sha256: str
    encodings: dict[str, str]  # tensor name -> int8 | int6 | int5 | passthrough… (what the file stored)
    raw_nbytes: int  # size of the decompressed torch zip

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary, the upstream counterpart of a .pgolf manifest."""
        counts: dict[str, int] = {}
        for encoding in self.encodings.values():
            counts[encoding] = counts.get(encoding, 0) + 1
        return {"format": "upstream", "quant_format": self.quant_format, "compression": self.compression,
                "model_config": asdict(self.model_config), "file_nbytes": self.file_nbytes,
                "file_sha256": self.file_sha256, "raw_nbytes": self.raw_nbytes, "tensor_encodings": counts,
                "num_parameters": sum(t.numel() for t in self.state_dict.values())}


# --------------------------------------------------------------------------------------------------------------
# Reading


def read_upstream_artifact(
    path: str | os.PathLike[str], model_config: ModelConfig, *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES
) -> UpstreamArtifact:
    path = Path(path)
    size = path.stat().st_size
    if size > max_file_bytes:
        raise FileTooLarge(f"{path}: {size} bytes exceeds the limit of {max_file_bytes} bytes")
    with path.open("rb") as fh:
        data = fh.read(max_file_bytes + 1)
    return parse_upstream_artifact(data, model_config, max_file_bytes=max_file_bytes)


def parse_upstream_artifact(
    data: bytes, model_config: ModelConfig, *, max_file_bytes: int = SUBMISSION_LIMIT_BYTES
) -> UpstreamArtifact:
    if len(data) > max_file_bytes:
        raise FileTooLarge(f"artifact is {len(data)} bytes, over the limit of {max_file_bytes} bytes")
    expected = expected_tensors(model_config)
    limit = raw_limit(expected)
    compression, raw = decompress_bounded(data, limit)
    obj, tensors = load_torch_zip(raw)
    quant_format, state_dict, encodings = dequantize(obj, tensors, template_dtypes(expected))
    state_dict = check_against_model(state_dict, expected)
    return UpstreamArtifact(state_dict, model_config, quant_format, compression, len(data),
                            hashlib.sha256(data).hexdigest(), encodings, len(raw))


def expected_tensors(model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """pgolf's state dict for the config, on the meta device (names, shapes, no memory)."""
    with torch.device("meta"):
        return GPT(model_config).state_dict()


def raw_limit(expected: Mapping[str, torch.Tensor]) -> int:
    """Decompression bound: every tensor at 4 bytes per element plus the container overhead, at most 256 MiB.

    Upstream stores nothing wider than fp32, so a real artifact's torch zip is always below this.
    """
    return min(MAX_RAW_NBYTES, 4 * sum(t.numel() for t in expected.values()) + RAW_OVERHEAD_BYTES)


def template_dtypes(expected: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """The dtype of each tensor in upstream's eval model, which dequantisation casts to.

    Upstream builds the model, casts it to bf16, then restores every CastedLinear and every control/low-dim
    parameter to fp32: what stays bf16 is exactly the embedding tables (``tok_emb``, ``bigram.embed``).
    """
    return {name: torch.bfloat16 if name in ("tok_emb.weight", "bigram.embed.weight") else torch.float32
            for name in expected}


# ---- decompression -------------------------------------------------------------------------------------------


def detect_compression(data: bytes) -> str:
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[:1] == b"\x5d" and len(data) >= 13:  # legacy .lzma header: properties byte lc=3 lp=0 pb=2
        return "lzma"
    if len(data) >= 2 and data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and ((data[0] << 8) | data[1]) % 31 == 0:
        return "zlib"
    if data[:4] == b"PK\x03\x04":
        return "none"
    return "brotli"  # brotli streams carry no magic; it is the last guess and must decode to a torch zip


def decompress_bounded(data: bytes, limit: int) -> tuple[str, bytes]:
    """(compression, raw bytes). At most ``limit`` bytes come out; one more is proof of a bomb."""
    kind = detect_compression(data)
    if kind == "none":
        out = data
    elif kind == "zstd":
        out = _zstd(data, limit)
    elif kind in ("xz", "lzma"):
        out = _lzma(data, limit, lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
    elif kind == "zlib":
        out = _zlib(data, limit)
    else:
        out = _brotli(data, limit)
    if len(out) > limit:
        raise DecompressionBomb(f"{kind} payload decompresses past {limit} bytes, more than any model of this "
                                f"config can need")
    return kind, out


def _zstd(data: bytes, limit: int) -> bytes:
    out = bytearray()
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            while len(out) <= limit:
                chunk = reader.read(min(_CHUNK, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise PayloadCorrupt(f"not a valid zstd stream: {exc}") from None
    return bytes(out)


def _lzma(data: bytes, limit: int, fmt: int) -> bytes:
    decompressor = lzma.LZMADecompressor(format=fmt)
    try:
        out = decompressor.decompress(data, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise PayloadCorrupt(f"not a valid lzma stream: {exc}") from None
    if len(out) <= limit and not decompressor.eof:
        raise PayloadCorrupt("lzma stream is truncated")
    if decompressor.eof and decompressor.unused_data:
        raise TrailingData(f"{len(decompressor.unused_data)} bytes after the end of the lzma stream")
    return out


def _zlib(data: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error as exc:
        raise PayloadCorrupt(f"not a valid zlib stream: {exc}") from None
    if len(out) <= limit:
        if not decompressor.eof:
            raise PayloadCorrupt("zlib stream is truncated")
        if decompressor.unused_data:
            raise TrailingData(f"{len(decompressor.unused_data)} bytes after the end of the zlib stream")
    return out


def _brotli(data: bytes, limit: int) -> bytes:
    import brotli

    decompressor = brotli.Decompressor()
    out = bytearray()
    pending = data
    try:
        while len(out) <= limit:
            chunk = decompressor.process(pending, output_buffer_limit=min(_CHUNK, limit + 1 - len(out)))
            pending = b""
            out += chunk
            if decompressor.is_finished():
                break
            if not chunk and decompressor.can_accept_more_data():
                raise brotli.error("truncated stream")
    except brotli.error:
        # Brotli is only the guess for a file without a known magic: failing it means "unknown", not "corrupt".
        raise UnknownCompression(
            f"the file starts with {data[:8].hex()}: not zstd, xz/lzma, zlib or a torch zip, and it does not "
            f"decode as brotli") from None
    if len(out) <= limit and out[:4] != b"PK\x03\x04":
        raise UnknownCompression(f"the file starts with {data[:8].hex()} and is not a known upstream container")
    return bytes(out)


# ---- torch zip and the restricted unpickler -------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64, "BoolStorage": torch.bool,
}


# slots: a pickle BUILD opcode cannot rewrite the fields of an instance after it was checked.
@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as the pickle describes it; its bytes are read only after every reference was checked."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and len(value) <= MAX_TENSOR_NDIM and all(_is_int(v) and v >= 0 for v in value)):
        raise MalformedPickle(f"tensor {what} must be a tuple of at most {MAX_TENSOR_NDIM} non-negative integers")
    return value


def _rebuild_tensor_ref(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                        backward_hooks: Any, metadata: Any = None) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view, touches nothing."""
    if not isinstance(storage, StorageRef):
        raise MalformedPickle("a tensor's storage is not a storage record")
    if not (_is_int(storage_offset) and storage_offset >= 0) or not isinstance(requires_grad, bool):
        raise MalformedPickle("a tensor has a bad storage offset or requires_grad flag")
    if backward_hooks or metadata:
        raise MalformedPickle("a tensor carries backward hooks or metadata; plain tensors do not")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise MalformedPickle("a tensor's size and stride differ in length")
    return TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}

    def _rebuild_tensor(self, *args: Any) -> TensorRef:
        if not 6 <= len(args) <= 7:
            raise MalformedPickle(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
        return _rebuild_tensor_ref(*args)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor  # a bound method: BUILD cannot set attributes on it
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # the (empty) backward-hooks argument of every tensor
        raise ForbiddenPickleGlobal(f"the pickle names the global {module}.{name}; only tensors, storages and "
                                    f"plain containers are admitted, so nothing was loaded")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise MalformedPickle(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise MalformedPickle("a storage record names no storage type")
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 12) or not (_is_int(numel) and numel >= 0):
            raise MalformedPickle(f"bad storage key or size {key!r}")
        ref = StorageRef(key, storage_type.dtype, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise MalformedPickle(f"storage {key} is declared twice with different types or sizes")
        return known


def load_torch_zip(raw: bytes) -> tuple[Any, dict[int, torch.Tensor]]:
    """Unpickle ``data.pkl`` with the restricted unpickler and read the storages it references.

    Returns the unpickled object (TensorRef in place of tensors) and a map from id(TensorRef) to its tensor.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise NotTorchZip(f"the decompressed payload is not a torch.save zip archive: {exc}") from None
    if len(infos) > MAX_ZIP_MEMBERS:
        raise ZipBomb(f"the archive has {len(infos)} members (at most {MAX_ZIP_MEMBERS})")
    members: dict[str, zipfile.ZipInfo] = {}
    declared = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ZipBomb(f"member {info.filename!r} is compressed (method {info.compress_type}); torch.save "
                          f"stores every member uncompressed, so its declared size cannot be trusted")
        declared += info.file_size
        if info.filename in members:
            raise NotTorchZip(f"member {info.filename!r} appears twice")
        members[info.filename] = info
    if declared > len(raw):
        raise ZipBomb(f"the members declare {declared} bytes, more than the {len(raw)}-byte archive holds")
    pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise NotTorchZip("the archive has no single <prefix>/data.pkl: not written by torch.save")
    prefix = pickles[0][: -len("data.pkl")]
    if any(not name.startswith(prefix) for name in members):
        raise NotTorchZip("archive members do not share one prefix")
    byteorder = members.get(prefix + "byteorder")
    if byteorder is not None and _read_member(archive, byteorder) != b"little":
        raise NotTorchZip("only little-endian torch archives are supported")
    pickle_info = members[pickles[0]]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise ZipBomb(f"data.pkl is {pickle_info.file_size} bytes (at most {MAX_PICKLE_BYTES})")

    unpickler = _RestrictedUnpickler(_read_member(archive, pickle_info))
    try:
        obj = unpickler.load()
    except ArtifactError:
        raise
    except Exception as exc:  # any malformed opcode stream: EOF, bad opcode, wrong argument types, recursion
        raise MalformedPickle(f"data.pkl does not unpickle: {type(exc).__name__}: {exc}") from None

    storages: dict[str, torch.Tensor] = {}
    for key, ref in unpickler.storages.items():
        info = members.get(f"{prefix}data/{key}")
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        if info is None:
            raise StorageOutOfBounds(f"storage {key} has no record in the archive")
        if info.file_size != ref.numel * itemsize:
            raise StorageOutOfBounds(f"storage {key} declares {ref.numel} × {itemsize} bytes, but its record holds "
                                     f"{info.file_size} bytes")
        payload = bytearray(_read_member(archive, info))
        storages[key] = (torch.frombuffer(payload, dtype=ref.dtype) if payload
                         else torch.empty(0, dtype=ref.dtype))
    tensors = {id(ref): _view(ref, storages[ref.storage.key]) for ref in _tensor_refs(obj)}
    return obj, tensors


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise PayloadCorrupt(f"archive member {info.filename!r} is unreadable: {exc}") from None


def _tensor_refs(obj: Any, depth: int = 0) -> list[TensorRef]:
    if depth > 4:  # the formats nest three levels deep at most
        raise UnknownUpstreamFormat("the pickled object nests deeper than any upstream format")
    if isinstance(obj, TensorRef):
        return [obj]
    if isinstance(obj, dict):
        return [ref for value in obj.values() for ref in _tensor_refs(value, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [ref for value in obj for ref in _tensor_refs(value, depth + 1)]
    return []


def _view(ref: TensorRef, storage: torch.Tensor) -> torch.Tensor:
    numel = math.prod(ref.size)
    if numel:
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
        if extent > storage.numel():
            raise StorageOutOfBounds(f"a tensor of shape {list(ref.size)} reaches element {extent} of storage "
                                     f"{ref.storage.key}, which holds {storage.numel()}")
    return storage.as_strided(ref.size, ref.stride, ref.offset).clone() if numel else storage.new_empty(ref.size)


# ---- the two upstream formats ----------------------------------------------------------------------------------


def dequantize(obj: Any, tensors: Mapping[int, torch.Tensor],
               templates: Mapping[str, torch.dtype]) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(format, dequantised tensors by name in their upstream dtype, encoding per name)."""
    if isinstance(obj, dict) and obj.get("__quant_format__") == INT8_FORMAT:
        state_dict, encodings = _dequantize_int8(obj, tensors)
        return INT8_FORMAT, state_dict, encodings
    if isinstance(obj, dict) and set(obj) == {"w", "m"}:
        state_dict, encodings = _dequantize_mixed(obj["w"], obj["m"], tensors, templates)
        return MIXED_INT6_FORMAT, state_dict, encodings
    keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise UnknownUpstreamFormat(f"the pickled object is neither an int8_clean_per_row_v1 dict nor a mixed-int6 "
                                f"{{'w', 'm'}} dict (found {keys})")


def _tensor(tensors: Mapping[int, torch.Tensor], value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, TensorRef):
        raise NotATensor(f"{where} is a {type(value).__name__}, not a tensor")
    return tensors[id(value)]


def _str_dict(value: Any, where: str) -> dict[str, Any]:
    if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        raise UnknownUpstreamFormat(f"{where} must be a dict with string keys")
    return value


def _dtype_named(value: Any, where: str) -> torch.dtype:
    if value not in _FLOAT_NAMES:
        raise UnknownUpstreamFormat(f"{where}: dtype {value!r} is not one of {', '.join(_FLOAT_NAMES)}")
    return _FLOAT_NAMES[value]


def _scaled(q: torch.Tensor, scale: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    """Upstream's dequantisation of one tensor: per-row ``q * s[row]`` if the scale is a vector, else ``q * s``."""
    low, high = _Q_RANGE[kind]
    if q.dtype != torch.int8:
        raise InvalidTensorData(f"{name}: quantised values are {q.dtype}, upstream writes int8")
    if q.numel() and (int(q.min()) < low or int(q.max()) > high):
        raise InvalidTensorData(f"{name}: {kind} values outside [{low}, {high}]")
    if not scale.is_floating_point():
        raise InvalidTensorData(f"{name}: the scale is {scale.dtype}, not a float")
    s = scale.float()
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise InvalidTensorData(f"{name}: scales must be finite and positive")
    if s.ndim > 0:
        if q.ndim < 1 or tuple(s.shape) != (q.shape[0],):
            raise ShapeMismatch(f"{name}: {list(s.shape)} row scales for values of shape {list(q.shape)}")
        return q.float() * s.view(q.shape[0], *([1] * (q.ndim - 1)))
    return q.float() * float(s.item())


def _dequantize_int8(obj: dict[str, Any], tensors: Mapping[int, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    allowed = {"__quant_format__", "quantized", "scales", "dtypes", "passthrough", "qmeta", "passthrough_orig_dtypes"}
    extra = sorted(set(map(str, obj)) - allowed)
    if extra:
        raise UnknownUpstreamFormat(f"int8_clean_per_row_v1 dict has unknown keys {extra}")
    quantized = _str_dict(obj.get("quantized"), "quantized")
    scales = _str_dict(obj.get("scales"), "scales")
    dtypes = _str_dict(obj.get("dtypes"), "dtypes")
    passthrough = _str_dict(obj.get("passthrough"), "passthrough")
    orig_dtypes = _str_dict(obj.get("passthrough_orig_dtypes", {}), "passthrough_orig_dtypes")
    _str_dict(obj.get("qmeta", {}), "qmeta")  # per_row markers; the scale's rank already says the same
    if set(scales) != set(quantized) or set(dtypes) != set(quantized):
        raise UnknownUpstreamFormat("quantized, scales and dtypes must name the same tensors")
    both = sorted(set(quantized) & set(passthrough))
    if both:
        raise UnknownUpstreamFormat(f"tensors both quantised and passed through: {both[:5]}")
    out: dict[str, torch.Tensor] = {}
    encodings: dict[str, str] = {}
    for name, q in quantized.items():
        dtype = _dtype_named(dtypes[name], name)
        out[name] = _scaled(_tensor(tensors, q, name), _tensor(tensors, scales[name], f"{name} scale"),
                            "int8", name).to(dtype)
        encodings[name] = "int8"
    for name, value in passthrough.items():
        t = _tensor(tensors, value, name)
        if name in orig_dtypes:
            t = t.to(_dtype_named(orig_dtypes[name], name))
        out[name] = t
        encodings[name] = "passthrough"
    return out, encodings


def _dequantize_mixed(result: Any, meta: Any, tensors: Mapping[int, torch.Tensor],
                      templates: Mapping[str, torch.dtype]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    result = _str_dict(result, "w")
    meta = _str_dict(meta, "m")
    out: dict[str, torch.Tensor] = {}
    encodings: dict[str, str] = {}
    used: set[str] = set()
    for name, info in meta.items():
        # Tensors pgolf's model does not have are still decoded (and then refused by name, with the others).
        template = templates.get(name, torch.float32)
        if info in _PASSTHROUGH_META:
            t = _tensor(tensors, result.get(name), name)
            if t.dtype == torch.float16 and template in (torch.float32, torch.bfloat16):
                t = t.to(template)
            out[name] = t
            encodings[name] = str(info)
            used.add(name)
            continue
        kind = info.get("type") if isinstance(info, dict) and set(info) == {"type"} else None
        if kind not in _Q_RANGE:
            raise UnknownUpstreamFormat(f"meta[{name!r}] = {str(info)[:60]} is not a known quantisation")
        q = _tensor(tensors, result.get(name + ".q"), name + ".q")
        scale = _tensor(tensors, result.get(name + ".scale"), name + ".scale")
        out[name] = _scaled(q, scale, kind, name).to(template)
        encodings[name] = kind
        used.update((name + ".q", name + ".scale"))
    stray = sorted(set(result) - used)
    if stray:
        raise UnexpectedTensors(f"tensors without a meta entry: {stray[:5]}{'…' if len(stray) > 5 else ''}")
    return out, encodings


# ---- against the model -----------------------------------------------------------------------------------------


def check_against_model(state_dict: Mapping[str, torch.Tensor],
                        expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names and shapes must be pgolf's exactly; values must be finite. Returns fp32 tensors in model order."""
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise UnexpectedTensors(
            f"{len(unexpected)} tensor(s) that pgolf's model for this config does not have: {unexpected[:8]}"
            f"{'…' if len(unexpected) > 8 else ''} (an architecture pgolf cannot express, or a config that does "
            f"not match the artifact)")
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise MissingTensors(f"{len(missing)} tensor(s) of the model are not in the artifact: {missing[:8]}"
                             f"{'…' if len(missing) > 8 else ''}")
    out: dict[str, torch.Tensor] = {}
    for name, template in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != tuple(template.shape):
            raise ShapeMismatch(f"{name}: artifact shape {list(t.shape)} but the config's model expects "
                                f"{list(template.shape)}")
        if t.is_floating_point() != template.is_floating_point():
            raise ShapeMismatch(f"{name}: artifact dtype {t.dtype} but the model has {template.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidTensorData(f"{name}: non-finite values after dequantisation")
        out[name] = t.to(template.dtype).contiguous()
    return out


def load_upstream_model(path: str | os.PathLike[str], model_config: ModelConfig,
                        device: str | torch.device = "cpu") -> tuple[GPT, UpstreamArtifact]:
    """Read an upstream artifact and return pgolf's GPT with its weights (eval mode), plus the artifact."""
    artifact = read_upstream_artifact(path, model_config)
    with torch.device("meta"):
        model = GPT(model_config)
    model.load_state_dict(dict(artifact.state_dict), strict=True, assign=True)
    return model.to(device).eval(), artifact
