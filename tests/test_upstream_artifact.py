"""The upstream .ptz reader: round trips of upstream-format files, and every hostile case refused by its code."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import zstandard

from tests.upstream_export import (
    compress,
    int8_clean_export,
    mixed_int6_export,
    torch_zip,
    upstream_dequantize,
    upstream_state_dict,
    write_ptz,
)
from trainer.artifact import ArtifactError
from trainer.model import GPT, ModelConfig
from trainer.upstream_artifact import (
    INT8_FORMAT,
    MIXED_INT6_FORMAT,
    expected_tensors,
    parse_upstream_artifact,
    raw_limit,
    read_upstream_artifact,
)
from trainer.upstream_config import resolve_upstream_config

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
PR940_CODE = FIXTURES / "pr940_train_gpt.py"
BASELINE_CODE = FIXTURES / "baseline_train_gpt.py"
# A small instance of the #940 stack: block MLP matrices (576×192) and tok_emb (1024×192) are above the 65,536
# passthrough threshold, so int6/int5 rows, int8 rows and fp16/fp32 passthrough all occur.
PR940_ENV = {"NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
             "BIGRAM_VOCAB_SIZE": "256", "BIGRAM_DIM": "64", "XSA_LAST_N": "2", "LEAKY_SLOPE": "0.5"}
BASELINE_ENV = {"MODEL_DIM": "192", "NUM_HEADS": "4", "MLP_MULT": "2"}


def config_of(code: Path, env: dict[str, str]) -> ModelConfig:
    return resolve_upstream_config(code.read_bytes(), env).model_config


def trained_like_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """pgolf's init plus noise everywhere, so that zero-initialised layers carry signal too."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def upstream_file(tmp_path: Path, kind: str, compression: str, seed: int = 0) -> tuple[Path, ModelConfig, dict]:
    """An upstream-format artifact of random weights, its config, and upstream's own dequantisation of it."""
    code, env = (PR940_CODE, PR940_ENV) if kind == "int6" else (BASELINE_CODE, BASELINE_ENV)
    config = config_of(code, env)
    weights = upstream_state_dict(trained_like_weights(config, seed))
    obj = mixed_int6_export(weights, frozenset({1})) if kind == "int6" else int8_clean_export(weights)
    path = write_ptz(tmp_path / f"final_model.{kind}.ptz", obj, compression)
    reference = {k: v.float() for k, v in upstream_dequantize(obj, weights).items()}
    return path, config, reference


@pytest.mark.parametrize(("kind", "compression", "quant_format"), [
    ("int8", "zlib", INT8_FORMAT), ("int6", "zstd", MIXED_INT6_FORMAT), ("int6", "lzma", MIXED_INT6_FORMAT),
    ("int6", "brotli", MIXED_INT6_FORMAT), ("int8", "lzma", INT8_FORMAT)])
def test_reader_decodes_exactly_what_upstream_dequantises(tmp_path, kind, compression, quant_format):
    path, config, reference = upstream_file(tmp_path, kind, compression)
    artifact = read_upstream_artifact(path, config)
    assert artifact.quant_format == quant_format
    assert artifact.compression == ("xz" if compression == "lzma" else compression)
    assert list(artifact.state_dict) == list(expected_tensors(config))
    for name, tensor in reference.items():
        assert torch.equal(artifact.state_dict[name], tensor), name
    encodings = set(artifact.encodings.values())
    assert ({"int6", "int5", "int8", "passthrough"} <= encodings if kind == "int6"
            else {"int8", "passthrough"} <= encodings)


def test_embedding_tables_are_rounded_through_bf16_as_in_upstreams_model(tmp_path):
    path, config, _ = upstream_file(tmp_path, "int6", "zstd")
    artifact = read_upstream_artifact(path, config)
    tok = artifact.state_dict["tok_emb.weight"]
    assert torch.equal(tok, tok.to(torch.bfloat16).float())


# ---- hostile files -----------------------------------------------------------------------------------------


