"""Upstream-format artifacts evaluated through the engine score exactly what their weights score.

What is compared: the val_bpb of ``evaluate()`` on the .ptz file (reader + config from the fixture code and run
env) against ``evaluate_model()`` on pgolf's GPT holding upstream's own dequantisation of the same file
(tests/upstream_export.py), on the same tokens, windows and batching. Both non-overlapping and sliding windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.options import PLAIN, EvalOptions
from service.engine.run import evaluate, evaluate_model
from tests.test_upstream_artifact import BASELINE_CODE, BASELINE_ENV, PR940_CODE, PR940_ENV, upstream_file
from trainer.data.byte_accounting import ByteTables
from trainer.data.shards import load_validation_tokens
from trainer.model import GPT

MAX_TOKENS = 2049
SEQ_LEN = 128


def final(events) -> dict:
    events = list(events)
    assert events[-1]["type"] == "end", events[-1]
    return events[-1]


@pytest.mark.parametrize(("kind", "compression"), [("int8", "zlib"), ("int6", "zstd"), ("int6", "lzma")])
def test_upstream_artifact_scores_equal_its_dequantised_weights(tmp_path, embedded_data, kind, compression):
    path, config, reference = upstream_file(tmp_path, kind, compression, seed=3)
    code, env = (PR940_CODE, PR940_ENV) if kind == "int6" else (BASELINE_CODE, BASELINE_ENV)
    model = GPT(config)
    model.load_state_dict(reference, strict=True)
    model.eval()
    tokenizer = embedded_data / "tokenizer.model"
    tables = ByteTables.from_model_file(tokenizer, vocab_size=config.vocab_size)
    tokens = np.ascontiguousarray(load_validation_tokens(embedded_data, vocab_size=config.vocab_size)[:MAX_TOKENS])
    for stride in (SEQ_LEN, 64):
        options = EvalOptions(artifact=path, data_dir=embedded_data, code=code,
                              env=tuple(f"{k}={v}" for k, v in env.items()), seq_len=SEQ_LEN, stride=stride,
                              chunk_tokens=1024, batch_windows=4, device="cpu", max_tokens=MAX_TOKENS,
                              **PLAIN)  # the model's own scores: no TTT or n-gram in the way
        through_file = final(evaluate(options))
        with torch.inference_mode():
            direct = final(evaluate_model(model, tokens, tables, options, device="cpu"))
        assert through_file["targets_scored"] == direct["targets_scored"] == MAX_TOKENS - 1
        assert through_file["val_bpb"] == pytest.approx(direct["val_bpb"], rel=1e-6, abs=0)
        assert np.isfinite(through_file["val_bpb"]) and through_file["val_bpb"] > 0


def test_upstream_artifact_without_its_code_is_refused(tmp_path, embedded_data):
    path, _, _ = upstream_file(tmp_path, "int6", "zstd")
    event = list(evaluate(EvalOptions(artifact=path, data_dir=embedded_data, device="cpu", max_tokens=300)))[-1]
    assert event["type"] == "error" and event["code"] == "code_required"


def test_code_and_env_are_ignored_with_a_note_for_a_pgolf_artifact(tmp_path, embedded_data):
    from api_harness import write_tiny_artifact

    artifact = write_tiny_artifact(tmp_path / "tiny.pgolf", embedded_data / "tokenizer.model")
    events = list(evaluate(EvalOptions(artifact=artifact, data_dir=embedded_data, code=PR940_CODE,
                                       env=("NUM_LAYERS=2",), seq_len=64, stride=64, device="cpu",
                                       max_tokens=300)))
    assert events[-1]["type"] == "end"
    notes = events[0]["config"]["notes"]
    assert notes == ["--code and --env ignored: a .pgolf artifact carries its own model config"]
