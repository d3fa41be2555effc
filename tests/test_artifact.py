"""Artifact format v1: round trip, every refusal of the reader, the fit-to-budget ladder, counted code bytes.

Malformed artifacts are crafted by hand from the bytes of a real one (header, manifest, payload), re-hashing
where needed so that the check under test is the one that fires. Each is refused by the upload path
(``parse_submission``) and, with the same error, by the evaluation's reader (``parse_artifact``), except faults in
the metadata sections the evaluation never reads, which only the upload path refuses.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

from trainer import artifact as art
from trainer import export
from trainer.artifact import (
    HEADER_NBYTES,
    MAGIC,
    ArtifactError,
    load_model,
    parse_artifact,
    read_artifact,
)
from trainer.artifact_metadata import parse_submission
from trainer.code_bytes import CodeBytes, counted_code_bytes
from trainer.encodings import INT5_ROW, INT6_ROW, dequantize_tensor
from trainer.export import BudgetExceeded, export_to_budget, int5_downgrade_order, write_artifact
from trainer.model import GPT, ModelConfig
from trainer.quant import quantize_state_dict

# Small but with every encoding: fc and mlp.proj (640×128) are int6, tok_emb (1024×128) int8, the rest fp16.
SMALL = ModelConfig(num_layers=3, model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=5, xsa_last_n=3,
                    bigram_buckets=64, bigram_dim=32)
TOKENIZER_SHA = hashlib.sha256(b"tokenizer").hexdigest()
TRAINING = {"seed": 1337, "steps": 12, "world_size": 1, "device": "cpu", "train_time_ms": 3456,
            "code_version": "test", "preset": "unit"}
CODE = CodeBytes(total=1000, files={"trainer/model.py": 600, "trainer/quant.py": 400})
ALL_ERRORS = [cls for cls in vars(art).values() if isinstance(cls, type) and issubclass(cls, ArtifactError)]



@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These tests do many small tensor ops; on a shared 2-core machine, intra-op threads mostly spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trained_like_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real GPT's state_dict with noise on every weight, so zero-init matrices are non-trivial too."""
    torch.manual_seed(seed)
    model = GPT(config)
    return {name: t + 0.02 * torch.randn_like(t) for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return trained_like_state(SMALL)


@pytest.fixture(scope="module")
def good_bytes(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "model.pgolf"
    write_artifact(path, state, SMALL, TOKENIZER_SHA, SMALL.vocab_size, TRAINING, code_bytes=CODE, level=1)
    return path.read_bytes()


# ---- crafting helpers ---------------------------------------------------------------------------------------


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[HEADER_NBYTES : HEADER_NBYTES + length]), data[HEADER_NBYTES + length :]


def assemble(manifest: dict[str, Any] | bytes, payload: bytes, *, magic: bytes = MAGIC, version: int = 1) -> bytes:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return magic + struct.pack("<II", version, len(body)) + body + payload


def with_payload(manifest: dict[str, Any], compressed: bytes, raw: bytes | None = None) -> bytes:
    """Install a new payload with honest hashes (and raw hash/size when ``raw`` is given)."""
    manifest["payload"].update(
        compressed_nbytes=len(compressed), compressed_sha256=hashlib.sha256(compressed).hexdigest()
    )
    if raw is not None:
        manifest["payload"].update(raw_nbytes=len(raw), raw_sha256=hashlib.sha256(raw).hexdigest())
    return assemble(manifest, compressed)


def raw_payload(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(split(data)[1])


def refuses(data: bytes, error: type[ArtifactError], match: str, *, metadata: bool = False) -> ArtifactError:
    """The upload path refuses ``data`` with ``error``; so does the evaluation's reader, with the same message,
    unless the fault is in a ``metadata`` section, which the evaluation does not read (and so accepts)."""
    with pytest.raises(ArtifactError, match=match) as caught:
        parse_submission(data)
    assert type(caught.value) is error, f"expected {error.__name__}, got {type(caught.value).__name__}"
    if metadata:
        parse_artifact(data)
    else:
        with pytest.raises(error) as by_reader:
            parse_artifact(data)
        assert str(by_reader.value) == str(caught.value)
    return caught.value


# ---- round trip ---------------------------------------------------------------------------------------------


def test_round_trip(state: dict[str, torch.Tensor], good_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.pgolf"
    path.write_bytes(good_bytes)
    artifact = read_artifact(path)
    manifest = artifact.manifest
    assert manifest["model_config"] == asdict(SMALL)
    assert manifest["tokenizer"] == {"sha256": TOKENIZER_SHA, "vocab_size": SMALL.vocab_size}
    assert manifest["training"] == TRAINING
    assert manifest["code_bytes"] == {"total": CODE.total, "files": CODE.files}
    assert manifest["payload"]["level"] == 1 and artifact.file_nbytes == len(good_bytes)
    assert artifact.file_sha256 == hashlib.sha256(good_bytes).hexdigest()
    assert artifact.model_config == SMALL

    encodings = {r["name"]: r["encoding"] for r in manifest["tensors"]}
    assert encodings["blocks.1.mlp.fc.weight"] == INT6_ROW and encodings["tok_emb.weight"] == "int8_row"
    for qt in quantize_state_dict(state):  # the stored form, as the writer made it
        original, restored = state[qt.name], artifact.state_dict[qt.name]
        assert restored.dtype == original.dtype and restored.shape == original.shape
        if qt.encoding == "fp16":  # passthrough: exactly the fp16 value
            assert torch.equal(restored, original.half().float()), qt.name
        else:  # within half a step of the clipped value
            step = torch.from_numpy(qt.scales).double().reshape(-1, *([1] * (original.ndim - 1)))
            qmax = {"int8_row": 127, "int6_row": 31}[qt.encoding]
            clipped = torch.maximum(torch.minimum(original.double(), qmax * step), -qmax * step)
            assert bool(((clipped - restored.double()).abs() <= step / 2 * (1 + 1e-6)).all()), qt.name

    # The reader's state_dict is exactly what the quantiser's own round trip gives.
    expected = {qt.name: dequantize_tensor(qt) for qt in quantize_state_dict(state)}
    assert all(torch.equal(expected[n], artifact.state_dict[n]) for n in expected)

    model, loaded = load_model(path)
    assert not model.training and loaded.manifest == manifest
    reference = GPT(SMALL)
    reference.load_state_dict(expected)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.forward_logits(tokens), reference.forward_logits(tokens))
        model.tok_emb.weight.add_(1.0)  # in-place updates (as TTT does) must not reach the artifact's tensors
    assert torch.equal(loaded.state_dict["tok_emb.weight"], expected["tok_emb.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_write_is_atomic_and_validates_before_writing(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "out" / "model.pgolf"
    bad_training = {**TRAINING, "steps": -1}
    with pytest.raises(art.SchemaViolation, match="training.steps"):
        write_artifact(path, state, SMALL, TOKENIZER_SHA, SMALL.vocab_size, bad_training, code_bytes=CODE, level=1)
    assert not path.exists()
    with pytest.raises(art.ShapeMismatch):  # a state_dict for another config is refused at write time too
        write_artifact(path, state, ModelConfig(), TOKENIZER_SHA, 1024, TRAINING, code_bytes=CODE, level=1)
    size = write_artifact(path, state, SMALL, TOKENIZER_SHA, SMALL.vocab_size, TRAINING, code_bytes=CODE, level=1)
    assert path.stat().st_size == size
    assert [p.name for p in path.parent.iterdir()] == ["model.pgolf"]  # no temp file left behind


# ---- refusals -----------------------------------------------------------------------------------------------


def test_error_classes_have_distinct_codes() -> None:
    codes = [cls.code for cls in ALL_ERRORS]
    assert len(ALL_ERRORS) >= 16 and len(codes) == len(set(codes))
    assert all(issubclass(cls, ValueError) for cls in ALL_ERRORS)


def test_oversize_file_refused_before_reading(tmp_path: Path, good_bytes: bytes) -> None:
    sparse = tmp_path / "huge.pgolf"
    with sparse.open("wb") as fh:
        fh.truncate(16_000_001)  # one byte over the cap; sparse, so nothing is really written
    with pytest.raises(art.FileTooLarge, match="16000001 bytes exceeds the limit of 16000000"):
        read_artifact(sparse)
    small_limit = tmp_path / "model.pgolf"
    small_limit.write_bytes(good_bytes)
    with pytest.raises(art.FileTooLarge):
        read_artifact(small_limit, max_file_bytes=len(good_bytes) - 1)
    assert read_artifact(small_limit, max_file_bytes=len(good_bytes)).file_nbytes == len(good_bytes)


def test_truncated_and_trailing(good_bytes: bytes) -> None:
    manifest_len = struct.unpack_from("<I", good_bytes, 12)[0]
    refuses(good_bytes[:5], art.Truncated, "shorter than the 16-byte header")
    refuses(good_bytes[:12], art.Truncated, "shorter than the 16-byte header")
    refuses(good_bytes[: HEADER_NBYTES + manifest_len - 3], art.Truncated, "manifest truncated")
    refuses(good_bytes[:-1], art.Truncated, "payload truncated")
    refuses(good_bytes + b"\0", art.TrailingData, "1 unexpected bytes")


def test_bad_magic_including_pickles(good_bytes: bytes, tmp_path: Path) -> None:
    refuses(b"GARBAGE!" + good_bytes[8:], art.BadMagic, "not a pgolf artifact")
    # A pickle (even one that would run code when loaded) is never unpickled: its first bytes are not the magic.
    refuses(pickle.dumps({"w": torch.zeros(3)}), art.BadMagic, "not a pgolf artifact")
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")  # torch.save writes a zip of pickles
    with pytest.raises(art.BadMagic):
        read_artifact(tmp_path / "model.pt")


def test_unsupported_version(good_bytes: bytes) -> None:
    manifest, payload = split(good_bytes)
    refuses(assemble(manifest, payload, version=2), art.UnsupportedVersion, "version 2 is not supported")


def test_manifest_too_large(good_bytes: bytes) -> None:
    header = MAGIC + struct.pack("<II", 1, art.MAX_MANIFEST_BYTES + 1)
    refuses(header + good_bytes[HEADER_NBYTES:], art.ManifestTooLarge, "over the 1048576 limit")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe{}",  # not UTF-8
        b'{"a": NaN}',  # Python's json would accept it; JSON does not
        b'{"a": 1e999}',
        b'{"a": 1, "a": 2}',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust the parser's recursion
    ],
)
def test_manifest_not_json(good_bytes: bytes, body: bytes) -> None:
    refuses(assemble(body, split(good_bytes)[1]), art.ManifestNotJSON, "not valid UTF-8 JSON")


def _mutate(manifest: dict[str, Any], change: str) -> None:
    tensors = manifest["tensors"]
    if change == "not an object":
        manifest.clear()
    elif change == "missing top-level field":
        del manifest["training"]
    elif change == "extra top-level field":
        manifest["exec"] = "import os"
    elif change == "wrong-typed field":
        manifest["training"]["steps"] = "12"
    elif change == "boolean as integer":
        manifest["training"]["seed"] = True
    elif change == "non-scalar training extra":
        manifest["training"]["extra"] = [1, 2]
    elif change == "negative offset":
        tensors[0]["offset"] = -1
    elif change == "overlapping offsets":
        tensors[1]["offset"] -= 1
    elif change == "gap between tensors":
        tensors[1]["offset"] += 2
    elif change == "nbytes disagrees with shape":
        tensors[0]["nbytes"] += 2
    elif change == "unknown encoding":
        tensors[-1]["encoding"] = "int4_row"
    elif change == "encoding for the wrong dtype":
        tensors[0]["dtype"] = "int64"
    elif change == "negative dimension":
        tensors[0]["shape"] = [-1]
    elif change == "duplicate tensor name":
        tensors[1]["name"] = tensors[0]["name"]
    elif change == "missing scale fields":
        del next(t for t in tensors if t["encoding"] == INT6_ROW)["scale_offset"]
    elif change == "unknown model_config key":
        manifest["model_config"]["evil"] = 1
    elif change == "model_config value of the wrong type":
        manifest["model_config"]["model_dim"] = 256.0
    elif change == "model_config the model rejects":
        manifest["model_config"]["num_kv_heads"] = 3
    elif change == "model_config that crashes the model":
        manifest["model_config"]["num_heads"] = 0
    elif change == "model_config too large to exist":
        manifest["model_config"]["model_dim"] = 2**62
    elif change == "unknown compression":
        manifest["payload"]["compression"] = "lzma"
    elif change == "code bytes that do not add up":
        manifest["code_bytes"]["total"] += 1
    elif change == "payload hash not hex":
        manifest["payload"]["raw_sha256"] = "XYZ"
    else:
        raise AssertionError(change)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("not an object", "manifest must be a JSON object"),
        ("missing top-level field", "manifest is missing training"),
        ("extra top-level field", "manifest has unknown field.s. exec"),
        ("wrong-typed field", "training.steps must be a non-negative integer"),
        ("boolean as integer", "training.seed must be an integer"),
        ("non-scalar training extra", "training.extra must be a string .*, number, boolean or null"),
        ("negative offset", "offset must be a non-negative integer"),
        ("overlapping offsets", "offset \\d+ overlaps; expected"),
        ("gap between tensors", "offset \\d+ leaves a gap; expected"),
        ("nbytes disagrees with shape", "nbytes must be"),
        ("unknown encoding", "encoding 'int4_row' is not one of"),
        ("encoding for the wrong dtype", "dtype 'int64' cannot use encoding 'fp16'"),
        ("negative dimension", "shape must be a list of at most 8 non-negative integers"),
        ("duplicate tensor name", "duplicate tensor name"),
        ("missing scale fields", "is missing scale_offset"),
        ("unknown model_config key", "model_config has unknown field.s. evil"),
        ("model_config value of the wrong type", "model_config.model_dim must be an integer"),
        ("model_config the model rejects", "model_config does not build a model: .*num_kv_heads"),
        ("model_config that crashes the model", r"model_config.num_heads is 0, outside the bounds \[1, 256\]"),
        ("model_config too large to exist", r"model_config.model_dim is 4611686018427387904, outside the bounds"),
        ("unknown compression", "payload.compression must be 'zstd'"),
        ("code bytes that do not add up", "code_bytes.total must equal the sum"),
        ("payload hash not hex", "payload.raw_sha256 must be 64 lowercase hex digits"),
    ],
)
def test_schema_violations(good_bytes: bytes, change: str, match: str) -> None:
    manifest, payload = split(good_bytes)
    _mutate(manifest, change)
    refuses(assemble(manifest if manifest else [], payload), art.SchemaViolation, match,
            metadata=change in METADATA_CHANGES)


