"""``python -m verifier check ARTIFACT``: verify a submission's artifact, training record and evaluation report.

Three groups of checks, each one row of the result table (check, status, figure, reason):

* the artifact itself, recomputed from the bytes on disk: submission size (artifact file + counted code, never
  read from a log), integrity and schema (the hostile-input reader of ``trainer.artifact``), the decompression
  bound, and whether the model builds and gives finite logits;
* the training record (``--train-log``: summary.json, train.log or an upstream log; the artifact manifest's own
  training section always counts too): wall-clock ≤ 600 s, world size and device recorded, the sha256 and sizes
  the record states agree with the file;
* the evaluation report (``--eval-report``: the NDJSON events of ``python -m service evaluate``): ≤ 600 s, every
  target 1..N−1 scored exactly once, val_bpb recomputed from the per-chunk sums, every chunk scored before the
  model trained on it, no non-compliant mode, the report is about this artifact.

``--upstream`` declares an upstream artifact (``final_model.*.ptz``): it is opened through the safe upstream reader
(``verifier/upstream_check.py``) with the config of the ``train_gpt.py`` that ``--code`` names (also the files the
cap counts) and the run command's ``--env`` settings. Exit status: 0 when no check fails, 1 when one does, 2 on a
usage error.
docs/verifier.md says what each check proves and what it cannot.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.judge import as_mapping, distribution_problems, is_count, last_chunk_index, order_problems, verdict
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES
from verifier import trace_check
from verifier.logs import LogError, TrainRecord, manifest_record, read_eval_events, read_train_record
from verifier.report import (
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    passed,
    render_table,
    summary_line,
    write_json,
    write_junit,
)
from verifier.wallclock import TRAIN_LIMIT_MS, TimeVerdict, judge_steps, judge_total, worst

if TYPE_CHECKING:  # the artifact reader imports torch; only the checks that read the artifact load it
    from trainer.artifact import Artifact

BPB_RELATIVE_TOLERANCE = 1e-9
# The n-gram modes whose scores are not a distribution over the vocabulary (compliance-rules.md §3.1).
NON_COMPLIANT_NGRAM_MODES = frozenset({"hashed-940"})
# Failures of these artifact-reader checks concern the payload's decompression rather than the container.
DECOMPRESSION_ERRORS = frozenset({"decompression_bomb", "declared_size_too_large", "payload_corrupt"})
FORWARD_TOKENS = 16


@dataclass
class ArtifactFacts:
    """What the verifier itself established about the artifact file."""

    path: Path
    nbytes: int
    sha256: str
    artifact: Artifact | None = None  # set when the reader accepted the file
    error_code: str | None = None
    error: str | None = None


def inspect_artifact(path: Path, *, upstream: bool) -> ArtifactFacts:
    facts = ArtifactFacts(path, path.stat().st_size, _sha256_file(path))
    if upstream:
        return facts
    from trainer.artifact import ArtifactError
    from trainer.artifact_metadata import read_submission  # the reader plus the sections the evaluation skips

    try:
        facts.artifact = read_submission(path)
    except ArtifactError as exc:
        facts.error_code, facts.error = exc.code, str(exc)
    return facts


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Artifact checks


def count_code(paths: Sequence[Path] | None) -> tuple[int, str]:
    """Counted code bytes and where they came from.

    No paths: the counted code of this checkout (``trainer.code_bytes``: the source needed to rebuild and score a
    model). A directory: the same rule applied to that checkout. A file: its size (the upstream rule, where the
    single ``train_gpt.py`` is the code).
    """
    from trainer.code_bytes import counted_code_bytes

    if not paths:
        counted = counted_code_bytes()
        return counted.total, f"counted code of this checkout ({len(counted.files)} files)"
    total, parts = 0, []
    for path in paths:
        if path.is_dir():
            counted = counted_code_bytes(path)
            total += counted.total
            parts.append(f"counted code of {path} ({len(counted.files)} files)")
        else:
            total += path.stat().st_size
            parts.append(path.name)
    return total, " + ".join(parts)


def check_size(artifact_bytes: int, code: Sequence[Path] | None) -> CheckResult:
    try:
        code_bytes, origin = count_code(code)
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        return CheckResult("submission_size", FAIL, f"artifact {artifact_bytes:,} bytes",
                           f"cannot count the code bytes: {exc}")
    total = artifact_bytes + code_bytes
    figure = (f"{artifact_bytes:,} artifact + {code_bytes:,} code = {total:,} bytes "
              f"{'<=' if total <= SUBMISSION_LIMIT_BYTES else '>'} {SUBMISSION_LIMIT_BYTES:,} ({origin})")
    if total > SUBMISSION_LIMIT_BYTES:
        return CheckResult("submission_size", FAIL, figure,
                           f"over the cap by {total - SUBMISSION_LIMIT_BYTES:,} bytes (decimal bytes, code included)")
    return CheckResult("submission_size", PASS, figure)


def check_integrity(facts: ArtifactFacts, upstream: bool) -> CheckResult:
    if upstream:
        return CheckResult("artifact_integrity", SKIP, f"{facts.nbytes:,} bytes, sha256 {facts.sha256[:16]}…",
                           "upstream artifact: a pickle, never opened by policy; its contents are unverified")
    if facts.artifact is None:
        return CheckResult("artifact_integrity", FAIL, f"refused: {facts.error_code}", facts.error or "")
    manifest = facts.artifact.manifest
    payload = manifest["payload"]
    return CheckResult("artifact_integrity", PASS,
                       f"format v1, {len(manifest['tensors'])} tensors, {payload['compression']}-{payload['level']} "
                       f"payload {payload['compressed_nbytes']:,} bytes, both sha256 verified, schema valid")


def check_decompression(facts: ArtifactFacts, upstream: bool) -> CheckResult:
    from trainer.artifact import MAX_RAW_NBYTES

    if upstream:
        return CheckResult("decompression_bound", SKIP, "", "upstream artifact: never decompressed")
    if facts.artifact is None:
        if facts.error_code in DECOMPRESSION_ERRORS:
            return CheckResult("decompression_bound", FAIL, f"refused: {facts.error_code}", facts.error or "")
        return CheckResult("decompression_bound", SKIP, "",
                           f"the reader refused the artifact before decompressing it ({facts.error_code})")
    payload = facts.artifact.manifest["payload"]
    ratio = payload["raw_nbytes"] / max(payload["compressed_nbytes"], 1)
    return CheckResult("decompression_bound", PASS,
                       f"decompressed to exactly the declared {payload['raw_nbytes']:,} bytes (ratio {ratio:.2f}x, "
                       f"bound {MAX_RAW_NBYTES:,}); reading stops one byte past the declaration")


def check_model_forward(facts: ArtifactFacts, upstream: bool) -> CheckResult:
    if upstream:
        return CheckResult("model_forward", SKIP, "", "upstream artifact: the model is not built")
    if facts.artifact is None:
        return CheckResult("model_forward", SKIP, "", f"the artifact was refused ({facts.error_code})")
    from trainer.artifact import load_model

    try:
        model, _ = load_model(facts.path)
    except Exception as exc:  # any failure to build the model is the finding
        return CheckResult("model_forward", FAIL, "", f"{type(exc).__name__}: {exc}")
    return forward_result(model)


def forward_result(model: Any) -> CheckResult:
    """Run a built model on a fixed sequence: logits over the whole vocabulary at every position, all finite."""
    import torch

    try:
        config = model.config
        tokens = (torch.arange(FORWARD_TOKENS) * 7 + 1) % config.vocab_size  # a fixed, non-trivial sequence
        with torch.inference_mode():
            logits = model.forward_logits(tokens[None, :])
    except Exception as exc:  # any failure to run the model is the finding
        return CheckResult("model_forward", FAIL, "", f"{type(exc).__name__}: {exc}")
    parameters = sum(p.numel() for p in model.parameters())
    figure = (f"{config.num_layers} layers x {config.model_dim}d, {parameters:,} parameters; logits "
              f"{tuple(logits.shape)}")
    if tuple(logits.shape) != (1, FORWARD_TOKENS, config.vocab_size):
        return CheckResult("model_forward", FAIL, figure, "logits do not cover the vocabulary at every position")
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        return CheckResult("model_forward", FAIL, figure, f"{bad} non-finite logits")
    return CheckResult("model_forward", PASS, f"{figure} finite, max |logit| {float(logits.abs().max()):.3g}")


# ----------------------------------------------------------------------------------------------------------------
# Training-record checks


def gather_train_records(facts: ArtifactFacts, logs: Sequence[Path]) -> tuple[list[TrainRecord], list[str]]:
    records: list[TrainRecord] = []
    problems: list[str] = []
    if facts.artifact is not None:
        records.append(manifest_record(facts.artifact.manifest["training"]))
    for path in logs:
        try:
            records.append(read_train_record(path))
        except (OSError, LogError) as exc:
            problems.append(str(exc))
    return records, problems


def check_train_records(records: Sequence[TrainRecord], problems: Sequence[str]) -> CheckResult:
    figure = ", ".join(f"{r.source} ({r.kind})" for r in records) or "none"
    if problems:
        return CheckResult("train_records", FAIL, figure, "; ".join(problems))
    if not records:
        return CheckResult("train_records", SKIP, figure, "no training log given and no manifest to read")
    return CheckResult("train_records", PASS, figure)


def record_time_verdict(record: TrainRecord) -> TimeVerdict:
    """The three-valued time verdict of one record: from its runs' step timings when it is a text log."""
    timed_runs = [run for run in record.runs if run.steps]
    if timed_runs:
        return worst([judge_steps(run.steps) for run in timed_runs])
    return judge_total(record.train_time_ms)


