"""The one judge (service/judge.py) on its own: verdicts from measurements, on small hand-written reports."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

from service.judge import NORMALISATION_TOLERANCE, judged, verdict
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES

# What a hostile report may hold in any field: every JSON kind, a negative count, a huge float, a mixed list.
JUNK = (None, "x", [], {}, True, -1, 1e300, [1, "2"])


def report() -> list[dict]:
    """An honest two-chunk evaluation as the engine streams it: chunk 0 trained on after its commit, chunk 1 not."""
    start = {"type": "start", "config": {"ngram": "exact", "max_seconds": 600.0, "seq_len": 32, "stride": 8},
             "targets": 8, "chunks": 2, "val_tokens_sha256": "ab" * 32, "validation_manifest_sha256": "ab" * 32}
    chunks = [{"type": "chunk", "index": index, "target_range": [lo, hi], "trained_range": trained,
               "nll_sum": 4.0, "chunk_bpb": 1.0, "running_targets": hi - 1, "running_bytes": hi - 1,
               "running_bpb": 1.0, "elapsed_s": 0.5 * (index + 1),
               "order_trace": {"chunk": index, "scored": [lo, hi], "frontier": hi, "trained": trained,
                               "step_max_targets": [hi - 1] if trained else []}}
              for index, (lo, hi, trained) in enumerate([(1, 5, [1, 5]), (5, 9, None)])]
    ngram = {"mixer_compliant": True, "probability_sum": {"min": 1.0 - 1e-7, "max": 1.0 + 1e-7, "positions": 8},
             "positions": 8, "targets": 8, "sum_error_max": 1e-7, "scored_gap_max": 0.0, "scored_from_vector": True,
             "stats": None}
    end = {"type": "end", "val_bpb": 1.0, "targets_scored": 8, "bytes": 8, "nll_sum": 8.0, "elapsed_s": 1.5,
           "measured": {"positions_not_scored_once": 0, "ttt": None, "ngram": ngram,
                        "size": {"artifact_bytes": 1000, "code_bytes": 100, "code_source": "manifest"}}}
    return [start, *chunks, end]


def test_the_ngram_figures_keep_the_key_order_of_older_reports() -> None:
    # As run.py's compliance_summary wrote them before the judge (bd9fc50): stored reports and diffs stay stable.
    assert list(compliance_of(report())["ngram"]) == [
        "mode", "mixer_compliant", "normalised", "probability_sum", "tolerance", "positions", "targets",
        "sum_error_max", "scored_gap_max", "scored_from_vector", "shortcut_tolerance", "stats"]


def compliance_of(events: list[dict]) -> dict:
    return list(judged(events))[-1]["compliance"]


def test_an_honest_report_is_compliant_and_keeps_every_field_consumers_read() -> None:
    compliance = compliance_of(report())
    assert compliance["compliant"] is True
    assert compliance["scored_once"] and compliance["score_before_update"] and compliance["ngram"]["normalised"]
    assert compliance["full_validation_set"] and compliance["sliding_window"] and compliance["within_time_limit"]
    assert compliance["size"] == {"artifact_bytes": 1000, "code_bytes": 100, "code_source": "manifest",
                                  "total_bytes": 1100, "limit_bytes": SUBMISSION_LIMIT_BYTES, "within_limit": True}
    assert compliance["ngram"]["mode"] == "exact" and compliance["ngram"]["probability_sum"]["positions"] == 8
    assert "measured" not in list(judged(report()))[-1]


def test_a_trace_that_updates_before_scoring_is_judged_non_compliant() -> None:
    events = report()
    events[1]["order_trace"]["step_max_targets"] = [5]  # a step on target 5: not committed until chunk 1
    compliance = compliance_of(events)
    assert compliance["score_before_update"] is False and compliance["compliant"] is False
    assert compliance["scored_once"] is True  # only the order fails

    events = report()
    events[2]["trained_range"] = events[2]["order_trace"]["trained"] = [5, 9]  # the last chunk trained on
    events[2]["order_trace"]["step_max_targets"] = [8]
    assert compliance_of(events)["score_before_update"] is False


def test_a_distribution_sum_off_tolerance_is_judged_unnormalised() -> None:
    events = report()
    events[-1]["measured"]["ngram"]["sum_error_max"] = NORMALISATION_TOLERANCE
    assert compliance_of(events)["ngram"]["normalised"] is True  # the tolerance itself holds
    events[-1]["measured"]["ngram"]["sum_error_max"] = 2 * NORMALISATION_TOLERANCE
    compliance = compliance_of(events)
    assert compliance["ngram"]["normalised"] is False and compliance["compliant"] is False

    events = report()
    events[-1]["measured"]["ngram"]["mixer_compliant"] = False  # hashed-940 declares itself so, whatever its sums
    compliance = compliance_of(events)
    assert compliance["ngram"]["normalised"] is True and compliance["compliant"] is False


def test_time_size_and_prefix_rules() -> None:
    events = report()
    events[-1]["elapsed_s"] = 600.5
    assert compliance_of(events)["within_time_limit"] is False and compliance_of(events)["compliant"] is False
    for elapsed, within in ((EVAL_LIMIT_SECONDS, True), (EVAL_LIMIT_SECONDS + 5e-5, False)):  # the limit is exact
        events = report()
        events[-1]["elapsed_s"] = elapsed
        assert compliance_of(events)["within_time_limit"] is within
    events = report()
    events[-1]["measured"]["size"]["code_bytes"] = SUBMISSION_LIMIT_BYTES - 1000  # exactly 16,000,000 in all
    assert compliance_of(events)["size"]["total_bytes"] == SUBMISSION_LIMIT_BYTES
    assert compliance_of(events)["size"]["within_limit"] is True
    events = report()
    events[-1]["measured"]["size"]["code_bytes"] = SUBMISSION_LIMIT_BYTES - 999
    assert compliance_of(events)["size"]["within_limit"] is False and not compliance_of(events)["compliant"]
    events = report()
    events[0]["validation_manifest_sha256"] = None  # data without a manifest: not the full validation set
    compliance = compliance_of(events)
    assert compliance["full_validation_set"] is False and compliance["compliant"] is True  # a score, not a record


def test_a_stored_report_is_re_judged_to_the_same_verdict() -> None:
    # A judged report (and one stored by an older engine) carries the measurements inside `compliance`.
    stored = json.loads(json.dumps(list(judged(report()))))
    start, chunks, terminal = stored[0], stored[1:-1], stored[-1]
    assert verdict(start, chunks, terminal) == terminal["compliance"]
    edited = copy.deepcopy(terminal)
    edited["compliance"]["compliant"] = True
    edited["compliance"]["positions_not_scored_once"] = 3  # the stated flag is not evidence; the figures are
    assert verdict(start, chunks, edited)["compliant"] is False


def test_a_non_finite_measurement_ends_the_stream_with_an_error_event() -> None:
    events = report()
    events[-1]["measured"]["ngram"]["scored_gap_max"] = float("nan")
    judged_events = list(judged(events))
    assert [e["type"] for e in judged_events] == ["start", "chunk", "chunk", "error"]
    error = judged_events[-1]
    assert error["code"] == "non_finite_value" and "measured.ngram.scored_gap_max" in error["reason"]
    assert error["targets_scored"] == 8 and error["nll_sum"] == 8.0
    json.dumps(judged_events, allow_nan=False)


def _engine_with_a_nan(options, **_kwargs):  # stands in for service.engine.run.evaluate
    events = report()
    events[-1]["measured"]["ttt"] = {"losses": [2.0, float("nan")]}  # e.g. a diverged test-time training
    yield from events


def test_every_emitter_of_engine_events_judges_them(monkeypatch, tmp_path, capsys) -> None:
    # The strict-JSON guard lives in the judge, so each front end must stream through it: the CLI (and with it
    # the API's evaluator subprocess and the page), `verifier compare` and the probes.
    import argparse

    from service import __main__ as cli
    from service.engine import run as engine_run
    from verifier.compare import evaluate_to_report

    monkeypatch.setattr(engine_run, "evaluate", _engine_with_a_nan)
    assert cli.main(["evaluate", str(tmp_path / "a.pgolf"), "--data", str(tmp_path)]) == cli.EXIT_ERROR
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["start", "chunk", "chunk", "error"]
    assert json.loads(lines[-1])["code"] == "non_finite_value"

    args = argparse.Namespace(artifact=tmp_path / "a.pgolf", data=tmp_path, tokenizer=None, device="cpu",
                              max_seconds=600.0)
    events = evaluate_to_report(args, {}, tmp_path / "report.ndjson")
    assert events[-1]["code"] == "non_finite_value" and "measured.ttt.losses[1]" in events[-1]["reason"]

    monkeypatch.setattr(engine_run, "evaluate", lambda options, **_: iter(report()))
    events = evaluate_to_report(args, {}, tmp_path / "report.ndjson")
    assert events[-1]["compliance"]["compliant"] is True and "measured" not in events[-1]

    # The probes' engine subject: a run that ends on a non-finite figure did not finish (C4's probe fails it).
    import numpy as np
    import torch

    from service.engine.options import EvalOptions
    from verifier.probe_subjects import EngineSubject

    monkeypatch.setattr(engine_run, "evaluate_model", lambda *args, **kwargs: _engine_with_a_nan(None))
    subject = EngineSubject(model=torch.nn.Linear(1, 1), tables=None, options=EvalOptions())  # type: ignore[arg-type]
    outcome = subject.run(np.zeros(9, np.int64)).outcome
    assert outcome.startswith("error: non_finite_value"), outcome


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every path into the nested dicts and lists of ``value``, the root excluded."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found.append((*path, key))
        found.extend(_paths(item, (*path, key)))
    return found


def junk_reports(honest: list) -> Iterator[tuple[tuple, object, list]]:
    """(path, junk, a copy of ``honest`` with the field at path replaced by junk), for every field and junk value."""
    for path in _paths(honest):
        for junk in JUNK:
            events = copy.deepcopy(honest)
            holder = events
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = junk
            yield path, junk, events


def test_a_malformed_report_gets_a_verdict_not_a_traceback() -> None:
    # `verifier check` judges the reports submitters hand in: every field may hold anything JSON can.
    honest = report()
    for path, junk, events in junk_reports(honest):
        start, *chunks, terminal = events
        if not all(isinstance(event, dict) for event in events):
            continue  # not an event stream: the report reader refuses it before any judging
        compliance = verdict(start, chunks, terminal)
        assert isinstance(compliance["compliant"], bool), (path, junk)
        if path in {(0, "targets"), (3, "measured", "size", "code_bytes"), (3, "elapsed_s"),
                    (1, "order_trace", "scored")} and junk is not honest_value(honest, path):
            assert compliance["compliant"] is False, (path, junk)


def honest_value(events: list, path: tuple) -> object:
    value: object = events
    for key in path:
        value = value[key]  # type: ignore[index]
    return value
