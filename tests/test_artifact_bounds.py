"""The reader's explicit bounds (docs/artifact-format.md §5) and its finiteness check in the dtypes the model uses.

Every refusal must be the reader's own error, raised before the offending field sizes anything, with a message
that names the field and does not echo megabytes of attacker input.
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from test_artifact import assemble, good_bytes, raw_payload, refuses, split, state, with_payload  # noqa: F401

from trainer import artifact as art
from trainer.model import ModelConfig


def test_every_integer_field_of_the_model_config_has_a_bound() -> None:
    """A new ModelConfig integer field without a bound would be refused in every artifact: this names it first."""
    hints = typing.get_type_hints(ModelConfig)
    integers = {f.name for f in fields(ModelConfig) if hints[f.name] is int}
    assert integers <= set(art.MODEL_CONFIG_BOUNDS), integers - set(art.MODEL_CONFIG_BOUNDS)
    assert set(art.MODEL_CONFIG_BOUNDS) <= {f.name for f in fields(ModelConfig)}  # no bound for a gone field


@pytest.mark.parametrize("field", sorted(art.MODEL_CONFIG_BOUNDS))
@pytest.mark.parametrize("side", ["below", "above"])
def test_each_model_config_bound_is_enforced(good_bytes: bytes, field: str, side: str) -> None:  # noqa: F811
    lo, hi = art.MODEL_CONFIG_BOUNDS[field]
    manifest, payload = split(good_bytes)
    is_int = isinstance(manifest["model_config"][field], int)
    step = 1 if is_int else max(abs(hi), abs(lo), 1.0) * 1e-3
    manifest["model_config"][field] = (lo - step) if side == "below" else (hi + step)
    refuses(assemble(manifest, payload), art.SchemaViolation, f"model_config.{field} is .*, outside the bounds")


def test_the_bomb_manifest_is_refused_by_its_bound(good_bytes: bytes) -> None:  # noqa: F811
    manifest, payload = split(good_bytes)
    manifest["model_config"]["num_layers"] = 10**18
    refuses(assemble(manifest, payload), art.SchemaViolation, r"num_layers is 1000000000000000000, outside the bounds")
    manifest["model_config"]["num_layers"] = 10**30  # more digits than any field of the format can need
    refuses(assemble(manifest, payload), art.ManifestNotJSON, "integer literal of 31 characters")


@pytest.mark.parametrize("depth", [9, 100, 100_000])
def test_deep_json_is_refused(good_bytes: bytes, depth: int) -> None:  # noqa: F811
    manifest, payload = split(good_bytes)
    text = json.dumps(manifest).replace('"training": {', '"training": {"deep": ' + "[" * depth + "]" * depth + ", ")
    with pytest.raises(art.ArtifactError, match="nests deeper than 8 levels|not valid UTF-8 JSON"):
        art.parse_artifact(assemble(text.encode(), payload))


@pytest.mark.parametrize(
    ("change", "error", "match", "metadata"),
    [
        (lambda m: m["tensors"][0].update(dtype=["float16"]), art.SchemaViolation, r"dtype \['float16'\] cannot use",
         False),
        (lambda m: m["tensors"][0].update(dtype={"a": 1}), art.SchemaViolation, "cannot use encoding", False),
        (lambda m: m["tensors"][0].update(encoding=["fp16"]), art.SchemaViolation, "is not one of", False),
        (lambda m: m["tensors"][0].update(shape=[2**62, 2**62]), art.SchemaViolation, "non-negative integers of at",
         False),
        (lambda m: m["tensors"][0].update(name="n" * 257), art.SchemaViolation, "string of 1 to 256 characters",
         False),
        (lambda m: m["tensors"].extend([m["tensors"][0]] * art.MAX_TENSORS), art.SchemaViolation,
         "more than the bound 4096", False),
        # The metadata sections: bounded at upload; the evaluation only bounds them by the manifest's limits.
        (lambda m: m["training"].update(world_size=2**40), art.SchemaViolation, "world_size must be an integer in",
         True),
        (lambda m: m["training"].update(note="x" * 500_000), art.SchemaViolation, "at most 4096 characters", True),
        (lambda m: m["code_bytes"]["files"].update({f"f{i}": 0 for i in range(10_001)}), art.SchemaViolation,
         "at most 10000 paths", True),
        (lambda m: m["payload"].update(raw_nbytes=2**63), art.DeclaredSizeTooLarge, "exceeds the bound", False),
        (lambda m: m["model_config"].update(model_dim="x" * 500_000), art.SchemaViolation, "must be an integer",
         False),
    ],
)
def test_fields_outside_their_bounds(good_bytes: bytes, change: Any, error: type, match: str,  # noqa: F811
                                     metadata: bool) -> None:
    manifest, payload = split(good_bytes)
    change(manifest)
    refused = refuses(assemble(manifest, payload), error, match, metadata=metadata)
    assert len(str(refused)) < 1000  # the message names the field; it does not echo the input


def test_weights_that_overflow_float16_when_restored_are_refused(good_bytes: bytes) -> None:  # noqa: F811
    """int8 values and fp16 scales are finite as stored, but q · scale = 127 · 65504 is inf in float16."""
    manifest, _ = split(good_bytes)
    record = next(t for t in manifest["tensors"] if t["encoding"] == "int8_row")
    record["dtype"] = "float16"
    raw = bytearray(raw_payload(good_bytes))
    raw[record["scale_offset"]: record["scale_offset"] + 2] = np.array([65504.0], dtype="<f2").tobytes()
    raw[record["offset"]] = 127
    compressed = zstandard.ZstdCompressor(level=1).compress(bytes(raw))
    refuses(with_payload(manifest, compressed, bytes(raw)), art.InvalidTensorData, "not finite in float16")
    # The same payload restored as float32 is finite (8.3e6), and loads.
    record["dtype"] = "float32"
    art.parse_artifact(with_payload(manifest, compressed, bytes(raw)))


def test_finiteness_is_checked_in_the_bf16_compute_dtype_too() -> None:
    """fp32 values near its maximum round to inf in bf16, the dtype linear layers compute in on CUDA."""
    assert torch.isinf(torch.tensor([3.3999e38]).to(torch.bfloat16)).all()
    with pytest.raises(art.InvalidTensorData, match="not finite in bfloat16"):
        art._finite_as_used("w", torch.tensor([1.0, 3.3999e38]))
    with pytest.raises(art.InvalidTensorData, match="not finite in float32"):
        art._finite_as_used("w", torch.tensor([1.0, float("nan")]))
    art._finite_as_used("w", torch.tensor([1.0, 3.0e38]))
    art._finite_as_used("ids", torch.tensor([2**62]))  # integer tensors have no infinity


def test_model_builds_are_cached_per_config(good_bytes: bytes) -> None:  # noqa: F811
    art._expected_tensors.cache_clear()
    art.parse_artifact(good_bytes)
    art.parse_artifact(good_bytes)
    info = art._expected_tensors.cache_info()
    assert (info.hits, info.misses) == (1, 1)
