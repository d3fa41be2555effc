"""Evaluation modes side by side on the FineWeb sample: val_bpb and eval throughput for one artifact.

    .venv/bin/python bench/eval.py ARTIFACT                         # all modes, engine defaults, auto device
    .venv/bin/python bench/eval.py ARTIFACT --max-tokens 100001 --device cpu --modes plain,ngram-exact
    torchrun --nproc_per_node=8 bench/eval.py ARTIFACT              # ranks share each chunk (rank 0 prints)

Modes (each a fresh load of the artifact, since TTT changes the model; seq_len is the artifact's training
sequence length and each TTT recipe uses its reference chunk unless --seq-len / --chunk-tokens say otherwise):
    plain              sliding windows (stride 64), the reference's score
    ttt-pr940          + score-first TTT, the pr940 recipe (131,072-token chunks)
    ttt-legal-sgd      + score-first TTT, the legal SGD recipe (32,768-token chunks)
    ngram-exact        + exact normalised n-gram mixing
    ngram-smoothed     + the smoothed (interpolated) exact n-gram variant
    ngram-tilt         + the token-only causal tilt of the softmax (hint from exact prefix counts)
    ttt+ngram-exact    TTT (--ttt-recipe) + exact n-gram
    ttt+ngram-smoothed TTT (--ttt-recipe) + smoothed n-gram
    ttt+ngram-tilt     TTT (--ttt-recipe) + tilt
    default            what `python -m service evaluate` runs without options (EvalOptions' defaults)
    hashed-940         the upstream hashed cache: NOT a valid score (unnormalised), shown for comparison only

The data is ../shared/data/fineweb_sample (or $PGOLF_SHARED_DATA); the bench exits with a message when it is
absent. Its val shard is 628k tokens of FineWeb documents, not the official val set, so figures are comparable
with each other, not with leaderboard numbers. Eval tokens/s counts scored targets per wall-clock second of the
whole evaluation (scoring, mixing and training), as reported in the engine's `end` event.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from service.engine.options import PLAIN, EvalOptions  # noqa: E402
from service.engine.run import evaluate  # noqa: E402
from service.judge import judged  # noqa: E402

# Overrides of the bench's base options, which are PLAIN (no TTT, no n-gram) with the command line's settings.
MODES: dict[str, dict[str, object]] = {
    "plain": {},
    "ttt-pr940": {"ttt": True, "ttt_recipe": "pr940"},
    "ttt-legal-sgd": {"ttt": True, "ttt_recipe": "legal-sgd"},
    "ngram-exact": {"ngram": "exact"},
    "ngram-smoothed": {"ngram": "smoothed"},
    "ngram-tilt": {"ngram": "tilt"},
    "ttt+ngram-exact": {"ttt": True, "ngram": "exact"},
    "ttt+ngram-smoothed": {"ttt": True, "ngram": "smoothed"},
    "ttt+ngram-tilt": {"ttt": True, "ngram": "tilt"},
    "default": {"ttt": EvalOptions.ttt, "ttt_recipe": EvalOptions.ttt_recipe, "ngram": EvalOptions.ngram},
    "hashed-940": {"ngram": "hashed-940"},
}


def sample_dir() -> Path:
    env = os.environ.get("PGOLF_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "fineweb_sample"


def run_mode(base: EvalOptions, overrides: dict[str, object], speaks: bool) -> dict:
    """The terminal event, with ``ngram_seconds``: the n-gram phase summed over the chunk events."""
    options = EvalOptions(**{**base.__dict__, **overrides})
    last: dict = {}
    ngram_seconds = 0.0
    for event in judged(evaluate(options)):
        last = event
        if event["type"] == "chunk":
            ngram_seconds += event["phase_seconds"].get("ngram", 0.0)
        if speaks and event["type"] == "chunk" and event["index"] % 10 == 0:
            print(f"  chunk {event['index']}: running_bpb={event['running_bpb']:.6f} "
                  f"elapsed={event['elapsed_s']:.1f}s", file=sys.stderr, flush=True)
    return {**last, "ngram_seconds": ngram_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seq-len", type=int, default=EvalOptions.seq_len)
    parser.add_argument("--stride", type=int, default=EvalOptions.stride)
    parser.add_argument("--chunk-tokens", type=int, default=EvalOptions.chunk_tokens)
    parser.add_argument("--batch-windows", type=int, default=EvalOptions.batch_windows)
    parser.add_argument("--ttt-recipe", default=EvalOptions.ttt_recipe)
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only a prefix of the val shard")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="per-mode budget (the bench measures, so the default is generous)")
    args = parser.parse_args()

    sample = sample_dir()
    tokenizer = sample / "tokenizers" / "fineweb_1024_bpe.model"
    if not tokenizer.is_file():
        print(f"FineWeb sample not found at {sample} (set PGOLF_SHARED_DATA); nothing to measure.")
        return 0
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    base = EvalOptions(artifact=args.artifact, data_dir=sample / "datasets" / "fineweb10B_sp1024",
                       tokenizer=tokenizer, seq_len=args.seq_len, stride=args.stride,
                       chunk_tokens=args.chunk_tokens, batch_windows=args.batch_windows, ttt_recipe=args.ttt_recipe,
                       max_seconds=args.max_seconds, device=args.device, max_tokens=args.max_tokens, **PLAIN)
    speaks = int(os.environ.get("RANK", "0")) == 0
    rows = []
    for mode in args.modes.split(","):
        if speaks:
            print(f"{mode} ...", file=sys.stderr, flush=True)
        result = run_mode(base, MODES[mode], speaks)
        if result.get("type") != "end":
            if speaks:
                print(f"{mode}: {result.get('type')}: {result.get('reason')}", file=sys.stderr)
            rows.append({"mode": mode, "status": result.get("type"), "reason": result.get("reason")})
            continue
        compliance = result["compliance"]
        rows.append({
            "mode": mode, "status": "end", "val_bpb": result["val_bpb"], "val_loss": result["val_loss"],
            "targets": result["targets_scored"], "elapsed_s": result["elapsed_s"],
            "tokens_per_s": result["targets_scored"] / max(result["elapsed_s"], 1e-9),
            "compliant": compliance["compliant"], "sum_error_max": compliance["ngram"]["sum_error_max"],
            "scored_gap_max": compliance["ngram"]["scored_gap_max"], "vectors": compliance["ngram"]["positions"],
            "ngram_seconds": result["ngram_seconds"], "ngram_tokens_per_s":
                result["targets_scored"] / result["ngram_seconds"] if result["ngram_seconds"] else None,
        })
        if speaks:  # each mode's figures as soon as it ends: a long bench that is stopped keeps what it measured
            print(f"{mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    if not speaks:
        return 0
    print(f"\nartifact {args.artifact}, {rows[0].get('targets', '?')} targets, seq {args.seq_len or 'from artifact'} "
          f"/ stride {args.stride}, chunk {args.chunk_tokens or 'per recipe'}, TTT recipe {args.ttt_recipe}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}\n")
    # Σp and the vector/shortcut gap are taken over every scored position (vectors = positions summed).
    print("| mode | val_bpb | eval tokens/s | elapsed s | n-gram s (tokens/s) | compliant | max abs(Σp−1) | "
          "max abs(p_vec−p_scored) | vectors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["status"] != "end":
            print(f"| {row['mode']} | {row['status']}: {row['reason']} | | | | | | | |")
            continue
        label = "yes" if row["compliant"] else "**NO (not a valid score)**"
        ngram = f"{row['ngram_seconds']:.1f} ({row['ngram_tokens_per_s']:,.0f})" if row["ngram_seconds"] else "-"
        gap = "-" if row["scored_gap_max"] is None else f"{row['scored_gap_max']:.1e}"
        print(f"| {row['mode']} | {row['val_bpb']:.6f} | {row['tokens_per_s']:,.0f} | {row['elapsed_s']:.1f} | "
              f"{ngram} | {label} | {row['sum_error_max']:.1e} | {gap} | {row['vectors']:,} |")
    print("\n" + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