# Faults inside the training and code_bytes sections: refused where an artifact enters, not by the evaluation.
METADATA_CHANGES = {"wrong-typed field", "boolean as integer", "non-scalar training extra",
                    "code bytes that do not add up"}


def test_the_evaluation_still_checks_the_metadata_it_reads(good_bytes: bytes) -> None:
    """The engine reads ``training`` as an object and ``code_bytes.total``: the reader checks those two itself."""
    manifest, payload = split(good_bytes)
    manifest["training"] = []
    refuses(assemble(manifest, payload), art.SchemaViolation, "training must be an object, got list")
    manifest["training"] = {"seed": 0}  # an object without the required fields: only the upload path minds
    refuses(assemble(manifest, payload), art.SchemaViolation, "training is missing steps", metadata=True)
    manifest, payload = split(good_bytes)
    manifest["code_bytes"]["total"] = "1000"
    with pytest.raises(art.SchemaViolation, match="code_bytes.total must equal the sum of code_bytes.files"):
        parse_submission(assemble(manifest, payload))
    with pytest.raises(art.SchemaViolation, match="code_bytes.total must be a non-negative integer"):
        parse_artifact(assemble(manifest, payload))
    manifest["code_bytes"] = []
    refuses(assemble(manifest, payload), art.SchemaViolation, "code_bytes must be an object, got list")


