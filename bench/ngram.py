"""N-gram benchmarks: counting speed and memory at the full validation size, full-vocabulary mixing speed, and the
mixed bpb of every mode.

Speed (default): each mode in turn, in one process, driven the way the evaluation engine drives a mixer over a
stream of `--tokens` tokens in chunks of `--chunk` (131,072) tokens: `prepare` the chunk (one pass), read the
statistics of every target, mix the full-vocabulary distribution of a sample batch of each chunk (`--mix-batch`
targets, stand-in logits), mark the chunk scored and `commit` it. Printed per mode: counting tokens/s (prepare +
statistics + commit, over every target; wall clock and CPU time), mixing tokens/s (vectors built per second),
the peak RSS of the mode (the process high-water mark is reset between modes) and the size of the count tables.
`hashed-940` runs beside them (its counting is its target-only scoring). Each mode's tables are freed before the
next starts.

The stream: the FineWeb sample val shard (628k tokens; else the embedded val shard, else Zipf ids) tiled to
`--tokens`, every copy after the first relabelled by a fixed random permutation of the vocabulary: each copy
keeps real text's n-gram statistics, but copies share no n-grams, so the tables grow as with fresh text (a
pessimistic stand-in for the 62,021,632-token val set, which repeats more).

Ranks: under torchrun every rank of the engine keeps its own tables (each commits every chunk, so each sees the
table version of that chunk: C3 holds per rank with no cross-process step), so the per-rank cost is the peak RSS
printed here; the line "ranks:" multiplies it out for 8 ranks and sets it against an 8-GPU H100 node's host memory
(NVIDIA DGX H100: 2 TB; the cloud 8xH100 machines have 1.8-2 TB).

Load: CPU-time tok/s is the steady figure on a shared machine; wall tok/s is printed beside it with the 1-minute
load average before and after each mode.

Quality (`--quality`): mixed NLL and bpb on the sample val shard for every mode with a stand-in model (a bigram
model from the sample *train* shard, interpolated with its unigram). `--swap-roles` streams the train shard with
a stand-in from val: settings such as the smoothing concentration are chosen there, not on validation text.

    .venv/bin/python bench/ngram.py --tokens 62000000
    .venv/bin/python bench/ngram.py --quality [--swap-roles]
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
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.engine.ngram import NgramMixer, SmoothedNgramMixer, TiltMixer, make_mixer  # noqa: E402
from trainer.data.shards import read_shard  # noqa: E402

VOCAB = 1024
MODES = ("exact", "smoothed", "tilt", "hashed-940")


def sample_dir() -> Path:
    env = os.environ.get("PGOLF_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "fineweb_sample"


def speed_stream(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n_tokens of text-like ids and a description of where they come from."""
    rng = np.random.default_rng(seed)
    for path, name in ((sample_dir() / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin",
                        "FineWeb sample val shard"),
                       (REPO / "data" / "embedded" / "embedded_val_000000.bin", "embedded corpus val shard")):
        if path.exists():
            base = read_shard(path)
            out = np.empty(n_tokens, np.uint16)
            for copy, lo in enumerate(range(0, n_tokens, len(base))):
                hi = min(lo + len(base), n_tokens)
                out[lo:hi] = base[: hi - lo] if copy == 0 else rng.permutation(VOCAB).astype(np.uint16)[base[: hi - lo]]
            return out, (f"{name} ({len(base):,} tokens) tiled to {n_tokens:,}, each further copy relabelled by a "
                         "random vocabulary permutation")
    ids = np.minimum(rng.zipf(1.2, n_tokens) - 1, VOCAB - 1).astype(np.uint16)
    return ids, f"Zipf(1.2) synthetic ids, {n_tokens:,} tokens (no FineWeb sample or embedded corpus found)"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> bool:
    """Restart the kernel's RSS high-water mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mode(mode: str, tokens: np.ndarray, chunk: int, mix_batch: int) -> dict[str, float]:
    """Drive one mixer over the stream; counting and mixing timed apart."""
    mixer = make_mixer(mode, VOCAB)
    logits = torch.from_numpy(np.random.default_rng(1).normal(0.0, 2.0, (mix_batch, VOCAB))).float()
    count_wall = count_cpu = mix_wall = 0.0
    mixed = 0
    for start in range(1, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        wall, cpu = time.perf_counter(), cpu_seconds()
        mixer.prepare(tokens, end)
        if mode == "hashed-940":  # its statistics are its target-only scores
            positions = np.arange(start, end)
            mixer.score(positions, tokens, np.full(positions.size, -np.log(VOCAB)), np.full(positions.size, 6.9))
        else:
            positions = np.arange(start, end)  # the statistics every mode reads at its targets
            mixer.counts.context_counts(positions)
            mixer.counts.pair_counts(positions)
        count_wall, count_cpu = count_wall + time.perf_counter() - wall, count_cpu + cpu_seconds() - cpu
        if mode != "hashed-940":
            sample = np.arange(end - min(mix_batch, end - start), end)  # the chunk's last targets: most context
            wall = time.perf_counter()
            mixer.mix(sample, tokens, logits[: sample.size])
            mix_wall += time.perf_counter() - wall
            mixed += sample.size
        wall, cpu = time.perf_counter(), cpu_seconds()
        mixer.commit(tokens, end)
        count_wall, count_cpu = count_wall + time.perf_counter() - wall, count_cpu + cpu_seconds() - cpu
    if mode == "hashed-940":
        tables = mixer.ctx_counts.nbytes + mixer.full_counts.nbytes
    else:
        tables = sum(a.nbytes for runs in mixer.counts.runs for a in (*runs.keys, *runs.values))
    return {"count_wall": count_wall, "count_cpu": count_cpu, "mix_wall": mix_wall, "mixed": mixed,
            "tables": tables}


def speed(args: argparse.Namespace) -> None:
    tokens, description = speed_stream(args.tokens)
    print(f"stream: {description}")
    print(f"chunk: {args.chunk:,} tokens, prepared once, statistics of every target, full-vocabulary vectors for "
          f"the last {args.mix_batch:,} targets of each chunk (stand-in logits), then committed; orders 2-7")
    resettable = reset_peak_rss()
    base_rss = peak_rss_bytes()
    print(f"process before the modes (stream loaded): peak RSS {base_rss / 1e9:.2f} GB"
          + ("" if resettable else " (cannot reset the high-water mark here: peaks are cumulative)"))
    print("| mode | counting M tok/s (CPU) | counting M tok/s (wall) | load avg | mixing vectors/s (wall) "
          "| peak RSS GB | tables GB | compliant |")
    print("|---|---|---|---|---|---|---|---|")
    peaks = {}
    for mode in args.modes:
        gc.collect()
        reset_peak_rss()
        load = os.getloadavg()[0]
        r = run_mode(mode, tokens, args.chunk, args.mix_batch)
        peaks[mode] = peak_rss_bytes()
        n = len(tokens)
        mixing = f"{r['mixed'] / r['mix_wall']:,.0f}" if r["mixed"] else "- (target only)"
        print(f"| {mode} | {n / r['count_cpu'] / 1e6:.2f} | {n / r['count_wall'] / 1e6:.2f} | "
              f"{load:.1f}-{os.getloadavg()[0]:.1f} | {mixing} | {peaks[mode] / 1e9:.2f} | {r['tables'] / 1e9:.2f} | "
              f"{make_mixer(mode, 4).compliant} |", flush=True)
        gc.collect()
    worst = max(peak for mode, peak in peaks.items() if mode != "hashed-940" or len(peaks) == 1)
    print(f"ranks: each rank keeps its own tables; 8 ranks on one machine need 8 x {worst / 1e9:.2f} GB = "
          f"{8 * worst / 1e9:.1f} GB of host memory (peak RSS of the largest compliant mode, stream included), "
          f"{8 * worst / 2e12:.1%} of a DGX H100's 2 TB")


def bigram_stand_in(train: np.ndarray, mass: float = 10.0) -> np.ndarray:
    """(V, V) log p(v | u) of a bigram model interpolated with the add-one unigram."""
    unigram = (np.bincount(train, minlength=VOCAB) + 1.0) / (len(train) + VOCAB)
    pairs = np.zeros((VOCAB, VOCAB))
    np.add.at(pairs, (train[:-1].astype(np.intp), train[1:].astype(np.intp)), 1.0)
    return np.log((pairs + mass * unigram[None, :]) / (pairs.sum(axis=1, keepdims=True) + mass))


def quality(args: argparse.Namespace) -> None:
    from trainer.data.byte_accounting import ByteTables
    from trainer.evaluate import bits_per_byte

    root = sample_dir()
    data = root / "datasets" / "fineweb10B_sp1024"
    if not (data / "fineweb_val_000000.bin").exists():
        print(f"quality needs the FineWeb sample at {root} (set PGOLF_SHARED_DATA)")
        return
    val = read_shard(data / "fineweb_val_000000.bin", vocab_size=VOCAB)
    train = read_shard(data / "fineweb_train_000000.bin", vocab_size=VOCAB)
    if args.swap_roles:  # choose settings here: the train shard is the stream, the stand-in comes from val
        val, train = train, val
    val = val[: args.quality_tokens]
    tables = ByteTables.from_model_file(root / "tokenizers" / "fineweb_1024_bpe.model", VOCAB)
    n_bytes = int(tables.target_bytes(val[:-1], val[1:]).sum())
    logp = torch.from_numpy(bigram_stand_in(train)).float()
    stream = "train shard (roles swapped)" if args.swap_roles else "val"
    print(f"{stream}: {len(val):,} tokens, {n_bytes:,} bytes; stand-in bigram model from the sample "
          f"{'val' if args.swap_roles else 'train'} shard; chunk {args.chunk:,} tokens")

    def report(name: str, mixer: NgramMixer | None) -> None:
        total = 0.0
        for start in range(1, len(val), args.chunk):
            end = min(start + args.chunk, len(val))
            if mixer is not None:
                mixer.prepare(val, end)
            for first in range(start, end, 4096):
                positions = np.arange(first, min(first + 4096, end))
                rows = logp[val[positions - 1].astype(np.int64)]
                targets = torch.from_numpy(val[positions].astype(np.int64))
                if mixer is None:
                    p = torch.softmax(rows.double(), -1).gather(1, targets[:, None])
                else:
                    mixed = mixer.mix(positions, val, rows)
                    p = (mixed.probs.gather(1, targets[:, None]) if mixer.scores_from_vector
                         else mixed.shortcut.clamp_min(1e-12))
                total -= float(p.log().sum())
            if mixer is not None:
                mixer.commit(val, end)
        label = "" if mixer is None or mixer.compliant else "  (NOT a valid score: non-compliant)"
        print(f"{name:>28}: {total / (len(val) - 1):.4f} nats/token, bpb {bits_per_byte(total, n_bytes):.4f}{label}",
              flush=True)

    report("model only", None)
    for mode in MODES:
        report(mode, make_mixer(mode, VOCAB))
    if args.sweep:
        for concentration in (0.5, 1.0, 4.0, 8.0):  # the default is 2
            report(f"smoothed beta={concentration}", SmoothedNgramMixer(VOCAB, concentration=concentration))
        for threshold, base_beta in ((0.3, 2.0), (0.7, 2.0), (0.5, 1.0), (0.5, 3.0)):  # the default is 0.5, 2.0
            report(f"tilt conf>={threshold} beta={base_beta}",
                   TiltMixer(VOCAB, threshold=threshold, base_beta=base_beta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000, help="stream length for the speed run")
    parser.add_argument("--chunk", type=int, default=131_072, help="tokens scored before each commit")
    parser.add_argument("--mix-batch", type=int, default=1024, help="targets per chunk given full vectors")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                        help=f"comma-separated modes for the speed run ({', '.join(MODES)})")
    parser.add_argument("--quality", action="store_true", help="measure mixed bpb on the sample val shard")
    parser.add_argument("--quality-tokens", type=int, default=None, help="only this prefix of the shard")
    parser.add_argument("--swap-roles", action="store_true",
                        help="quality on the train shard with a stand-in from val (for choosing settings)")
    parser.add_argument("--sweep", action="store_true", help="quality: also the smoothing and tilt settings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
