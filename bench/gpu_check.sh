#!/usr/bin/env bash
# One command for a lent GPU machine (one H100/H200): pr940 training with torch.compile, bf16-vs-fp32 logits,
# a 4 M-token evaluation with TTT + n-gram, peak GPU memory; one JSON object on stdout (bench/gpu_check.py).
#   bench/gpu_check.sh [--data DIR] [--eval-tokens N] [--train-steps N]
#   bench/gpu_check.sh --dry-run        # every step on a tiny config on CPU (part of the test suite)
# A GPU run is capped at 8 minutes (exit 124 past it); the dry run's speed depends on the CPU, so its caller
# bounds it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
case " $* " in
  *" --dry-run "*) exec "$PY" bench/gpu_check.py "$@" ;;
  *) exec timeout --signal=TERM --kill-after=10 480 "$PY" bench/gpu_check.py "$@" ;;
esac