def test_a_train_seq_len_the_engine_cannot_evaluate_at(good_bytes: bytes) -> None:
    """The engine evaluates at the recorded train_seq_len: it is bounded like the model's rope_train_seq_len."""
    manifest, payload = split(good_bytes)
    manifest["training"]["train_seq_len"] = 2**24
    message = r"training.train_seq_len 16777216 is outside \[1, 1048576\]"
    refuses(assemble(manifest, payload), art.SchemaViolation, message)
    manifest["training"]["train_seq_len"] = 2**20
    parse_submission(assemble(manifest, payload))


def test_declared_raw_size_over_the_bound(good_bytes: bytes) -> None:
    manifest, payload = split(good_bytes)
    manifest["payload"]["raw_nbytes"] = art.MAX_RAW_NBYTES + 1
    refuses(assemble(manifest, payload), art.DeclaredSizeTooLarge, "exceeds the bound of 268435456")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sha256", "ABC", "64 lowercase hex"),
        ("sha256", TOKENIZER_SHA.upper(), "64 lowercase hex"),
        ("vocab_size", "1024", "positive integer"),
        ("vocab_size", 0, "positive integer"),
        ("vocab_size", 8192, "disagrees with model_config.vocab_size 1024"),
        ("path", "/etc/passwd", "exactly sha256 and vocab_size"),
    ],
)
def test_tokenizer_fields(good_bytes: bytes, field: str, value: Any, match: str) -> None:
    manifest, payload = split(good_bytes)
    manifest["tokenizer"][field] = value
    refuses(assemble(manifest, payload), art.TokenizerFieldError, match)


