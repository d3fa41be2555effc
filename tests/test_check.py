"""Tests of ``python -m verifier check``: a real demo submission passes, every limit just over the line fails.

The demo submission is built once per module with the real commands: ``python -m trainer train --preset demo``
(tiny overrides) on a short data set, then ``python -m service evaluate --ttt`` for the NDJSON report. The failing
cases are that submission with one thing changed each (a padded artifact, a forged log line, an edited report
event), or the fixtures in tests/fixtures/check/ for upstream-style logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from test_judge import junk_reports, report

from trainer.data.shards import load_validation_tokens
from trainer.data.writer import write_shard, write_val_manifest
from trainer.limits import SUBMISSION_LIMIT_BYTES
from verifier.check import EVAL_CHECKS, ArtifactFacts, check_eval_report, check_size, run_checks
from verifier.report import CheckResult

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "check"
TINY = ["--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--num-kv-heads", "1",
        "--bigram-buckets", "64", "--bigram-dim", "16", "--xsa-last-n", "2", "--train-seq-len", "64",
        "--train-batch-tokens", "512", "--val-batch-tokens", "8192", "--warmup-steps", "1", "--val-loss-every", "0",
        "--train-log-every", "1"]
EVAL = ["--device", "cpu", "--seq-len", "128", "--stride", "64", "--chunk-tokens", "512", "--batch-windows", "8"]
VAL_TOKENS = 1200  # three evaluation chunks of 512 targets


@dataclass(frozen=True)
class Demo:
    data: Path
    tokenizer: Path
    artifact: Path
    summary: Path
    log: Path
    report: Path


def run_module(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A demo artifact with its real train.log, summary.json and evaluation report."""
    sample = Path(os.environ.get("PGOLF_SHARED_DATA") or REPO_ROOT.parent / "shared/data/fineweb_sample")
    if (sample / "tokenizers/fineweb_1024_bpe.model").is_file():
        source, tokenizer = sample / "datasets/fineweb10B_sp1024", sample / "tokenizers/fineweb_1024_bpe.model"
    else:
        source = request.getfixturevalue("embedded_data")
        tokenizer = source / "tokenizer.model"
    data = tmp_path_factory.mktemp("check_data")
    train_shard = next(source.glob("*_train_*.bin"))
    shutil.copy(train_shard, data / train_shard.name)
    write_shard(data / "demo_val_000000.bin", load_validation_tokens(source)[:VAL_TOKENS])
    write_val_manifest(data, ["demo_val_000000.bin"])  # the short shard is this submission's whole val set
    out = tmp_path_factory.mktemp("check_run")
    trained = run_module("trainer", "train", "--preset", "demo", "--data", data, "--tokenizer", tokenizer,
                         "--out", out, *TINY, "--iterations", "3", "--max-wallclock-seconds", "0")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    evaluated = run_module("service", "evaluate", out / "model.pgolf", "--data", data, "--tokenizer", tokenizer,
                           *EVAL, "--ttt")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (out / "eval.ndjson").write_text(evaluated.stdout)
    return Demo(data, tokenizer, out / "model.pgolf", out / "summary.json", out / "train.log", out / "eval.ndjson")


def statuses(results: list[CheckResult]) -> dict[str, str]:
    return {result.name: result.status for result in results}


def by_name(results: list[CheckResult], name: str) -> CheckResult:
    return next(result for result in results if result.name == name)


def failing(results: list[CheckResult]) -> set[str]:
    return {result.name for result in results if result.status == "FAIL"}


def edited_report(demo: Demo, tmp_path: Path, edit) -> Path:
    events = [json.loads(line) for line in demo.report.read_text().splitlines()]
    edit(events)
    path = tmp_path / "edited.ndjson"
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The demo submission