def check_train_time(records: Sequence[TrainRecord], *, strict: bool = False) -> CheckResult:
    """PASS under 600 s; WARN when only the final step crossed (verifier.wallclock); FAIL otherwise."""
    if not records:
        return CheckResult("train_time", SKIP, "", "no training record")
    timed = [(r.train_time_ms, r) for r in records if r.train_time_ms is not None]
    if not timed:
        return CheckResult("train_time", FAIL, "", "no record states the training time")
    longest_ms, longest = max(timed, key=lambda pair: pair[0])
    verdicts = [record_time_verdict(r) for _, r in timed]
    verdict = worst(verdicts)
    if strict:
        verdict = verdict.strict()
    over = longest_ms > TRAIN_LIMIT_MS
    others = ", ".join(f"{r.source} {ms / 1000:.3f} s" for ms, r in timed if r is not longest)
    figure = (f"{longest_ms / 1000:.3f} s {'>' if over else '<='} 600 s ({longest.source}: "
              f"{longest.train_time_origin})" + (f"; also {others}" if others else ""))
    if verdict.status == PASS:
        return CheckResult("train_time", PASS, figure)
    reason = verdict.reason
    if verdict.status == FAIL and not strict:
        reason = f"training wall-clock over 600 s: {reason}"
    return CheckResult("train_time", verdict.status, figure, reason)