def test_tampered_payload_byte(good_bytes: bytes) -> None:
    tampered = bytearray(good_bytes)
    tampered[-100] ^= 0x01
    refuses(bytes(tampered), art.HashMismatch, "compressed payload sha256")
    manifest, payload = split(good_bytes)
    manifest["payload"]["raw_sha256"] = "0" * 64  # compressed hash intact, raw hash wrong
    refuses(assemble(manifest, payload), art.HashMismatch, "raw payload sha256")


def test_decompression_bomb(good_bytes: bytes) -> None:
    """A frame with honest hashes, no content size in its header, that expands 512 MiB past the declared size."""
    manifest, _ = split(good_bytes)
    raw = raw_payload(good_bytes)
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    zeros = bytes(1 << 20)
    bomb = compressor.compress(raw) + b"".join(compressor.compress(zeros) for _ in range(512)) + compressor.flush()
    assert len(bomb) < len(raw) + (1 << 20)  # small on disk
    refuses(with_payload(manifest, bomb), art.DecompressionBomb, f"past its declared raw size of {len(raw)}")


def test_payload_in_several_frames_is_accepted(good_bytes: bytes) -> None:
    manifest, _ = split(good_bytes)
    raw = raw_payload(good_bytes)
    two_frames = b"".join(zstandard.ZstdCompressor(level=1).compress(part) for part in (raw[:1000], raw[1000:]))
    assert parse_artifact(with_payload(manifest, two_frames)).manifest["payload"]["raw_nbytes"] == len(raw)