def test_demo_submission_passes_every_check_through_the_cli(demo: Demo, tmp_path: Path) -> None:
    done = run_module("verifier", "check", demo.artifact, "--train-log", demo.summary, "--train-log", demo.log,
                      "--eval-report", demo.report, "--json", tmp_path / "check.json", "--junit",
                      tmp_path / "check.xml")
    assert done.returncode == 0, done.stdout
    document = json.loads((tmp_path / "check.json").read_text())
    assert document["passed"] and document["artifact_sha256"] == hashlib.sha256(demo.artifact.read_bytes()).hexdigest()
    assert {check["status"] for check in document["checks"]} == {"PASS"}, document["checks"]
    names = [check["name"] for check in document["checks"]]
    assert names == ["submission_size", "artifact_integrity", "decompression_bound", "model_forward",
                     "train_records", "train_time", "train_environment", "train_artifact_sha256", "train_log_sizes",
                     "eval_report", "eval_time", "eval_targets", "eval_bpb", "eval_score_before_update",
                     "eval_mode", "eval_artifact_sha256", "eval_order_trace"]
    suite = ET.parse(tmp_path / "check.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "17" and suite.get("failures") == "0"
    assert [case.get("name") for case in suite.iter("testcase")] == names
    assert "passed: 17 pass, 0 fail, 0 skip" in done.stdout
    # The figures are the recomputed ones: the demo's TTT trained on two of three chunks, bpb matches exactly.
    checks = {check["name"]: check for check in document["checks"]}
    assert "2 of 3 chunks trained on" in checks["eval_score_before_update"]["figure"]
    assert "relative difference 0.0e+00" in checks["eval_bpb"]["figure"]


def test_without_logs_the_report_checks_are_skipped_not_passed(demo: Demo) -> None:
    results, _ = run_checks(demo.artifact)
    found = statuses(results)
    assert {found[name] for name in found if name.startswith("eval_")} == {"SKIP"}
    assert found["train_time"] == "PASS"  # the manifest records the training time
    assert found["train_artifact_sha256"] == "SKIP"


# ---------------------------------------------------------------------------------------------------------------
# Size: artifact bytes + code bytes <= 16,000,000, recomputed


def test_size_limit_is_exact(demo: Demo, tmp_path: Path) -> None:
    assert SUBMISSION_LIMIT_BYTES == 16_000_000
    artifact_bytes = demo.artifact.stat().st_size
    code = tmp_path / "train_gpt.py"
    with code.open("wb") as fh:
        fh.truncate(16_000_000 - artifact_bytes)
    assert check_size(artifact_bytes, [code]).status == "PASS"
    with code.open("wb") as fh:
        fh.truncate(16_000_001 - artifact_bytes)
    over = check_size(artifact_bytes, [code])
    assert over.status == "FAIL" and "= 16,000,001 bytes > 16,000,000" in over.figure
    assert over.reason == "over the cap by 1 bytes (decimal bytes, code included)"


def test_a_padded_artifact_fails_size_and_integrity(demo: Demo, tmp_path: Path) -> None:
    code = tmp_path / "train_gpt.py"
    code.write_text("print('code')\n")
    padded = tmp_path / "padded.pgolf"
    shutil.copy(demo.artifact, padded)
    with padded.open("ab") as fh:
        fh.truncate(16_000_001 - code.stat().st_size)
    results, _ = run_checks(padded, code=[code])
    assert failing(results) == {"submission_size", "artifact_integrity"}
    assert "refused: trailing_data" == by_name(results, "artifact_integrity").figure
    assert by_name(results, "model_forward").status == "SKIP"


def test_the_counted_code_of_a_checkout_is_recomputed(demo: Demo) -> None:
    from trainer.code_bytes import counted_code_bytes

    result = check_size(demo.artifact.stat().st_size, [REPO_ROOT])
    total = demo.artifact.stat().st_size + counted_code_bytes(REPO_ROOT).total
    assert result.status == "PASS" and f"= {total:,} bytes" in result.figure


# ---------------------------------------------------------------------------------------------------------------
# The artifact's integrity and decompression bound


def test_a_flipped_payload_byte_is_a_hash_mismatch(demo: Demo, tmp_path: Path) -> None:
    data = bytearray(demo.artifact.read_bytes())
    data[-10] ^= 0xFF
    corrupt = tmp_path / "corrupt.pgolf"
    corrupt.write_bytes(bytes(data))
    results, _ = run_checks(corrupt, train_logs=[demo.summary])
    assert by_name(results, "artifact_integrity").figure == "refused: hash_mismatch"
    # The summary's sha256 describes the original file, not this one.
    assert failing(results) == {"artifact_integrity", "train_artifact_sha256"}


def test_a_payload_that_decompresses_past_its_declaration_fails_the_bound(demo: Demo, tmp_path: Path) -> None:
    """Re-encode the artifact with extra bytes inside the zstd stream and consistent compressed hashes."""
    data = demo.artifact.read_bytes()
    magic, version, manifest_nbytes = struct.unpack_from("<8sII", data)
    manifest = json.loads(data[16 : 16 + manifest_nbytes])
    raw = zstandard.ZstdDecompressor().decompress(data[16 + manifest_nbytes :])
    bomb = zstandard.ZstdCompressor(level=3).compress(raw + bytes(1 << 20))
    manifest["payload"].update(compressed_nbytes=len(bomb), compressed_sha256=hashlib.sha256(bomb).hexdigest())
    encoded = json.dumps(manifest, separators=(",", ":")).encode()
    path = tmp_path / "bomb.pgolf"
    path.write_bytes(struct.pack("<8sII", magic, version, len(encoded)) + encoded + bomb)
    results, _ = run_checks(path)
    assert by_name(results, "decompression_bound").figure == "refused: decompression_bomb"
    assert failing(results) == {"artifact_integrity", "decompression_bound"}


# ---------------------------------------------------------------------------------------------------------------
# Training time, environment, sha256


def test_training_time_just_over_600_s_fails(demo: Demo, tmp_path: Path) -> None:
    summary = json.loads(demo.summary.read_text())
    for time_ms, expected in ((600_000.0, "PASS"), (600_100.0, "FAIL")):
        summary["train_time_ms"] = time_ms
        path = tmp_path / "summary.json"
        path.write_text(json.dumps(summary))
        assert statuses(run_checks(demo.artifact, train_logs=[path])[0])["train_time"] == expected
    log = tmp_path / "train.log"
    log.write_text(demo.log.read_text() + "stopping_early: wallclock_cap train_time:600100ms step:3/3\n")
    result = by_name(run_checks(demo.artifact, train_logs=[log])[0], "train_time")
    assert result.status == "FAIL" and result.figure.startswith("600.100 s > 600 s (train.log: stopping_early")


def test_a_summary_for_another_artifact_fails_the_sha256_check(demo: Demo, tmp_path: Path) -> None:
    summary = json.loads(demo.summary.read_text())
    summary["artifact"]["sha256"] = "0" * 64
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert failing(run_checks(demo.artifact, train_logs=[path])[0]) == {"train_artifact_sha256"}


def test_a_malformed_summary_is_reported(demo: Demo, tmp_path: Path) -> None:
    summary = json.loads(demo.summary.read_text())
    summary["world_size"] = "eight"
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    results, _ = run_checks(demo.artifact, train_logs=[path])
    assert failing(results) == {"train_records"}
    assert "field 'world_size' has an invalid value 'eight'" in by_name(results, "train_records").reason


def test_upstream_logs_are_read_for_size_and_time(tmp_path: Path) -> None:
    artifact, code = tmp_path / "final_model.int6.ptz", tmp_path / "train_gpt.py"
    with artifact.open("wb") as fh:
        fh.truncate(15_887_928)  # the size the log states
    with code.open("wb") as fh:
        fh.truncate(89_458)
    within = FIXTURES / "upstream_file_log_within_cap.txt"
    results, _ = run_checks(artifact, train_logs=[within], code=[code], upstream=True)
    found = statuses(results)
    # The stand-in files (zeros of the logged sizes) are opened by the upstream reader and refused; the log
    # checks do not depend on that (tests/test_upstream_check.py covers real upstream artifacts).
    assert failing(results) == {"artifact_integrity"}, results
    assert found["submission_size"] == found["train_time"] == found["train_log_sizes"] == "PASS"
    assert {found[name] for name in ("decompression_bound", "model_forward")} == {"SKIP"}
    # The script source at the head of the file (a comment quoting 612345ms) is not a log line.
    assert by_name(results, "train_time").figure.startswith("589.977 s <= 600 s")
    assert by_name(results, "train_environment").figure == "world_size 8; device 8xNVIDIA H100 80GB HBM3"
    # 128 ms over, on the final step of a run at 83.9 ms/step: the overshoot the organisers accepted is a WARN
    # (exit 0), and a FAIL under --strict.
    over = FIXTURES / "upstream_stdout_over_cap.txt"
    done = run_module("verifier", "check", artifact, "--upstream", "--code", code, "--train-log", over)
    assert done.returncode == 1, done.stdout  # the stand-in artifact's integrity FAIL
    assert "600.128 s > 600 s (upstream_stdout_over_cap.txt: stopping_early: wallclock_cap" in done.stdout
    assert "only the final step (step 7179) crossed the cap: over by 128 ms" in done.stdout
    assert "4 pass, 1 warn, 1 fail, 11 skip" in done.stdout
    strict = run_module("verifier", "check", artifact, "--upstream", "--code", code, "--train-log", over, "--strict")
    assert strict.returncode == 1 and "--strict: only the final step" in strict.stdout
    with artifact.open("wb") as fh:
        fh.truncate(15_887_929)  # not the artifact the log describes
    results, _ = run_checks(artifact, train_logs=[within], code=[code], upstream=True)
    assert failing(results) == {"train_log_sizes", "artifact_integrity"}


def test_april_format_upstream_logs_are_read_for_time_and_environment(tmp_path: Path) -> None:
    """The log format of every record since 2026-04-01: spaced separators, times in minutes, an indented dump."""
    artifact, code, log = tmp_path / "final_model.int6.ptz", tmp_path / "train_gpt.py", tmp_path / "train_seed0.log"
    artifact.write_bytes(b"\0" * 1000)
    code.write_text("print('x')\n")
    log.write_text("Hyperparameters:\n  seed: 0\n  world_size: 8\n"
                   "4500/20000 train_loss: 2.2951 train_time: 8.9m tok/s: 6618594\n"
                   "4961/20000 val_loss: 2.3593 val_bpb: 1.0780\n"
                   "stopping_early: wallclock_cap train_time: 599544ms step: 4961/20000\n")
    results, _ = run_checks(artifact, train_logs=[log], code=[code], upstream=True)
    assert by_name(results, "train_time").status == "PASS"
    assert by_name(results, "train_time").figure.startswith("599.544 s <= 600 s (train_seed0.log: stopping_early")
    assert by_name(results, "train_environment").figure.startswith("world_size 8;")
    assert by_name(results, "train_environment").status == "PASS"


def test_upstream_mode_requires_the_code_files(tmp_path: Path) -> None:
    artifact = tmp_path / "final_model.int6.ptz"
    artifact.write_bytes(b"PK")
    done = run_module("verifier", "check", artifact, "--upstream")
    assert done.returncode == 2 and "--upstream needs --code" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The evaluation report


def test_evaluation_just_over_600_s_fails(demo: Demo, tmp_path: Path) -> None:
    def elapsed(seconds: float):
        return lambda events: events[-1].update(elapsed_s=seconds)

    assert statuses(run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, elapsed(600.0)))[0])[
        "eval_time"] == "PASS"
    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, elapsed(600.1)))
    assert failing(results) == {"eval_time"} and by_name(results, "eval_time").figure == "600.100 s > 600 s"