def check_train_environment(records: Sequence[TrainRecord], upstream: bool) -> CheckResult:
    if not records:
        return CheckResult("train_environment", SKIP, "", "no training record")
    worlds = sorted({r.world_size for r in records if r.world_size is not None})
    devices = sorted({r.device for r in records if r.device})
    figure = (f"world_size {', '.join(map(str, worlds)) or 'not recorded'}; "
              f"device {', '.join(devices) or 'not recorded'}")
    if not worlds:
        return CheckResult("train_environment", FAIL, figure, "no record states the world size")
    if len(worlds) > 1:
        return CheckResult("train_environment", FAIL, figure, "the records disagree on the world size")
    if not devices:
        if upstream:
            return CheckResult("train_environment", PASS, figure, "an upstream stdout log does not name the device")
        return CheckResult("train_environment", FAIL, figure, "no record states the device")
    return CheckResult("train_environment", PASS, figure)


def check_train_sha256(records: Sequence[TrainRecord], facts: ArtifactFacts) -> CheckResult:
    stated = [r for r in records if r.artifact_sha256 is not None]
    if not stated:
        return CheckResult("train_artifact_sha256", SKIP, f"file {facts.sha256[:16]}…",
                           "no record states the artifact's sha256 (summary.json does)")
    wrong = [r for r in stated if r.artifact_sha256 != facts.sha256]
    if wrong:
        stated_by = "; ".join(f"{r.source} states {str(r.artifact_sha256)[:16]}…" for r in wrong)
        return CheckResult("train_artifact_sha256", FAIL, f"file {facts.sha256[:16]}…", stated_by)
    return CheckResult("train_artifact_sha256", PASS,
                       f"{facts.sha256[:16]}… matches {', '.join(r.source for r in stated)}")


