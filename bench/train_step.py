"""Training-step speed: ms/step and tokens/s for the `demo` preset on CPU, and `pr940` on a GPU if present.

    .venv/bin/python bench/train_step.py [--steps 10] [--preset demo|pr940]

Runs real optimiser steps (Muon + AdamW, grad clipping, EMA excluded) on random tokens with the preset's batch
shape, after two untimed priming steps. The upstream reference runs pr940 at 93.7 ms/step on 8×H100 (786,432
tokens/step); one GPU here does 1/8 of that batch per micro-step, 8 micro-steps per step.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.config import PRESETS
from trainer.model import GPT, autocast_for
from trainer.train import build_optimizers


def bench(preset: str, steps: int, device: torch.device) -> None:
    config = PRESETS[preset]
    model = GPT(config.model).to(device)
    optimizers = build_optimizers(model, config)
    grad_accum = config.grad_accum_base
    micro_tokens = config.train_batch_tokens // grad_accum
    rows = micro_tokens // config.train_seq_len
    forward = torch.compile(model) if device.type == "cuda" and config.compile else model
    x = torch.randint(0, config.model.vocab_size, (rows, config.train_seq_len), device=device)
    y = torch.randint(0, config.model.vocab_size, (rows, config.train_seq_len), device=device)

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for _ in range(grad_accum):
            with autocast_for(device):
                loss = forward(x, y)
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        for opt in optimizers:
            opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / steps
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset} on {device} ({torch.get_num_threads()} threads): params {params:,} "
          f"batch {config.train_batch_tokens:,} tok/step ({grad_accum} micro-steps of {rows}x{config.train_seq_len}) "
          f"-> {ms:.1f} ms/step, {config.train_batch_tokens / ms * 1000:,.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    args = parser.parse_args()
    bench(args.preset or "demo", args.steps, torch.device("cpu"))
    if torch.cuda.is_available():
        bench(args.preset or "pr940", args.steps, torch.device("cuda"))
    else:
        print("pr940: no GPU here; run this script on a CUDA machine for the GPU figure")


if __name__ == "__main__":
    main()