def test_one_target_missing_fails(demo: Demo, tmp_path: Path) -> None:
    def one_more_token(events: list[dict]) -> None:  # the stream had N + 1 tokens; the chunks cover N − 1 targets
        events[0]["tokens"] += 1
        events[0]["targets"] += 1

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, one_more_token))
    assert failing(results) == {"eval_targets"}
    reason = by_name(results, "eval_targets").reason
    assert f"expected N-1 = {VAL_TOKENS}" in reason and f"the stream has targets 1..{VAL_TOKENS}" in reason


def test_a_chunk_sum_that_does_not_match_fails(demo: Demo, tmp_path: Path) -> None:
    def nudge(events: list[dict]) -> None:
        events[2]["nll_sum"] *= 1 + 1e-7

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, nudge))
    assert failing(results) == {"eval_bpb"}
    assert "differs from the chunk sums by" in by_name(results, "eval_bpb").reason


def test_training_on_a_chunk_not_yet_scored_fails(demo: Demo, tmp_path: Path) -> None:
    def train_ahead(events: list[dict]) -> None:
        chunks = events[1:-1]
        chunks[0]["trained_range"] = [1, chunks[1]["target_range"][1]]

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, train_ahead))
    # The chunk event no longer agrees with its own order-trace entry either.
    assert failing(results) == {"eval_score_before_update", "eval_order_trace"}

    def train_last(events: list[dict]) -> None:
        events[-2]["trained_range"] = list(events[-2]["target_range"])

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, train_last))
    assert "chunk 2: the trace says trained on None" in by_name(results, "eval_score_before_update").reason

    def train_last_in_the_trace_too(events: list[dict]) -> None:  # a forgery consistent with its own trace
        train_last(events)
        events[-2]["order_trace"]["trained"] = list(events[-2]["target_range"])

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, train_last_in_the_trace_too))
    assert "chunk 2: the last chunk was trained on" in by_name(results, "eval_score_before_update").reason