def check_train_sizes(records: Sequence[TrainRecord], facts: ArtifactFacts) -> CheckResult:
    """The sizes a log states: its artifact must be this file, and its own total must be within the cap."""
    sized = [r for r in records if r.artifact_bytes is not None or r.total_bytes is not None]
    if not sized:
        return CheckResult("train_log_sizes", SKIP, "", "no record states the artifact or submission size")
    problems, parts = [], []
    for record in sized:
        if record.artifact_bytes is not None:
            parts.append(f"{record.source}: artifact {record.artifact_bytes:,}")
            if record.artifact_bytes != facts.nbytes:
                problems.append(f"{record.source} states an artifact of {record.artifact_bytes:,} bytes, "
                                f"this file has {facts.nbytes:,}")
        if record.total_bytes is not None:
            parts.append(f"{record.source}: total {record.total_bytes:,}")
            if record.total_bytes > SUBMISSION_LIMIT_BYTES:
                problems.append(f"{record.source} states a submission of {record.total_bytes:,} bytes, "
                                f"over {SUBMISSION_LIMIT_BYTES:,}")
    figure = "; ".join(parts)
    return CheckResult("train_log_sizes", FAIL if problems else PASS, figure, "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation-report checks

EVAL_CHECKS = ("eval_report", "eval_time", "eval_targets", "eval_bpb", "eval_score_before_update", "eval_mode",
               "eval_artifact_sha256", trace_check.NAME)


def check_eval_report(path: Path | None, facts: ArtifactFacts) -> list[CheckResult]:
    if path is None:
        return [CheckResult(name, SKIP, "", "no --eval-report given") for name in EVAL_CHECKS]
    try:
        events = read_eval_events(path)
    except (OSError, LogError) as exc:
        return [CheckResult("eval_report", FAIL, "", str(exc)),
                *(CheckResult(name, SKIP, "", "the report is unreadable") for name in EVAL_CHECKS[1:])]
    # A report saved from the HTTP service starts with the service's own `queued` event (job id and links);
    # the engine's stream follows it unchanged.
    if events and events[0].get("type") == "queued" and events[0].get("source") == "service":
        events = events[1:]
    structure = _report_structure(events)
    if structure:
        return [CheckResult("eval_report", FAIL, f"{len(events)} events", structure),
                *(CheckResult(name, SKIP, "", "the report is malformed") for name in EVAL_CHECKS[1:])]
    start, chunks, terminal = events[0], events[1:-1], events[-1]
    # The report's measurements re-judged by the one judge (service/judge.py); its stated verdict is not evidence.
    judged = verdict(start, chunks, terminal)
    return [_eval_completed(start, chunks, terminal), _eval_time(terminal),
            _eval_targets(start, chunks, terminal, judged), _eval_bpb(start, chunks, terminal),
            _eval_order(start, chunks, judged), _eval_mode(start, judged), _eval_sha256(start, facts),
            trace_check.check_order_trace(start, chunks, terminal)]


def _report_structure(events: list[dict[str, Any]]) -> str:
    """Empty when the stream is start, chunk 0..k−1, one terminal event; else what is wrong."""
    if len(events) < 2:
        return f"a report needs a start and a terminal event; found {len(events)} event(s)"
    if events[0]["type"] != "start":
        return f"the first event is {events[0]['type']!r}, not 'start'"
    if events[-1]["type"] not in ("end", "timeout", "error"):
        return f"the last event is {events[-1]['type']!r}: the report is cut short"
    for position, event in enumerate(events[1:-1]):
        if event["type"] != "chunk":
            return f"event {position + 2} is {event['type']!r} between start and the terminal event"
        if event.get("index") != position:
            return f"chunk event {position} carries index {event.get('index')!r}"
        for key in ("targets", "bytes"):
            if not is_count(event.get(key)):
                return f"chunk {position}: {key!r} is not a count"
        if not _is_finite(event.get("nll_sum")) or not _is_range(event.get("target_range")):
            return f"chunk {position}: nll_sum or target_range malformed"
    for key in ("tokens", "targets", "bytes"):
        if not is_count(events[0].get(key)):
            return f"start event: {key!r} is not a count"
    return ""


def _eval_completed(start: dict[str, Any], chunks: list[dict[str, Any]], terminal: dict[str, Any]) -> CheckResult:
    figure = f"{terminal['type']} after {len(chunks)} of {start.get('chunks')} chunks"
    if terminal["type"] == "timeout":
        return CheckResult("eval_report", FAIL, figure, f"timeout: {terminal.get('reason')}")
    if terminal["type"] == "error":
        return CheckResult("eval_report", FAIL, figure, f"error {terminal.get('code')}: {terminal.get('reason')}")
    if len(chunks) != start.get("chunks"):
        return CheckResult("eval_report", FAIL, figure, "the start event announced a different number of chunks")
    return CheckResult("eval_report", PASS, figure)


def _eval_time(terminal: dict[str, Any]) -> CheckResult:
    elapsed = terminal.get("elapsed_s")
    if not _is_finite(elapsed):
        return CheckResult("eval_time", FAIL, "", "the terminal event states no elapsed_s")
    figure = f"{elapsed:.3f} s {'<=' if elapsed <= EVAL_LIMIT_SECONDS else '>'} 600 s"
    if elapsed > EVAL_LIMIT_SECONDS:
        return CheckResult("eval_time", FAIL, figure, "evaluation wall-clock over 600 s")
    return CheckResult("eval_time", PASS, figure)


def _eval_targets(start: dict[str, Any], chunks: list[dict[str, Any]], terminal: dict[str, Any],
                  judged: dict[str, Any]) -> CheckResult:
    tokens = start["tokens"]
    expected = tokens - 1
    scored = sum(chunk["targets"] for chunk in chunks)
    problems = []
    if start["targets"] != expected:
        problems.append(f"the start event announces {start['targets']} targets for {tokens} tokens")
    frontier = 1
    for chunk in chunks:
        lo, hi = chunk["target_range"]
        if lo != frontier:
            problems.append(f"chunk {chunk['index']} scores from target {lo}, expected {frontier}")
            break
        if chunk["targets"] != hi - lo:
            problems.append(f"chunk {chunk['index']} counts {chunk['targets']} scores for {hi - lo} targets")
        frontier = hi
    if frontier != tokens:
        problems.append(f"the chunks cover targets 1..{frontier - 1}, the stream has targets 1..{expected}")
    if scored != expected or terminal.get("targets_scored") != expected:
        problems.append(f"{terminal.get('targets_scored')} targets scored (chunks sum to {scored}), "
                        f"expected N-1 = {expected}")
    if judged["scored_once"] is not True:
        problems.append(f"not scored once: {judged['positions_not_scored_once']!r} positions not scored exactly "
                        f"once, {judged['targets_scored']!r} of {judged['targets_expected']!r} targets scored")
    if judged["full_validation_set"] is not True:
        problems.append("the report scores a prefix of the validation stream (max_tokens), not all of it")
    figure = f"{scored:,} of N-1 = {expected:,} targets in {len(chunks)} chunks; scored_once {judged['scored_once']!r}"
    return CheckResult("eval_targets", FAIL if problems else PASS, figure, "; ".join(problems[:4]))


def _eval_bpb(start: dict[str, Any], chunks: list[dict[str, Any]], terminal: dict[str, Any]) -> CheckResult:
    # Summed in chunk order in float64, as the engine accumulates: an honest report reproduces bit for bit.
    nll_sum = 0.0
    byte_sum = 0
    for chunk in chunks:
        nll_sum += chunk["nll_sum"]
        byte_sum += chunk["bytes"]
    reported = terminal.get("val_bpb", terminal.get("partial_val_bpb"))
    if byte_sum == 0:
        return CheckResult("eval_bpb", FAIL, "", "no byte was scored")
    recomputed = nll_sum / (math.log(2) * byte_sum)
    problems = []
    if not _is_finite(reported):
        problems.append("the terminal event reports no val_bpb")
        relative = math.inf
    else:  # a zero loss (no honest report has one) makes any other figure infinitely off
        relative = abs(recomputed - reported) / abs(recomputed) if recomputed else (math.inf if reported else 0.0)
        if relative > BPB_RELATIVE_TOLERANCE:
            problems.append(f"reported {reported!r} differs from the chunk sums by {relative:.2e} relative "
                            f"(tolerance {BPB_RELATIVE_TOLERANCE:g})")
    if terminal.get("bytes") != byte_sum:
        problems.append(f"terminal bytes {terminal.get('bytes')} != chunk bytes {byte_sum}")
    if terminal["type"] == "end" and start["bytes"] != byte_sum:
        problems.append(f"the stream has {start['bytes']} target bytes, the chunks count {byte_sum}")
    figure = (f"recomputed {recomputed:.10f} = {nll_sum:.6f} nats / (ln 2 x {byte_sum:,} bytes); "
              f"reported {reported!r}; relative difference {relative:.1e}")
    return CheckResult("eval_bpb", FAIL if problems else PASS, figure, "; ".join(problems))


def _eval_order(start: dict[str, Any], chunks: list[dict[str, Any]], judged: dict[str, Any]) -> CheckResult:
    """Each chunk event is emitted after its scores were committed, with the range the model then trained on."""
    # C3 is judged once, by the judge; this row shows its problems (eval_order_trace adds the digest).
    problems = [] if judged["score_before_update"] else order_problems(chunks, last_chunk_index(start, chunks))
    trained = sum(chunk.get("trained_range") is not None for chunk in chunks)
    figure = (f"{trained} of {len(chunks)} chunks trained on, each after its scores were committed"
              if trained else "no test-time training: no state updated from scored tokens")
    return CheckResult("eval_score_before_update", FAIL if problems else PASS, figure, "; ".join(problems[:4]))


def _eval_mode(start: dict[str, Any], judged: dict[str, Any]) -> CheckResult:
    from service.engine.options import NGRAM_MODES

    config = as_mapping(start.get("config"))
    ngram = judged["ngram"]
    mode = config.get("ngram")
    sums = as_mapping(ngram.get("probability_sum"))
    ttt = f"ttt {config.get('ttt_recipe')}" if config.get("ttt") else "no ttt"
    positions, targets = ngram.get("positions"), ngram.get("targets")
    figure = (f"ngram={mode}, {ttt}; sum p in [{sums.get('min')}, {sums.get('max')}] at {positions} of {targets} "
              f"scored positions, max |p_vector(x_t) - p_scored(x_t)| = {ngram.get('scored_gap_max')}")
    # C2 re-judged from the report's own figures (the engine's measurements), whatever flags it states.
    problems = distribution_problems(ngram)
    if not isinstance(mode, str) or mode not in NGRAM_MODES:  # a list or an object is no mode (nor hashable)
        problems.append(f"unknown n-gram mode {mode!r}")
        mode = None
    if mode in NON_COMPLIANT_NGRAM_MODES:
        problems.append(f"{mode} scores the target-keyed hashed cache: not a distribution over the vocabulary (C2)")
    if ngram["mixer_compliant"] is not True:
        problems.append("the engine reports a mixer that declares itself non-compliant")
    return CheckResult("eval_mode", FAIL if problems else PASS, figure, "; ".join(problems))


def _eval_sha256(start: dict[str, Any], facts: ArtifactFacts) -> CheckResult:
    stated = start.get("artifact_sha256")
    if stated != facts.sha256:
        return CheckResult("eval_artifact_sha256", FAIL, f"report {str(stated)[:16]}…, file {facts.sha256[:16]}…",
                           "the report evaluated a different artifact")
    return CheckResult("eval_artifact_sha256", PASS, f"{facts.sha256[:16]}… matches the report's start event")


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_count(v) for v in value) and value[0] < value[1]


