"""Results the engine reports: strict JSON only (a non-finite score is an `error` event, never a result), and a
compliance verdict that includes the size rule (artifact + code ≤ 16,000,000 bytes) and the 600 s time limit."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from test_artifact import assemble, split
from test_engine_cli import FAST, EvalData, artifact, eval_data, evaluate_cli  # noqa: F401  (fixtures)
from test_engine_scoring import repetitive_tokens, tiny_model, tiny_tables

from service.engine.events import error_event
from service.engine.options import EvalOptions
from service.engine.run import SubmissionSize, evaluate_model
from service.judge import finite_events, judged, non_finite_path
from trainer.limits import EVAL_LIMIT_SECONDS

OPTIONS = EvalOptions(seq_len=32, stride=16, chunk_tokens=96, batch_windows=4, device="cpu")


def strict(events: list[dict]) -> list[str]:
    return [json.dumps(e, allow_nan=False) for e in events]  # raises ValueError on NaN/inf


def test_a_model_that_scores_nan_ends_with_an_error_event_and_no_result() -> None:
    model = tiny_model()
    tokens = repetitive_tokens(600)
    with torch.no_grad():
        model.tok_emb.weight[int(tokens[200])] = float("inf")  # this token's embedding poisons what follows it
    events = list(judged(evaluate_model(model, tokens, tiny_tables(), OPTIONS)))
    strict(events)
    terminal = events[-1]
    assert terminal["type"] == "error" and terminal["code"] == "non_finite_score", terminal
    assert "non-finite NLL" in terminal["reason"]
    assert not any(e["type"] == "end" for e in events)
    chunks = [e for e in events if e["type"] == "chunk"]
    assert terminal["targets_scored"] == (chunks[-1]["running_targets"] if chunks else 0)
    assert math.isfinite(terminal["nll_sum"])


def test_any_event_with_a_non_finite_number_becomes_an_error_with_the_figures_before_it() -> None:
    chunk = {"type": "chunk", "nll_sum": 12.5, "running_targets": 10, "running_bytes": 30, "elapsed_s": 1.0}
    end = {"type": "end", "val_bpb": float("nan"), "compliance": {"ttt": {"losses": [1.0, float("inf")]}},
           "elapsed_s": 2.0}
    assert non_finite_path(end) in ("val_bpb", "compliance.ttt.losses[1]")
    events = list(finite_events(iter([{"type": "start"}, chunk, end])))
    assert [e["type"] for e in events] == ["start", "chunk", "error"]
    error = events[-1]
    assert error["code"] == "non_finite_value" and "the end event holds a non-finite number" in error["reason"]
    assert (error["targets_scored"], error["bytes"], error["nll_sum"], error["elapsed_s"]) == (10, 30, 12.5, 2.0)
    strict(events)
    assert list(finite_events(iter([error_event(code="x", reason="y")])))[0]["code"] == "x"


def test_the_time_limit_is_600_s_whatever_the_budget() -> None:
    ticks = itertools.count(0.0, 250.0)  # every clock read is 250 s later: the run "takes" well over 600 s
    events = list(judged(evaluate_model(tiny_model(), repetitive_tokens(300), tiny_tables(),
                                        replace(OPTIONS, max_seconds=1e9), clock=lambda: next(ticks))))
    compliance = events[-1]["compliance"]
    assert events[-1]["type"] == "end" and events[-1]["elapsed_s"] > EVAL_LIMIT_SECONDS
    assert compliance["within_time_budget"] is True and compliance["within_time_limit"] is False
    assert compliance["time_limit_seconds"] == 600 and compliance["compliant"] is False
    assert compliance["scored_once"] and compliance["score_before_update"]  # only the time rule fails


def test_the_size_rule_counts_artifact_plus_code_against_16_000_000_bytes() -> None:
    def verdict(artifact_bytes: int, code_bytes: int) -> dict:
        size = SubmissionSize(artifact_bytes, code_bytes, "manifest code_bytes.total")
        events = list(judged(evaluate_model(tiny_model(), repetitive_tokens(200), tiny_tables(), OPTIONS,
                                            submission=size)))
        return events[-1]["compliance"]

    over = verdict(1_300_000, 15_000_000)  # the case: 16.3 MB in total
    assert over["size"] == {"artifact_bytes": 1_300_000, "code_bytes": 15_000_000, "total_bytes": 16_300_000,
                            "code_source": "manifest code_bytes.total", "limit_bytes": 16_000_000,
                            "within_limit": False}
    assert over["compliant"] is False
    at_the_limit = verdict(1_000_000, 15_000_000)
    assert at_the_limit["size"]["within_limit"] is True and at_the_limit["compliant"] is True


def test_an_artifact_declaring_too_much_code_is_not_compliant(eval_data: EvalData, artifact: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    manifest, payload = split(artifact.read_bytes())
    manifest["code_bytes"] = {"total": 15_999_000, "files": {"train_gpt.py": 15_999_000}}
    heavy = tmp_path / "heavy.pgolf"
    heavy.write_bytes(assemble(manifest, payload))
    status, events, stderr = evaluate_cli(heavy, "--data", eval_data.data_dir, "--tokenizer", eval_data.tokenizer,
                                          *FAST, "--max-seconds", "5000")
    assert status == 0, stderr
    compliance = events[-1]["compliance"]
    assert compliance["size"]["artifact_bytes"] == heavy.stat().st_size
    assert compliance["size"]["code_bytes"] == 15_999_000 and compliance["size"]["within_limit"] is False
    assert compliance["compliant"] is False and compliance["within_time_limit"] is True


def test_an_upstream_artifact_is_sized_with_its_script(tmp_path: Path, embedded_data: Path) -> None:
    """For a .ptz the rule counts bytes(train_gpt.py) + bytes(compressed model), the script given with --code."""
    from service.engine.run import evaluate
    from tests.test_upstream_artifact import PR940_CODE, PR940_ENV, upstream_file

    path, _, _ = upstream_file(tmp_path, "int6", "zstd", seed=3)
    options = EvalOptions(artifact=path, data_dir=embedded_data, code=PR940_CODE, device="cpu", max_tokens=300,
                          env=tuple(f"{k}={v}" for k, v in PR940_ENV.items()), seq_len=128, stride=128,
                          chunk_tokens=1024, batch_windows=4)
    end = list(judged(evaluate(options)))[-1]
    assert end["type"] == "end", end
    size = end["compliance"]["size"]
    assert size["artifact_bytes"] == path.stat().st_size
    assert size["code_bytes"] == Path(PR940_CODE).stat().st_size and size["code_source"].endswith("(--code)")
    assert size["within_limit"] is True