@pytest.mark.parametrize("field, value", [("positions", 7), ("scored_from_vector", False), ("sum_error_max", 0.5),
                                          ("scored_gap_max", 1e-3)])
def test_a_report_whose_own_c2_figures_do_not_hold_fails(demo: Demo, tmp_path: Path, field: str, value) -> None:
    # The engine's flags stay true: the check must re-judge the figures themselves, not trust the flags.
    def edit(events: list[dict]) -> None:
        events[-1]["compliance"]["ngram"][field] = value

    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, edit))
    assert failing(results) == {"eval_mode"}


def test_the_hashed_940_mode_fails(demo: Demo, tmp_path: Path) -> None:
    evaluated = run_module("service", "evaluate", demo.artifact, "--data", demo.data, "--tokenizer", demo.tokenizer,
                           *EVAL, "--ngram", "hashed-940")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = tmp_path / "hashed.ndjson"
    report.write_text(evaluated.stdout)
    results, _ = run_checks(demo.artifact, eval_report=report)
    assert failing(results) == {"eval_mode"}
    assert "hashed-940 scores the target-keyed hashed cache" in by_name(results, "eval_mode").reason


def test_a_report_of_another_artifact_or_cut_short_fails(demo: Demo, tmp_path: Path) -> None:
    results, _ = run_checks(demo.artifact, eval_report=edited_report(
        demo, tmp_path, lambda events: events[0].update(artifact_sha256="f" * 64)))
    assert failing(results) == {"eval_artifact_sha256"}
    results, _ = run_checks(demo.artifact, eval_report=edited_report(demo, tmp_path, lambda events: events.pop()))
    assert failing(results) == {"eval_report"}
    assert by_name(results, "eval_report").reason == "the last event is 'chunk': the report is cut short"


