"""`python -m verifier compare`: one real artifact evaluated both ways, the table, and the picture as PNG and SVG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine_cli import EvalData, artifact, eval_data  # noqa: F401  (module fixtures)

from service.compare import ComparisonError, compare_reports, render_plot, summarize
from service.engine.options import EvalOptions

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compared(eval_data: EvalData, artifact: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
             ) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("compare")
    command = [sys.executable, "-m", "verifier", "compare", str(artifact), "--data", str(eval_data.data_dir),
               "--tokenizer", str(eval_data.tokenizer), "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done, out


def test_compare_evaluates_both_ways_and_writes_table_json_png_svg(compared) -> None:
    done, out = compared
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    comparison = json.loads((out / "comparison.json").read_text())
    honest, claimed = comparison["sides"]
    defaults = EvalOptions()
    assert honest["method"].startswith(f"score-first TTT {defaults.ttt_recipe} + ngram {defaults.ngram}")
    assert "ngram hashed-940" in claimed["method"]
    assert honest["compliant"] is True and claimed["compliant"] is False
    assert honest["status"] == claimed["status"] == "end"
    # C1-C4 from the verifier's probes: the claimed method's cache is not a distribution (C2), the rest holds.
    assert honest["conditions_source"] == claimed["conditions_source"] == "verifier probes"
    assert honest["conditions"] == {"C1": "PASS", "C2": "PASS", "C3": "PASS", "C4": "PASS"}
    assert claimed["conditions"]["C2"] == "FAIL" and claimed["conditions"]["C4"] == "PASS"
    # The measured Σp of the claimed method is reported (on 1,800 tokens its 2^22 buckets do not collide yet).
    assert claimed["probability_sum"]["positions"] > 0 and claimed["probability_sum"]["max"] >= 1.0 - 1e-6
    table = (out / "comparison.md").read_text()
    assert f"| val_bpb | {honest['val_bpb']:.6f} | {claimed['val_bpb']:.6f} |" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "comparison.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "claimed (hashed-940)" in svg
    for kind in ("table", "json", "png", "svg"):
        assert f"comparison {kind}: {out}" in done.stdout
    # Both evaluations' reports are kept and are what the comparison was built from.
    assert (out / "honest.ndjson").read_text().splitlines()[-1] and (out / "claimed.ndjson").is_file()


def test_reports_of_two_artifacts_are_not_compared(compared) -> None:
    _, out = compared
    events = [json.loads(line) for line in (out / "honest.ndjson").read_text().splitlines()]
    other = [dict(event, artifact_sha256="0" * 64) if event["type"] == "start" else event for event in events]
    with pytest.raises(ComparisonError, match="different artifacts"):
        compare_reports(summarize(events, "a"), summarize(other, "b"))
    with pytest.raises(ComparisonError, match="no start or no terminal"):
        summarize(events[:-1], "unfinished")
    with pytest.raises(ValueError, match="png or svg"):
        render_plot(compare_reports(summarize(events, "a"), summarize(events, "b")), "gif")
