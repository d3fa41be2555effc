"""N-gram mixing benchmarks: speed of exact vs `hashed-940`, and quality of the mixing modes.

Speed (default): causal n-gram statistics for orders 2–7 over a 10M-token stream, scored and committed in
engine-sized chunks (131,072 tokens) as the evaluation engine drives a mixer (prepare the chunk, score it
in batches, commit it), exact mode and hashed-940 (PR-head per-segment updates, and the fork's lock-step
variant) side by side in one run. Prints tokens/s by wall clock and by CPU time (user + system) — the
latter is steadier on a shared machine. The stream is, in order of preference, the FineWeb sample val
shard, the embedded corpus val shard (`make demo`), or Zipf-distributed synthetic ids; the line "stream:"
says which.

Quality (`--quality`): mixed NLL and bpb on the FineWeb sample val shard for every mode, with a stand-in
model: a bigram model estimated on the sample *train* shard (interpolated with its unigram), or the real
model's per-position statistics from `--model-stats FILE.npz` (arrays `target_logprob` and `entropy`, nats,
for target positions 1..N−1 of the val shard). `--swap-roles` streams the train shard instead (stand-in
from val): settings such as the smoothing concentration are chosen there, not on validation text.

    .venv/bin/python bench/ngram.py [--tokens N] [--chunk C]
    .venv/bin/python bench/ngram.py --quality [--model-stats FILE.npz]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.engine.ngram import NGRAM_MODES, NgramMixer, SmoothedNgramMixer, make_mixer  # noqa: E402
from service.engine.ngram_hashed import Hashed940Mixer  # noqa: E402
from trainer.data.shards import read_shard  # noqa: E402

VOCAB = 1024


def sample_dir() -> Path:
    env = os.environ.get("PGOLF_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fineweb_sample"


def speed_stream(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n_tokens of text-like ids and a description of where they come from."""
    rng = np.random.default_rng(seed)
    candidates = [
        (sample_dir() / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", "FineWeb sample val shard"),
        (REPO / "data" / "embedded" / "embedded_val_000000.bin", "embedded corpus val shard"),
    ]
    for path, name in candidates:
        if path.exists():
            base = read_shard(path)
            # Copies after the first are relabelled by a fixed random permutation of the vocabulary: each copy
            # keeps real text's n-gram statistics, but copies share no n-grams, so the stream does not turn
            # into one long repeat (which would flatter every cache).
            copies = [base] + [rng.permutation(VOCAB).astype(np.uint16)[base]
                               for _ in range(n_tokens // len(base))]
            return (np.concatenate(copies)[:n_tokens],
                    f"{name} ({len(base):,} tokens) tiled to {n_tokens:,}, each further copy relabelled by a "
                    "random vocabulary permutation")
    ids = np.minimum(rng.zipf(1.2, n_tokens) - 1, VOCAB - 1).astype(np.uint16)
    return ids, f"Zipf(1.2) synthetic ids, {n_tokens:,} tokens (no FineWeb sample or embedded corpus found)"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


LOCK_STEP = "hashed-940/lock-step"  # the fork's variant: tables change at commit only; no per-segment work


def new_mixer(mode: str) -> NgramMixer:
    if mode == LOCK_STEP:
        return Hashed940Mixer(VOCAB, update_every=None)
    mixer = make_mixer(mode, VOCAB)
    assert mixer is not None, "mode 'off' has nothing to measure"
    return mixer


def run_mode(mode: str, tokens: np.ndarray, chunk: int, batch: int, target_lp: np.ndarray, entropy: np.ndarray
             ) -> tuple[float, float, float]:
    """(wall s, CPU s, mean NLL) of scoring every chunk (prepared, then in batches) and committing it."""
    mixer = new_mixer(mode)
    gc.collect()
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    total = 0.0
    for start in range(1, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        mixer.prepare(tokens, end)
        for first in range(start, end, batch):
            positions = np.arange(first, min(first + batch, end))
            total += float(mixer.score(positions, tokens, target_lp[positions], entropy[positions]).sum())
        mixer.commit(tokens, end)
    return time.perf_counter() - wall0, cpu_seconds() - cpu0, total / (len(tokens) - 1)


def speed(args: argparse.Namespace) -> None:
    tokens, description = speed_stream(args.tokens)
    print(f"stream: {description}")
    print(f"chunk: {args.chunk:,} tokens, prepared then scored in batches of {args.batch:,}; orders 2-7; "
          f"stand-in model: uniform over {VOCAB} ids (the n-gram work does not depend on the model's numbers)")
    target_lp = np.full(len(tokens), -np.log(VOCAB))
    entropy = np.full(len(tokens), np.log(VOCAB))
    results = {}
    for mode in args.modes:
        wall, cpu, nll = run_mode(mode, tokens, args.chunk, args.batch, target_lp, entropy)
        results[mode] = (wall, cpu)
        compliant = new_mixer(mode).compliant
        print(f"{mode:>20}: {len(tokens) / wall / 1e6:6.2f} M tokens/s wall ({wall:6.1f} s), "
              f"{len(tokens) / cpu / 1e6:6.2f} M tokens/s CPU ({cpu:6.1f} s user+sys), "
              f"mean NLL {nll:.4f} nats, compliant={compliant}")
    for other in ("hashed-940", LOCK_STEP):
        if "exact" in results and other in results:
            wall_ratio = results[other][0] / results["exact"][0]
            cpu_ratio = results[other][1] / results["exact"][1]
            print(f"exact vs {other} speed: {wall_ratio:.2f}x by wall clock, {cpu_ratio:.2f}x by CPU time")


def bigram_stand_in(train: np.ndarray, mass: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(V, V) log p(v | u) of a bigram model interpolated with the add-one unigram, and the (V,) row entropies."""
    unigram = (np.bincount(train, minlength=VOCAB) + 1.0) / (len(train) + VOCAB)
    pairs = np.zeros((VOCAB, VOCAB))
    np.add.at(pairs, (train[:-1].astype(np.intp), train[1:].astype(np.intp)), 1.0)
    probs = (pairs + mass * unigram[None, :]) / (pairs.sum(axis=1, keepdims=True) + mass)
    logp = np.log(probs)
    return logp, -(probs * logp).sum(axis=1)


def quality(args: argparse.Namespace) -> None:
    from trainer.data.byte_accounting import ByteTables, bits_per_byte

    root = sample_dir()
    data = root / "datasets" / "fineweb10B_sp1024"
    if not (data / "fineweb_val_000000.bin").exists():
        print(f"quality needs the FineWeb sample at {root} (set PGOLF_SHARED_DATA)")
        return
    val = read_shard(data / "fineweb_val_000000.bin", vocab_size=VOCAB)
    train = read_shard(data / "fineweb_train_000000.bin", vocab_size=VOCAB)
    if args.swap_roles:  # choose settings here: the train shard is the stream, the stand-in comes from val
        val, train = train, val
    tables = ByteTables.from_model_file(root / "tokenizers" / "fineweb_1024_bpe.model", VOCAB)
    targets = np.arange(1, len(val))
    n_bytes = int(tables.target_bytes(val[:-1], val[1:]).sum())
    if args.model_stats:
        stats = np.load(args.model_stats)
        target_lp, entropy = np.asarray(stats["target_logprob"], np.float64), np.asarray(stats["entropy"], np.float64)
        if target_lp.shape != (len(targets),) or entropy.shape != (len(targets),):
            raise SystemExit(f"--model-stats needs arrays of {len(targets)} entries (positions 1..N-1)")
        model = f"model statistics from {args.model_stats}"
    else:
        logp, row_entropy = bigram_stand_in(train)
        target_lp = logp[val[:-1].astype(np.intp), val[1:].astype(np.intp)]
        entropy = row_entropy[val[:-1].astype(np.intp)]
        model = (f"stand-in bigram model from the sample {'val' if args.swap_roles else 'train'} shard "
                 "(interpolated with its unigram, mass 10)")
    full_lp = np.zeros(len(val))
    full_lp[1:], full_entropy = target_lp, np.concatenate([[0.0], entropy])
    stream = "train shard (roles swapped)" if args.swap_roles else "val"
    print(f"{stream}: {len(val):,} tokens, {len(targets):,} targets, {n_bytes:,} bytes; {model}")
    print(f"chunk: {args.chunk:,} tokens (score a chunk, then commit it)")

    def report(name: str, mixer: object | None) -> None:
        if mixer is None:
            nll = -target_lp
        else:
            parts = []
            for start in range(1, len(val), args.chunk):
                end = min(start + args.chunk, len(val))
                positions = np.arange(start, end)
                parts.append(mixer.score(positions, val, full_lp[positions], full_entropy[positions]))
                mixer.commit(val, end)
            nll = np.concatenate(parts)
        total = float(nll.sum())
        label = "" if mixer is None or mixer.compliant else "  (NOT a valid score: non-compliant)"
        print(f"{name:>24}: {total / len(targets):.4f} nats/token, bpb {bits_per_byte(total, n_bytes):.4f}{label}")

    report("model only", None)
    for mode in NGRAM_MODES[1:]:
        report(mode, make_mixer(mode, VOCAB))
    for concentration in (0.5, 1.0, 4.0, 8.0):  # the default is 2
        report(f"smoothed beta={concentration}", SmoothedNgramMixer(VOCAB, concentration=concentration))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000, help="stream length for the speed run")
    parser.add_argument("--chunk", type=int, default=131_072, help="tokens scored before each commit")
    parser.add_argument("--batch", type=int, default=131_072,
                        help="targets per score call (the engine scores batch by batch after prepare)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["exact", "hashed-940", LOCK_STEP],
                        help=f"comma-separated modes for the speed run ({', '.join(NGRAM_MODES[1:])}, {LOCK_STEP})")
    parser.add_argument("--quality", action="store_true", help="measure mixed bpb on the sample val shard")
    parser.add_argument("--model-stats", help="npz with target_logprob and entropy for the val targets")
    parser.add_argument("--swap-roles", action="store_true",
                        help="quality on the train shard with a stand-in from val (for choosing settings)")
    args = parser.parse_args()
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