class _Canary:
    """Unpickling this calls os.system(touch CANARY): if the reader ever ran a pickle global, the file appears."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _refused(data: bytes, config: ModelConfig) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        parse_upstream_artifact(data, config)
    return info.value


@pytest.fixture(scope="module")
def pr940_config() -> ModelConfig:
    return config_of(PR940_CODE, PR940_ENV)


@pytest.fixture(scope="module")
def good_obj(pr940_config) -> dict:
    return mixed_int6_export(upstream_state_dict(trained_like_weights(pr940_config)))


def hostile_payloads(canary: Path, config: ModelConfig, good: dict) -> dict[str, bytes]:
    """One file per hostile case, keyed by the code the reader must refuse it with."""
    limit = raw_limit(expected_tensors(config))
    zeros = b"\0" * (limit + 1024)
    good_zip = torch_zip(good)

    def zip_with(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=method) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return buffer.getvalue()

    # A torch zip whose pickle declares a storage far larger than its record.
    archive = zipfile.ZipFile(io.BytesIO(good_zip))
    members = {info.filename: archive.read(info) for info in archive.infolist()}
    prefix = next(n for n in members if n.endswith("data.pkl"))[: -len("data.pkl")]
    key = next(n for n in members if n.startswith(prefix + "data/")).rsplit("/", 1)[1]
    big = {**members, f"{prefix}data/{key}": members[f"{prefix}data/{key}"][:16]}

    missing = {"w": dict(good["w"]), "m": dict(good["m"])}
    del missing["w"]["smear.gate"], missing["m"]["smear.gate"]
    extra = {"w": {**good["w"], "lm_head.weight": torch.zeros(4, 4)}, "m": {**good["m"], "lm_head.weight":
                                                                             "passthrough"}}
    wrong_shape = {"w": {**good["w"], "smear.gate": torch.zeros(7, dtype=torch.float16)}, "m": good["m"]}
    not_tensor = {"w": {**good["w"], "smear.gate": [0.0] * 192}, "m": good["m"]}
    return {
        "forbidden_pickle_global": compress(torch_zip({"w": _Canary(canary), "m": {}}), "zstd"),
        "decompression_bomb": zstandard.ZstdCompressor(level=3).compress(zeros),
        "decompression_bomb+zlib": zlib.compress(zeros, 9),
        "decompression_bomb+lzma": compress(zeros, "lzma"),
        "zip_bomb": compress(zip_with({"archive/data.pkl": b"\0" * (4 << 20)}, zipfile.ZIP_DEFLATED), "zlib"),
        "storage_out_of_bounds": compress(zip_with(big), "zstd"),
        "not_a_tensor": compress(torch_zip(not_tensor), "zstd"),
        "missing_tensors": compress(torch_zip(missing), "zstd"),
        "unexpected_tensors": compress(torch_zip(extra), "zstd"),
        "shape_mismatch": compress(torch_zip(wrong_shape), "zstd"),
        "unknown_upstream_format": compress(torch_zip({"state": good["w"]}), "zstd"),
        "unknown_compression": b"\x13\x37" + bytes(range(200)),
    }


def test_every_hostile_file_is_refused_with_its_own_code_and_runs_nothing(tmp_path, pr940_config, good_obj):
    canary = tmp_path / "canary"
    payloads = hostile_payloads(canary, pr940_config, good_obj)
    codes = {case: _refused(data, pr940_config).code for case, data in payloads.items()}
    assert codes == {case: case.split("+")[0] for case in payloads}
    assert not canary.exists()


def test_a_pickle_naming_any_global_is_refused_before_it_resolves(pr940_config):
    for module, name in [("os", "system"), ("builtins", "eval"), ("torch", "load"),
                         ("torch._utils", "_rebuild_parameter"), ("numpy", "array"), ("collections", "Counter")]:
        blob = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
        data = compress(_torch_zip_with_pickle(blob), "zstd")
        error = _refused(data, pr940_config)
        assert error.code == "forbidden_pickle_global" and f"{module}.{name}" in str(error)


def _torch_zip_with_pickle(blob: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", blob)
        archive.writestr("archive/byteorder", b"little")
    return buffer.getvalue()


def test_a_build_opcode_cannot_rewrite_a_checked_tensor(pr940_config, good_obj):
    """BUILD on a tensor record (to change its shape after the checks) is refused, not obeyed."""
    raw = bytearray(torch_zip(good_obj))
    archive = zipfile.ZipFile(io.BytesIO(bytes(raw)))
    members = {i.filename: archive.read(i) for i in archive.infolist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    # Append BUILD with a state dict after the first REDUCE (the first tensor).
    pkl = members[name]
    at = pkl.index(b"R") + 1
    members[name] = pkl[:at] + b"}X\x04\x00\x00\x00sizeK\x07sb" + pkl[at:]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for member, data in members.items():
            out.writestr(member, data)
    error = _refused(compress(buffer.getvalue(), "zstd"), pr940_config)
    assert error.code in ("malformed_pickle", "forbidden_pickle_global")


def test_truncated_and_trailing_streams_are_refused(pr940_config, good_obj):
    data = compress(torch_zip(good_obj), "zlib")
    assert _refused(data[: len(data) // 2], pr940_config).code == "payload_corrupt"
    assert _refused(data + b"junk", pr940_config).code == "trailing_data"


def test_quantised_values_outside_the_declared_range_are_refused(pr940_config, good_obj):
    name = next(n for n, m in good_obj["m"].items() if m == {"type": "int6"})
    bad = {"w": dict(good_obj["w"]), "m": good_obj["m"]}
    q = bad["w"][name + ".q"].clone()
    q.view(-1)[0] = 100
    bad["w"][name + ".q"] = q
    assert _refused(compress(torch_zip(bad), "zstd"), pr940_config).code == "invalid_tensor_data"


def test_a_plain_unpickler_would_have_run_the_canary(tmp_path):
    """The canary is real: a general unpickler runs it (so the refusal test above can fail)."""
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Canary(canary)))
    assert canary.exists()


def test_config_is_read_from_code_in_python_312_fstring_syntax():
    # Records written on Python 3.12 reuse quotes inside f-string fields; pgolf runs on 3.11 and must still read
    # their Hyperparameters (the same static parser as the scanner's, not ast.parse alone).
    code = PR940_CODE.read_text() + '\nprint(f"{os.environ.get("NUM_LAYERS", "11")} layers")\n'
    try:
        compile(code, "train_gpt.py", "exec")
        pytest.skip("this interpreter already parses PEP 701 f-strings natively")
    except SyntaxError:
        pass
    assert resolve_upstream_config(code, PR940_ENV).model_config == config_of(PR940_CODE, PR940_ENV)