def test_payload_that_is_not_zstd_or_too_short(good_bytes: bytes) -> None:
    manifest, _ = split(good_bytes)
    refuses(with_payload(manifest, b"this is not a zstd frame"), art.PayloadCorrupt, "not a valid zstd stream")
    raw = raw_payload(good_bytes)
    short = zstandard.ZstdCompressor(level=1).compress(raw[:-10])
    refuses(with_payload(manifest, short), art.PayloadCorrupt, f"decompresses to {len(raw) - 10} bytes")


def test_shapes_that_disagree_with_the_config(good_bytes: bytes) -> None:
    manifest, payload = split(good_bytes)
    fc = next(t for t in manifest["tensors"] if t["name"] == "blocks.0.mlp.fc.weight")
    fc["shape"] = fc["shape"][::-1]  # same byte count, transposed
    fc["scale_nbytes"] = 2 * fc["shape"][0]
    fc["nbytes"] = fc["shape"][0] * fc["shape"][1]
    # Re-tile the scales after the resized one so the table stays contiguous and the shape check is what fires.
    cursor = 0
    for record in manifest["tensors"]:
        record["offset"], cursor = cursor, cursor + record["nbytes"]
        if "scale_offset" in record:
            record["scale_offset"], cursor = cursor, cursor + record["scale_nbytes"]
    manifest["payload"]["raw_nbytes"] = cursor
    expected = r"fc.weight: artifact shape \[128, 640\] but model expects \[640, 128\]"
    refuses(assemble(manifest, payload), art.ShapeMismatch, expected)

    manifest, payload = split(good_bytes)
    manifest["model_config"]["mlp_mult"] = 2
    refuses(assemble(manifest, payload), art.ShapeMismatch, "but model expects")

    manifest, payload = split(good_bytes)
    manifest["model_config"]["num_layers"] = 4  # within bounds, but more parameters than the payload can hold
    manifest["model_config"]["xsa_last_n"] = 4
    refuses(assemble(manifest, payload), art.ShapeMismatch, r"names disagree with the model: missing \[.blocks.3")

    manifest, payload = split(good_bytes)
    manifest["tensors"][0]["name"] = "not_in_the_model"
    refuses(assemble(manifest, payload), art.ShapeMismatch, "unexpected .'not_in_the_model'.")


def test_invalid_tensor_values(good_bytes: bytes) -> None:
    manifest, _ = split(good_bytes)
    record = next(t for t in manifest["tensors"] if t["encoding"] == INT6_ROW)
    for position, value, match in (
        (record["scale_offset"], b"\x00\x7c", "scales must be finite and positive"),  # fp16 +inf
        (record["scale_offset"], b"\x00\x00", "scales must be finite and positive"),
        (record["offset"], b"\x28", r"values outside \[-31, 31\]"),  # q = 40
    ):
        raw = bytearray(raw_payload(good_bytes))
        raw[position : position + len(value)] = value
        compressed = zstandard.ZstdCompressor(level=1).compress(bytes(raw))
        refuses(with_payload(json.loads(json.dumps(manifest)), compressed, bytes(raw)), art.InvalidTensorData, match)


