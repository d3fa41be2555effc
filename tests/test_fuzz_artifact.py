"""bench/fuzz_artifact.py with 2,000 inputs: the reader raises only its own errors, never hangs, stays small.

The bench runs as it does by hand (its own worker subprocesses, a watchdog per input); the 10^5-input figures are
in the reader's notes. The inputs are seeded, so a failure here names a seed that `--replay SEED` reproduces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_two_thousand_mutated_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "fuzz_artifact.py"), "--inputs", "2000", "--workers", "2",
         "--seed", "1000000", "--no-attacks", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    figures = json.loads(out.read_text())
    assert figures["inputs"] == 2000, done.stdout + done.stderr
    assert figures["foreign_exceptions"] == 0, figures["foreign_examples"]
    assert figures["hangs"] == 0, figures["hang_seeds"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert figures["peak_rss_bytes"] <= 1 << 30
    # The mutations reach every layer of the reader, not just the first check.
    outcomes = figures["outcomes"]
    assert outcomes.get("accepted", 0) > 0
    for code in ("schema_violation", "manifest_not_json", "hash_mismatch", "truncated", "invalid_tensor_data",
                 "decompression_bomb", "shape_mismatch", "declared_size_too_large"):
        assert outcomes.get(f"refused:{code}", 0) > 0, (code, outcomes)