# ----------------------------------------------------------------------------------------------------------------
# All checks, and the command line


def run_checks(artifact: Path, *, train_logs: Sequence[Path] = (), eval_report: Path | None = None,
               code: Sequence[Path] | None = None, upstream: bool = False, env: Sequence[str] = (),
               strict: bool = False) -> tuple[list[CheckResult], ArtifactFacts]:
    facts = inspect_artifact(artifact, upstream=upstream)
    records, problems = gather_train_records(facts, train_logs)
    if upstream:  # opened through the safe upstream reader, with the config of the submission's code
        from verifier.upstream_check import upstream_artifact_checks

        artifact_rows = upstream_artifact_checks(artifact, code, env)
    else:
        artifact_rows = [check_integrity(facts, upstream), check_decompression(facts, upstream),
                         check_model_forward(facts, upstream)]
    results = [
        check_size(facts.nbytes, code),
        *artifact_rows,
        check_train_records(records, problems),
        check_train_time(records, strict=strict),
        check_train_environment(records, upstream),
        check_train_sha256(records, facts),
        check_train_sizes(records, facts),
        *check_eval_report(eval_report, facts),
    ]
    return results, facts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="verify an artifact, its training log and its evaluation report, or a record folder",
        description="Verify a submission: artifact size (with code), integrity, decompression bound, model "
                    "forward; training time, world size, device and sha256 from the training record; evaluation "
                    "time, targets, recomputed val_bpb, score-before-update order, mode and sha256 from the "
                    "evaluation report. With --record DIR instead of ARTIFACT: an upstream record folder's logs "
                    "against its submission.json, its code bytes and a scan. Training time is PASS, WARN (only "
                    "the final step crossed 600 s) or FAIL. Exit 0 only when no check fails.")
    parser.add_argument("artifact", type=Path, nargs="?", metavar="ARTIFACT",
                        help="the submission artifact (model.pgolf)")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="an upstream-style record folder (train_gpt.py, logs, submission.json; no artifact)")
    parser.add_argument("--train-log", type=Path, action="append", default=[], metavar="FILE",
                        help="summary.json, train.log or an upstream log (repeatable)")
    parser.add_argument("--eval-report", type=Path, metavar="FILE",
                        help="NDJSON events of `python -m service evaluate`")
    parser.add_argument("--code", type=Path, action="append", metavar="PATH",
                        help="what the size cap counts as code: a checkout directory (counted code) or files such "
                             "as train_gpt.py (repeatable; default: this checkout's counted code)")
    parser.add_argument("--upstream", action="store_true",
                        help="ARTIFACT is an upstream .ptz: opened through the safe reader (no pickle global runs) "
                             "with the model config of the train_gpt.py in --code (required)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="with --upstream: a setting of the submission's run command (repeatable)")
    parser.add_argument("--strict", action="store_true",
                        help="a training time over 600 s only on the final step (WARN) fails too")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--junit", type=Path, metavar="OUT", help="write JUnit XML, one test case per check")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.artifact is None) == (args.record is None):
        print("check: give either ARTIFACT or --record DIR", file=sys.stderr)
        return 2
    if args.record is not None:
        return run_record(args)
    if not args.artifact.is_file():
        print(f"check: {args.artifact} is not a file", file=sys.stderr)
        return 2
    if args.upstream and not args.code:
        print("check: --upstream needs --code (the files the cap counts, e.g. train_gpt.py)", file=sys.stderr)
        return 2
    for path in [*args.train_log, *([args.eval_report] if args.eval_report else []), *(args.code or [])]:
        if not path.exists():
            print(f"check: {path} does not exist", file=sys.stderr)
            return 2
    results, facts = run_checks(args.artifact, train_logs=args.train_log, eval_report=args.eval_report,
                                code=args.code, upstream=args.upstream, env=args.env, strict=args.strict)
    print(f"artifact {args.artifact} ({facts.nbytes:,} bytes, sha256 {facts.sha256})")
    print(render_table(results))
    print(summary_line(results))
    if args.json:
        write_json(args.json, results, artifact=str(args.artifact), artifact_sha256=facts.sha256,
                   artifact_bytes=facts.nbytes)
    if args.junit:
        write_junit(args.junit, results, suite="pgolf verifier check", classname="verifier.check")
    return 0 if passed(results) else 1


def run_record(args: argparse.Namespace) -> int:
    from verifier.record import check_record

    if not args.record.is_dir():
        print(f"check: {args.record} is not a folder", file=sys.stderr)
        return 2
    if args.train_log or args.eval_report or args.code or args.upstream:
        print("check: --record reads the folder's own logs and code; --train-log, --eval-report, --code and "
              "--upstream do not apply", file=sys.stderr)
        return 2
    record = check_record(args.record, strict=args.strict)
    print(f"record {args.record} ({len(record.logs)} log file(s))")
    print(render_table(record.results))
    print(summary_line(record.results))
    if args.json:
        write_json(args.json, record.results, record=str(args.record), strict=args.strict,
                   logs=[log.to_dict() for log in record.logs])
    if args.junit:
        write_junit(args.junit, record.results, suite="pgolf verifier check --record", classname="verifier.check")
    return 0 if passed(record.results) else 1