# ---- fit-to-budget ladder -----------------------------------------------------------------------------------


def test_int5_downgrade_order() -> None:
    assert int5_downgrade_order(11) == [5, 6, 4, 7, 3, 8, 2, 9, 1, 10, 0]
    assert int5_downgrade_order(3) == [1, 2, 0]
    assert int5_downgrade_order(1) == [0]


def _artifact_size(state: dict[str, torch.Tensor], int5_blocks: list[int], level: int) -> int:
    return len(
        export.encode_artifact(
            quantize_state_dict(state, int5_blocks=int5_blocks),
            model_config=SMALL,
            tokenizer_sha256=TOKENIZER_SHA,
            vocab_size=SMALL.vocab_size,
            training=TRAINING,
            code_bytes=CODE,
            level=level,
        )
    )


def test_ladder_moves_to_int5_from_the_middle(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    int6_sizes = [_artifact_size(state, [], level) for level in export.ZSTD_LADDER_LEVELS]
    int5_middle = _artifact_size(state, [1], export.ZSTD_LADDER_LEVELS[0])
    assert int5_middle < min(int6_sizes)
    budget = CODE.total + int5_middle  # fits exactly at the first int5 rung, not before
    lines: list[str] = []
    result = export_to_budget(tmp_path / "m.pgolf", state, SMALL, TOKENIZER_SHA, SMALL.vocab_size, TRAINING,
                              code_bytes=CODE, budget_bytes=budget, log=lines.append)
    print("\n".join(lines))
    assert (result.winner.label, result.winner.level, result.winner.int5_blocks) == ("int6+int5x1", 16, (1,))
    assert result.total_nbytes == budget and result.limit == int5_middle
    assert [(a.label, a.level) for a in result.attempts] == [("int6", lv) for lv in (16, 1, 17, 2)] + [
        ("int6+int5x1", 16)
    ]
    tries = [line for line in lines if line.startswith("quant_try")]
    assert tries[0] == f"quant_try int6 zstd-16: {int6_sizes[0]} bytes (limit {int5_middle})"
    assert len(tries) == 5 and f"Total submission size: {budget} bytes" in lines

    encodings = {r["name"]: r["encoding"] for r in read_artifact(result.path).manifest["tensors"]}
    assert encodings["blocks.1.mlp.fc.weight"] == INT5_ROW
    assert encodings["blocks.0.mlp.fc.weight"] == encodings["blocks.2.mlp.fc.weight"] == INT6_ROW


def test_ladder_raises_when_nothing_fits(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(BudgetExceeded, match=r"smallest artifact \d+ bytes > limit 5000 .* after 16 attempts"):
        export_to_budget(tmp_path / "m.pgolf", state, SMALL, TOKENIZER_SHA, SMALL.vocab_size, TRAINING,
                         code_bytes=CODE, budget_bytes=CODE.total + 5000, log=lines.append)
    assert not (tmp_path / "m.pgolf").exists() and list(tmp_path.iterdir()) == []
    labels = [re.match(r"quant_try (\S+) zstd-(\d+)", line).groups() for line in lines]
    assert labels[:5] == [("int6", "16"), ("int6", "1"), ("int6", "17"), ("int6", "2"), ("int6+int5x1", "16")]
    assert labels[-1] == ("int6+int5x3", "2")


def test_random_init_pr940_fits_the_cap_with_counted_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig()
    code = counted_code_bytes()
    lines: list[str] = []
    result = export_to_budget(tmp_path / "pr940.pgolf", GPT(config).state_dict(), config, TOKENIZER_SHA,
                              config.vocab_size, TRAINING, code_bytes=code, log=lines.append)
    print("\n".join(lines))
    print(f"pr940 random init: rung {result.winner.label} zstd-{result.winner.level}, artifact "
          f"{result.artifact_nbytes} + code {result.code_nbytes} = {result.total_nbytes} bytes")
    assert result.total_nbytes <= 16_000_000
    assert (tmp_path / "pr940.pgolf").stat().st_size == result.artifact_nbytes
    assert read_artifact(result.path).manifest["code_bytes"]["total"] == code.total
