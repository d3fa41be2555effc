"""The cost model of a real run, on paper (docs/performance.md): FLOPs per token and the 600 s evaluation budget.

    .venv/bin/python bench/cost_model.py [--measure] [--count-tok-s R] [--mix-tok-s R] [--mfu-score M] [--mfu-ttt M]

1. FLOPs per token of a ModelConfig, derived layer by layer (``flops_per_token``) and checked against torch's
   own counter (FlopCounterMode) on the meta device, so the derivation cannot drift from the model.
2. The phases of a full-validation evaluation (sliding scoring at the stride, score-first TTT epochs, n-gram
   counting and mixing) for the engine's defaults, and their time on 8×H100 at the stated MFUs and measured CPU
   rates. Nothing runs on a GPU; the MFUs default to the figures the upstream logs imply (docs/performance.md).
3. ``--measure``: the CPU rates, by CPU time on one thread, with the engine's own "exact" mixer on the FineWeb
   sample val shard (else the embedded one, else Zipf ids): counting (prepare + commit of 131,072-token chunks),
   the CPU part of full-vocabulary mixing (gathering every width's continuation counts: what stays on the CPU
   when the scoring device is a GPU) and the whole mixing on the CPU (what a CPU-only run pays).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.options import RECIPES  # noqa: E402
from service.engine.windows import plan_chunks, plan_windows  # noqa: E402
from trainer.limits import EVAL_LIMIT_SECONDS  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402

H100_BF16_DENSE_FLOPS = 989.4e12  # H100 SXM, dense bf16 tensor-core peak
VAL_TOKENS = 62_021_632  # the official sp1024 val export (reference-stack, known bug 10)
GPUS = 8


@dataclass(frozen=True)
class TokenFlops:
    """Matmul FLOPs per token (2 per multiply-add); elementwise work (norms, RoPE, gates) is not counted."""

    dense: float  # every linear layer, the tied head included
    attention: float  # QKᵀ and AV
    frozen_dense: float  # the dense FLOPs of the blocks TTT freezes (their weight gradients are skipped)

    @property
    def forward(self) -> float:
        return self.dense + self.attention

    @property
    def train(self) -> float:
        """Forward + backward: the backward pass costs twice the forward (input and weight gradients)."""
        return 3 * self.forward

    def ttt(self) -> float:
        """Forward + backward with frozen blocks: gradients still flow through them, only their weights' are
        skipped (the embedding, tied with the head, is trained and sits below the frozen blocks)."""
        return self.train - self.frozen_dense


def flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True, frozen_blocks: int = 0) -> TokenFlops:
    """``causal`` counts the attention a causal kernel computes (mean context (T+1)/2); False counts the full
    T×T square, as a plain matmul implementation (and torch's FLOP counter) does."""
    d, v = config.model_dim, config.vocab_size
    head_dim = d // config.num_heads
    kv = config.num_kv_heads * head_dim
    hidden = config.mlp_mult * d
    layer = d * d + 2 * d * kv + d * d + 2 * d * hidden + (d * config.num_heads if config.gated_attention else 0)
    bigram = config.bigram_dim * d if config.bigram_buckets and config.bigram_dim != d else 0
    macs = config.num_layers * layer + bigram + d * v
    context = (seq_len + 1) / 2 if causal else seq_len
    attention = config.num_layers * 2 * d * context  # QKᵀ (H·head_dim = d per key) and AV
    return TokenFlops(dense=2 * macs, attention=2 * attention, frozen_dense=2 * frozen_blocks * layer)


def counted_flops_per_token(config: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token by torch's FlopCounterMode, on the meta device (no memory, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as forward:
        loss = model(ids, ids)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops() / seq_len, backward.get_total_flops() / seq_len


@dataclass(frozen=True)
class Phase:
    name: str
    work: str
    seconds: float


def evaluation_phases(config: ModelConfig, *, tokens: int = VAL_TOKENS, seq_len: int = 2048, stride: int = 64,
                      chunk_tokens: int = 131_072, recipe: str = "pr940", gpus: int = GPUS,
                      mfu_score: float, mfu_ttt: float, count_tok_s: float, mix_tok_s: float,
                      fixed_s: float) -> list[Phase]:
    windows = plan_windows(tokens, seq_len, stride)
    chunks = plan_chunks(windows, chunk_tokens)
    ttt = RECIPES[recipe]
    flops = flops_per_token(config, seq_len, frozen_blocks=ttt.freeze_blocks)
    peak = gpus * H100_BF16_DENSE_FLOPS
    window_tokens = int((windows.ends - windows.starts).sum())
    score_flops = window_tokens * flops.forward
    trained = tokens - 1 - chunks[-1].num_targets  # every chunk but the last is trained on
    ttt_flops = ttt.epochs * trained * flops.ttt()
    return [
        Phase("sliding scoring", f"{len(windows):,} windows × {seq_len} tokens × {flops.forward / 1e6:.1f} MFLOP "
                                 f"= {score_flops:.3g} FLOP at MFU {mfu_score:.0%}", score_flops / (peak * mfu_score)),
        Phase("TTT training", f"{ttt.epochs} epochs × {trained:,} tokens × {flops.ttt() / 1e6:.1f} MFLOP "
                              f"= {ttt_flops:.3g} FLOP at MFU {mfu_ttt:.0%}", ttt_flops / (peak * mfu_ttt)),
        Phase("n-gram counting", f"every rank counts all {tokens:,} tokens at {count_tok_s:,.0f} tok/s (CPU)",
              tokens / count_tok_s),
        Phase("n-gram mixing", f"each rank gathers the counts of its {tokens // gpus:,} positions at "
                               f"{mix_tok_s:,.0f} pos/s (CPU); the 1,024-wide mixing runs on the GPU",
              tokens / gpus / mix_tok_s),
        Phase("fixed", "process start, CUDA init, artifact and val load", fixed_s),
    ]


def measure_cpu_rates(chunk: int = 131_072, chunks: int = 3, sample: int = 4096) -> dict[str, float]:
    """tokens/s of counting and positions/s of count gathering and of full mixing, by CPU time."""
    import time

    import numpy as np
    import torch

    from service.engine.ngram import make_mixer
    from trainer.data.shards import read_shard, shard_paths

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[2] / "shared/data/fineweb_sample/datasets/fineweb10B_sp1024"
    try:
        tokens = read_shard(shard_paths(root, "val")[0]).astype(np.int64)
    except (FileNotFoundError, OSError):  # no sample beside the project: Zipf ids keep the tables realistic-ish
        tokens = np.minimum(np.random.default_rng(0).zipf(1.2, chunk * (chunks + 1)), 1023).astype(np.int64)
    mixer = make_mixer("exact", 1024)
    started = time.process_time()
    for lo in range(0, chunk * chunks, chunk):
        mixer.prepare(tokens, lo + chunk)
        mixer.commit(tokens, lo + chunk)
    counting = chunk * chunks / (time.process_time() - started)
    end = chunk * (chunks + 1)
    head, positions = tokens[:end], np.arange(chunk * chunks + 1, chunk * chunks + 1 + sample)
    mixer.prepare(tokens, end)
    logprobs = torch.log_softmax(torch.randn(sample, 1024), dim=-1)
    started = time.process_time()
    context = mixer.counts.context_counts(positions)
    for width in range(1, mixer.widths + 1):
        seen = positions[context[width - 1] > 0]
        for lo in range(0, seen.size, 1024):
            mixer.counts.rows(width, seen[lo : lo + 1024])
    gathering = sample / (time.process_time() - started)
    started = time.process_time()
    for lo in range(0, sample, 1024):
        mixer.mix(positions[lo : lo + 1024], head, logprobs[lo : lo + 1024])
    mixing = sample / (time.process_time() - started)
    return {"counting_tok_s": counting, "gathering_pos_s": gathering, "cpu_mixing_pos_s": mixing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu-score", type=float, default=0.12, help="eager sliding scoring (compiled: ~0.23)")
    parser.add_argument("--mfu-ttt", type=float, default=0.069, help="TTT training (upstream #761 implies 0.069)")
    parser.add_argument("--count-tok-s", type=float, default=1.13e6,
                        help="n-gram counting, tokens/s per rank (bench/ngram.py at 62 M tokens, CPU time)")
    parser.add_argument("--mix-tok-s", type=float, default=8.36e4,
                        help="CPU part of full-vocabulary mixing per rank, positions/s (arithmetic on the GPU)")
    parser.add_argument("--measure", action="store_true", help="measure the two CPU rates here and use them")
    parser.add_argument("--fixed-s", type=float, default=15.0, help="start-up and loading")
    args = parser.parse_args()
    if args.measure:
        rates = measure_cpu_rates()
        print(f"measured (CPU time, 1 thread): counting {rates['counting_tok_s']:,.0f} tok/s; count gathering "
              f"{rates['gathering_pos_s']:,.0f} pos/s; whole full-vocabulary mixing on the CPU "
              f"{rates['cpu_mixing_pos_s']:,.0f} pos/s")
        args.count_tok_s, args.mix_tok_s = rates["counting_tok_s"], rates["gathering_pos_s"]
    config = ModelConfig()
    flops = flops_per_token(config, 2048)
    full = flops_per_token(config, 2048, causal=False)
    counted_forward, counted_backward = counted_flops_per_token(config, 2048)
    print(f"pr940 at seq 2048, FLOPs per token: dense {flops.dense / 1e6:.2f} M, "
          f"attention {flops.attention / 1e6:.2f} M"
          f" causal ({full.attention / 1e6:.2f} M as a full square)")
    print(f"  forward {flops.forward / 1e6:.2f} M, forward+backward {flops.train / 1e6:.2f} M; torch's counter "
          f"(full square): forward {counted_forward / 1e6:.2f} M (derived {full.forward / 1e6:.2f} M), backward "
          f"{counted_backward / 1e6:.2f} M (derived {2 * full.forward / 1e6:.2f} M)")
    phases = evaluation_phases(config, mfu_score=args.mfu_score, mfu_ttt=args.mfu_ttt, count_tok_s=args.count_tok_s,
                               mix_tok_s=args.mix_tok_s, fixed_s=args.fixed_s)
    print(f"full-val evaluation on {GPUS}×H100 (peak {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s bf16 each):")
    for phase in phases:
        print(f"  {phase.name:<16} {phase.seconds:7.1f} s   {phase.work}")
    total = sum(p.seconds for p in phases)
    print(f"  {'total':<16} {total:7.1f} s of the {EVAL_LIMIT_SECONDS:g} s budget "
          f"({'fits' if total <= EVAL_LIMIT_SECONDS else 'DOES NOT FIT'})")


if __name__ == "__main__":
    main()
