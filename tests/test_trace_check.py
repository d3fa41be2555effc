"""The order trace travels in the report and `verifier check` re-derives its digest and re-judges it."""

from __future__ import annotations

import copy

import pytest
from test_engine_scoring import STRONG_SGD, options, repetitive_tokens, tiny_model, tiny_tables

from service.engine.run import evaluate_model
from service.judge import judged, order_trace_digest
from verifier.trace_check import check_order_trace


@pytest.fixture(scope="module")
def ttt_report() -> list[dict]:
    events = list(judged(evaluate_model(tiny_model(), repetitive_tokens(400), tiny_tables(),
                                        options(chunk_tokens=96, ttt=True), ttt_recipe=STRONG_SGD)))
    assert events[-1]["type"] == "end" and events[-1]["compliance"]["score_before_update"]
    return events


def judge(events: list[dict]):
    return check_order_trace(events[0], events[1:-1], events[-1])


def test_an_honest_report_re_derives_the_engine_digest(ttt_report: list[dict]) -> None:
    chunks = ttt_report[1:-1]
    assert order_trace_digest([c["order_trace"] for c in chunks]) == ttt_report[-1]["compliance"]["trace_digest"]
    result = judge(ttt_report)
    assert result.status == "PASS", result.reason
    assert f"{len(chunks) - 1} chunks trained" in result.figure


def test_an_edited_trace_no_longer_matches_the_digest(ttt_report: list[dict]) -> None:
    events = copy.deepcopy(ttt_report)
    events[2]["order_trace"]["step_max_targets"][0] -= 1  # harmless-looking, but not what the engine hashed
    result = judge(events)
    assert result.status == "FAIL" and "hashes to" in result.reason


def test_a_forged_trace_with_a_matching_digest_is_judged_on_its_own(ttt_report: list[dict]) -> None:
    # Someone rewrites the trace and its digest together: an optimizer step that reached past the frontier.
    events = copy.deepcopy(ttt_report)
    entry = events[1]["order_trace"]
    entry["step_max_targets"][-1] = entry["frontier"] + 5
    events[-1]["compliance"]["trace_digest"] = order_trace_digest([c["order_trace"] for c in events[1:-1]])
    result = judge(events)
    assert result.status == "FAIL" and "optimizer steps reach targets" in result.reason

    events = copy.deepcopy(ttt_report)
    last = events[-2]
    last["order_trace"]["trained"] = last["trained_range"] = list(last["target_range"])
    last["order_trace"]["step_max_targets"] = [last["target_range"][1] - 1]
    events[-1]["compliance"]["trace_digest"] = order_trace_digest([c["order_trace"] for c in events[1:-1]])
    assert "the last chunk was trained on" in judge(events).reason


def test_a_report_without_the_trace_fails(ttt_report: list[dict]) -> None:
    events = copy.deepcopy(ttt_report)
    del events[1]["order_trace"]
    result = judge(events)
    assert result.status == "FAIL" and "does not carry the order trace" in result.reason
