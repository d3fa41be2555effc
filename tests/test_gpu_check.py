"""bench/gpu_check.sh --dry-run: every step of the GPU check on a tiny config on CPU, torch.compile included.

This is also the CPU test of the model's torch.compile path: the dry run trains with the inductor-compiled
model (forward and backward, C++ kernels built with the system compiler) and compares the compiled loss with the
eager one on the same batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU (inductor) needs a C++ compiler (g++)")
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path: Path, embedded_data: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO_ROOT / "bench/gpu_check.sh"), "--dry-run", "--data", str(embedded_data),
                           "--work", str(tmp_path), "--train-steps", "1", "--eval-tokens", "2000"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["device"] == "cpu" and report["completed"] is True
    assert report["threads"] == "intra_op_threads:1 (OMP_NUM_THREADS=1 is set: honoured)"
    train = report["train"]
    assert train["compile"] is True and train["compiled_matches_eager"] is True
    assert train["ms_per_step"] > 0 and train["tokens_per_s"] > 0 and train["grad_accum"] == 2
    logits = report["logits_bf16_vs_fp32"]
    assert 0 < logits["max_abs_logit_diff"] < 1.0 and abs(logits["nll_diff"]) < 0.05
    assert 0.5 <= logits["argmax_agreement"] <= 1.0
    evaluation = report["eval"]
    assert evaluation["terminal"] == "end" and evaluation["compliant"] is True
    assert evaluation["targets"] == 1999 and evaluation["options"]["ttt"] is True
    assert evaluation["options"]["ngram"] != "off" and math.isfinite(evaluation["val_bpb"])
    assert all(evaluation["tokens_per_s"][phase] > 0 for phase in ("score", "ngram", "ttt_train", "overall"))
    assert "val split, first 2,000 tokens" in evaluation["stream"]
    assert report["peak_memory_bytes"] is None  # no GPU
