"""`verifier check --upstream` opens a .ptz through the safe reader: integrity, decompression bound, forward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import zstandard

from tests.test_upstream_artifact import PR940_CODE, PR940_ENV, upstream_file
from verifier.check import run_checks

ENV = [f"{k}={v}" for k, v in PR940_ENV.items()]
ARTIFACT_ROWS = ("artifact_integrity", "decompression_bound", "model_forward")


def rows(results) -> dict[str, tuple[str, str, str]]:
    return {r.name: (r.status, r.figure, r.reason) for r in results if r.name in ARTIFACT_ROWS}


def test_a_real_upstream_artifact_passes_integrity_bound_and_forward(tmp_path: Path):
    path, _, _ = upstream_file(tmp_path, "int6", "zstd")
    results, _ = run_checks(path, code=[PR940_CODE], upstream=True, env=ENV)
    found = rows(results)
    assert {status for status, _, _ in found.values()} == {"PASS"}, found
    assert "mixed_int6 + zstd" in found["artifact_integrity"][1]
    assert "2 layers x 192d" in found["model_forward"][1]

    done = subprocess.run([sys.executable, "-m", "verifier", "check", str(path), "--upstream", "--code",
                           str(PR940_CODE), *[a for item in ENV for a in ("--env", item)]],
                          capture_output=True, text=True, timeout=300)
    assert "artifact_integrity" in done.stdout and "FAIL" not in done.stdout.split("artifact_integrity")[1][:20]


def test_upstream_artifacts_that_do_not_fit_or_are_bombs_fail(tmp_path: Path):
    path, _, _ = upstream_file(tmp_path, "int6", "zstd")
    wrong = run_checks(path, code=[PR940_CODE], upstream=True, env=[*ENV[:3], *ENV[4:], "NUM_KV_HEADS=4"])[0]
    assert rows(wrong)["artifact_integrity"][:2] == ("FAIL", "refused: shape_mismatch")
    assert rows(wrong)["model_forward"][0] == "SKIP"

    bomb = tmp_path / "bomb.ptz"
    bomb.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"\0" * (64 << 20)))
    found = rows(run_checks(bomb, code=[PR940_CODE], upstream=True, env=ENV)[0])
    assert found["artifact_integrity"][1] == found["decompression_bound"][1] == "refused: decompression_bomb"
    assert found["decompression_bound"][0] == "FAIL"

    unsupported = rows(run_checks(path, code=[PR940_CODE], upstream=True, env=[*ENV, "CANON_LAST_N=3"])[0])
    assert unsupported["artifact_integrity"][1] == "refused: unsupported_architecture"
    assert "CANON_LAST_N=3" in unsupported["artifact_integrity"][2]
