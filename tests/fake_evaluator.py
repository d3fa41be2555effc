"""A stand-in for `python -m service evaluate` in the service tests: a real subprocess printing NDJSON slowly.

It takes the engine's command line (ARTIFACT --data --tokenizer --ttt/--no-ttt --ngram --max-seconds) and
prints the engine's event schema (service/engine/events.py): start, one chunk per `chunk_seconds`, then end, or
timeout when the budget runs out. Its behaviour comes from the JSON file named by `--script` (passed through
PGOLF_EVAL_ARGS), read when it starts, so each test sets the behaviour of its next job:
  chunks, chunk_seconds   how many chunk events, how far apart
  ignore_limit            behave like an engine stuck inside a chunk: only the service's hard kill stops it
  exit_after_chunks, exit_code   die with this status after that many chunks, without a terminal event
  raw_lines               lines printed as they are after the start event (hostile output: NaN, forged types)
  raw_end                 a line printed instead of the end event
  spin_seconds            burn CPU this long after the start event (a runaway under the service's CPU rlimit)
  nan_result              end with val_bpb NaN, written as Python's json writes it (not valid JSON)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--ttt", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--ttt-recipe")
    parser.add_argument("--ngram", required=True)
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--script", type=Path, required=True)
    args = parser.parse_args()
    script = json.loads(args.script.read_text()) if args.script.exists() else {}
    chunks, chunk_seconds = int(script.get("chunks", 3)), float(script.get("chunk_seconds", 0.2))
    ignore_limit, exit_after = bool(script.get("ignore_limit", False)), script.get("exit_after_chunks")

    started = time.monotonic()
    targets_per_chunk, bytes_per_chunk = 1000, 2400
    # Like the engine, the start event's config names the files it read, with their server paths.
    emit({"type": "start", "config": {"ttt": args.ttt, "ngram": args.ngram, "fake": True, "artifact": args.artifact,
                                      "data_dir": args.data, "tokenizer": args.tokenizer},
          "artifact_sha256": None, "tokens": chunks * targets_per_chunk + 1,
          "targets": chunks * targets_per_chunk, "bytes": chunks * bytes_per_chunk, "chunks": chunks})
    print(f"fake evaluator: started (service token visible: {'PGOLF_API_TOKEN' in os.environ})", file=sys.stderr,
          flush=True)
    print(f"fake evaluator: database url visible: {'PGOLF_DATABASE_URL' in os.environ}", file=sys.stderr, flush=True)
    for raw in script.get("raw_lines", []):
        sys.stdout.write(raw + "\n")
        sys.stdout.flush()
    spin_until = time.monotonic() + float(script.get("spin_seconds", 0.0))
    while time.monotonic() < spin_until:
        pass
    nll_total = 0.0
    for index in range(chunks):
        if exit_after is not None and index == exit_after:
            print(f"fake evaluator: dying on purpose with status {script['exit_code']}", file=sys.stderr)
            return int(script["exit_code"])
        elapsed = time.monotonic() - started
        if not ignore_limit and elapsed + chunk_seconds > args.max_seconds:
            targets = index * targets_per_chunk
            emit({"type": "timeout", "reason": f"budget of {args.max_seconds:g} s reached",
                  "targets_scored": targets, "bytes": index * bytes_per_chunk, "nll_sum": nll_total,
                  "partial_val_loss": nll_total / targets if targets else None,
                  "partial_val_bpb": nll_total / (math.log(2) * index * bytes_per_chunk) if index else None,
                  "chunks_done": index, "elapsed_s": elapsed, "compliance": {"compliant": True}})
            return 3
        time.sleep(chunk_seconds)
        chunk_nll = targets_per_chunk * (3.0 - 0.1 * index)
        nll_total += chunk_nll
        done = index + 1
        emit({"type": "chunk", "index": index,
              "target_range": [index * targets_per_chunk + 1, done * targets_per_chunk + 1],
              "targets": targets_per_chunk, "bytes": bytes_per_chunk, "nll_sum": chunk_nll,
              "chunk_bpb": chunk_nll / (math.log(2) * bytes_per_chunk),
              "running_targets": done * targets_per_chunk, "running_bytes": done * bytes_per_chunk,
              "running_bpb": nll_total / (math.log(2) * done * bytes_per_chunk),
              "trained_range": None, "elapsed_s": time.monotonic() - started, "phase_seconds": {}})
    if "raw_end" in script:
        sys.stdout.write(script["raw_end"] + "\n")
        sys.stdout.flush()
        return 0
    emit({"type": "end", "val_loss": nll_total / (chunks * targets_per_chunk),
          "val_bpb": math.nan if script.get("nan_result") else nll_total / (math.log(2) * chunks * bytes_per_chunk),
          "targets_scored": chunks * targets_per_chunk, "bytes": chunks * bytes_per_chunk,
          "nll_sum": nll_total, "elapsed_s": time.monotonic() - started,
          "compliance": {"compliant": args.ngram != "hashed-940", "scored_once": True}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