def a_stored_report(sha256: str) -> list[dict]:
    """test_judge's two-chunk report, judged and completed with the fields only `verifier check` reads."""
    start, *chunks, end = report()
    start.update(tokens=9, bytes=8, artifact_sha256=sha256)
    for chunk in chunks:
        chunk.update(targets=4, bytes=4)
    end["val_bpb"] = 8.0 / (math.log(2) * 8)
    from service.judge import judged

    return list(judged([start, *chunks, end]))


def test_a_hostile_report_gets_check_rows_not_a_traceback(tmp_path: Path) -> None:
    # `verifier check --eval-report` reads what a submitter hands in: any field may hold anything JSON can.
    facts = ArtifactFacts(tmp_path / "model.pgolf", 1000, "cd" * 32)
    honest = a_stored_report(facts.sha256)
    path = tmp_path / "eval.ndjson"
    path.write_text("\n".join(json.dumps(event) for event in honest))
    assert statuses(check_eval_report(path, facts)) == dict.fromkeys(EVAL_CHECKS, "PASS")  # the fuzz reaches every row
    for field, junk, events in junk_reports(honest):
        path.write_text("\n".join(json.dumps(event) for event in events))
        results = check_eval_report(path, facts)
        assert [result.name for result in results] == list(EVAL_CHECKS), (field, junk)
