"""Training-step speed on CPU by intra-op thread count, idle and beside a competing process; pr940 on a GPU.

    .venv/bin/python bench/train_step.py [--preset demo] [--steps 3] [--rounds 3]

CPU: real optimiser steps (Muon + AdamW, grad clipping; no EMA) of the preset on random tokens, after one
untimed priming step per cell, for 1 thread, 2 threads and the default of trainer/threads.py, first alone and
then while a second process keeps one core busy (a one-thread matmul loop, the way another job or a second rank
would). The cells are measured in interleaved rounds and each figure is the median of its rounds, so a shared,
noisy machine biases no cell in particular; compare the ratios, not the absolute times.

GPU (when CUDA is present): the pr940 preset with torch.compile as training uses it. bench/gpu_check.sh covers
the rest of a GPU run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import PRESETS, TrainConfig  # noqa: E402
from trainer.model import GPT, autocast_for  # noqa: E402
from trainer.threads import choose_threads  # noqa: E402
from trainer.train import build_optimizers  # noqa: E402

# One busy core; it stops by itself when the bench process is gone (killed before its cleanup ran).
COMPETITOR = ("import os, torch\ntorch.set_num_threads(1)\nparent = os.getppid()\na = torch.randn(384, 384)\n"
              "while os.getppid() == parent:\n    a = torch.tanh(a @ a)\n")


@dataclass
class TrainStep:
    run: Callable[[], None]  # one optimiser step (grad accumulation as configured)
    tokens: int  # tokens per step
    model: GPT  # the eager module
    forward: Callable[..., torch.Tensor]  # what the step calls: the model, or its torch.compile wrapper
    batch: tuple[torch.Tensor, torch.Tensor]  # the (inputs, targets) of every micro-step


def make_step(config: TrainConfig, device: torch.device, *, compile_model: bool) -> TrainStep:
    """Real optimiser steps of ``config`` on one fixed random batch (the data loader is not what is measured)."""
    torch.manual_seed(0)
    model = GPT(config.model).to(device)
    optimizers = build_optimizers(model, config)
    grad_accum = config.grad_accum_base
    rows = config.train_batch_tokens // grad_accum // config.train_seq_len
    forward = torch.compile(model, dynamic=False) if compile_model else model
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return TrainStep(step, config.train_batch_tokens, model, forward, (x, y))


def time_steps(step: Callable[[], None], steps: int) -> float:
    """ms per step over ``steps`` steps after one priming step."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) * 1000 / steps


def thread_sweep(preset: str, steps: int, rounds: int) -> None:
    default = choose_threads()
    counts = sorted({1, 2, default.threads})
    train_step = make_step(PRESETS[preset], torch.device("cpu"), compile_model=False)
    step, tokens = train_step.run, train_step.tokens
    print(f"{preset} on cpu: {tokens:,} tokens/step; default {default.describe()}; "
          f"{len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, int], list[float]] = {}
    for load in ("alone", "competing"):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if load == "competing" else None
        try:
            if competitor is not None:
                time.sleep(1.0)  # let it start spinning
            for _ in range(rounds):
                for threads in counts:
                    torch.set_num_threads(threads)
                    results.setdefault((load, threads), []).append(time_steps(step, steps))
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    base = statistics.median(results[("alone", 1)])
    print(f"{'load':<10} {'threads':>12} {'ms/step':>9} {'tokens/s':>9} {'vs alone, 1 thread':>18}")
    for (load, threads), values in results.items():
        ms = statistics.median(values)
        label = f"{threads}{' (default)' if threads == default.threads else ''}"
        print(f"{load:<10} {label:>12} {ms:>9.0f} {tokens / ms * 1000:>9,.0f} {base / ms:>17.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="preset of the CPU sweep")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell reports the median")
    args = parser.parse_args()
    thread_sweep(args.preset, args.steps, args.rounds)
    if torch.cuda.is_available():
        gpu_step = make_step(PRESETS["pr940"], torch.device("cuda"), compile_model=PRESETS["pr940"].compile)
        ms = time_steps(gpu_step.run, args.steps)
        print(f"pr940 on {torch.cuda.get_device_name()}: {ms:.1f} ms/step, {gpu_step.tokens / ms * 1000:,.0f} tokens/s "
              f"(grad accumulation {PRESETS['pr940'].grad_accum_base} standing in for 8 GPUs)")
    else:
        print("pr940: no GPU here; bench/gpu_check.sh runs the GPU figures on a CUDA machine")


if __name__ == "__main__":
    main()
