"""One GPU, one command: the figures a CUDA machine must confirm, as one JSON object on stdout.

    bench/gpu_check.sh [--data DIR] [--eval-tokens N] [--train-steps N]     # on a machine with one H100/H200
    bench/gpu_check.sh --dry-run                                            # the same steps, tiny config, CPU

Steps (progress goes to stderr):
1. train: the pr940 preset with torch.compile on, grad accumulation of ``grad_accum_base`` (8) micro-batches
   standing in for the 8 GPUs of the real run: ms/step and tokens/s after the compile (priming) steps, and
   whether the compiled loss equals the eager one on the same batch;
2. logits: bf16 autocast against fp32 (TF32 off) on the same weights and tokens: largest logit and log-prob
   differences, NLL of each, argmax agreement;
3. eval: the trained weights written as a real artifact, then `service.engine.run.evaluate` of a prefix of the stream
   (4 M tokens) with score-first TTT and the engine's n-gram mixing: tokens/s per phase (score, n-gram, TTT
   training) from the chunk events;
4. peak GPU memory of each step.

Data: ``--data DIR`` (official shards and tokenizer.model, e.g. the FineWeb export), else the offline embedded
corpus, built under the work directory (a minute of CPU). The evaluated stream is the first N tokens of the val
split, else of the train split, else the train split repeated (the embedded corpus has 0.68 M train tokens); it
is written as the val shard of a scratch directory and the field "stream" says which it was. The weights come
from a few training steps, so bpb figures are not meaningful; speeds and precision differences are.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.train_step import make_step  # noqa: E402
from service.engine.options import EvalOptions  # noqa: E402
from service.engine.run import evaluate  # noqa: E402
from service.judge import judged  # noqa: E402
from trainer.code_bytes import counted_code_bytes  # noqa: E402
from trainer.config import PRESETS, TrainConfig  # noqa: E402
from trainer.data.byte_accounting import ByteTables  # noqa: E402
from trainer.data.shards import read_shard, shard_paths  # noqa: E402
from trainer.data.writer import write_shard  # noqa: E402
from trainer.export import write_artifact  # noqa: E402
from trainer.model import ModelConfig, autocast_for  # noqa: E402
from trainer.threads import apply_thread_policy  # noqa: E402

# The dry run: every step on a model small enough to compile and run on a laptop CPU in well under a minute.
DRY_RUN_PRESET = replace(
    PRESETS["demo"],
    model=ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2, bigram_buckets=64,
                      bigram_dim=16, xsa_last_n=2, rope_dims=16),
    train_batch_tokens=1024, train_seq_len=128, grad_accum_base=2, compile=True)
DRY_RUN_EVAL = {"seq_len": 128, "stride": 64, "chunk_tokens": 512, "batch_windows": 8}
CAP_SECONDS = 480.0  # bench/gpu_check.sh's cap on a GPU run


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def peak_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(peak)


def check_training(config: TrainConfig, device: torch.device, steps: int) -> tuple[dict, torch.nn.Module]:
    started = time.perf_counter()
    train_step = make_step(config, device, compile_model=config.compile)
    tokens, model = train_step.tokens, train_step.model
    train_step.run()  # compile (and allocator) priming, outside the timer
    train_step.run()
    compile_s = time.perf_counter() - started
    begin = time.perf_counter()
    for _ in range(steps):
        train_step.run()
    ms = (time.perf_counter() - begin) * 1000 / steps
    # The same batch through the compiled graph the steps used (same grad mode, no recompile) and eagerly.
    with autocast_for(device):
        compiled = train_step.forward(*train_step.batch).item()
        eager = model(*train_step.batch).item()
    log(f"train: {ms:.1f} ms/step, {tokens / ms * 1000:,.0f} tokens/s; compiled loss {compiled:.6f} eager {eager:.6f}")
    return {"preset_tokens_per_step": tokens, "grad_accum": config.grad_accum_base, "compile": config.compile,
            "steps_timed": steps, "priming_s": round(compile_s, 2), "ms_per_step": round(ms, 2),
            "tokens_per_s": round(tokens / ms * 1000), "loss_compiled": compiled, "loss_eager": eager,
            "compiled_matches_eager": abs(compiled - eager) <= 2e-3 * max(1.0, abs(eager)),
            "peak_memory_bytes": peak_memory(device)}, model


def check_logits(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, device: torch.device) -> dict:
    rows = max(1, min(4, (len(tokens) - 1) // seq_len))
    block = torch.from_numpy(tokens[: rows * seq_len + 1].astype(np.int64)).to(device)
    x, y = block[:-1].reshape(rows, seq_len), block[1:].reshape(rows, seq_len)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    try:
        model.eval()
        with torch.no_grad():
            fp32 = model.forward_logits(x).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = model.forward_logits(x).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    lp32, lp16 = torch.log_softmax(fp32, -1), torch.log_softmax(bf16, -1)
    nll32 = -lp32.gather(-1, y[..., None]).mean().item()
    nll16 = -lp16.gather(-1, y[..., None]).mean().item()
    result = {"positions": rows * seq_len, "max_abs_logit_diff": (fp32 - bf16).abs().max().item(),
              "mean_abs_logprob_diff": (lp32 - lp16).abs().mean().item(),
              "nll_fp32": nll32, "nll_bf16": nll16, "nll_diff": nll16 - nll32,
              "argmax_agreement": (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item(),
              "peak_memory_bytes": peak_memory(device)}
    log(f"logits: max |Δlogit| {result['max_abs_logit_diff']:.4f}, ΔNLL {result['nll_diff']:+.6f} nats")
    return result


def evaluation_stream(data: Path, tokens: int) -> tuple[np.ndarray, str]:
    """The first ``tokens`` of the val split, else of the train split, else the train split repeated."""
    for split in ("val", "train"):
        stream = np.concatenate([read_shard(p) for p in shard_paths(data, split)])
        if len(stream) >= tokens:
            return stream[:tokens], f"{data} {split} split, first {tokens:,} tokens"
    repeats = -(-tokens // len(stream))
    # Scoring and TTT speed do not depend on the text; n-gram tables of a repeated text stop growing after the
    # first pass, so the n-gram figure of a repeated stream is optimistic.
    return np.tile(stream, repeats)[:tokens], (f"{data} train split ({len(stream):,} tokens) repeated to "
                                               f"{tokens:,} tokens: n-gram speed is optimistic")


def check_eval(model: torch.nn.Module, model_config: ModelConfig, data: Path, work: Path, eval_tokens: int,
               device: torch.device, overrides: dict) -> dict:
    tokenizer = data / "tokenizer.model"
    tables = ByteTables.from_model_file(tokenizer, model_config.vocab_size)
    stream, source = evaluation_stream(data, eval_tokens)
    scratch = work / "eval_data"
    scratch.mkdir(parents=True, exist_ok=True)
    for old in scratch.glob("*.bin"):
        old.unlink()
    write_shard(scratch / "stream_val_000000.bin", stream)
    artifact = work / "gpu_check.pgolf"
    training = {"seed": 0, "steps": 0, "world_size": 1, "device": str(device), "train_time_ms": 0.0,
                "code_version": "gpu_check"}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_artifact(artifact, state, model_config, tables.sha256, tables.vocab_size, training,
                   code_bytes=counted_code_bytes(), level=1)
    defaults = EvalOptions()
    options = replace(defaults, artifact=artifact, data_dir=scratch, tokenizer=tokenizer, device=str(device),
                      ttt=True, ngram=defaults.ngram if defaults.ngram != "off" else "exact", **overrides)
    log(f"eval: {source}, ttt {options.ttt_recipe}, ngram {options.ngram}")
    phases = {"score": 0.0, "ngram": 0.0, "train": 0.0}
    trained = 0
    end: dict = {}
    for event in judged(evaluate(options)):
        if event["type"] == "chunk":
            for name in phases:
                phases[name] += event["phase_seconds"].get(name, 0.0)
            if event["trained_range"]:
                trained += event["trained_range"][1] - event["trained_range"][0]
            log(f"eval: chunk {event['index']} running bpb {event['running_bpb']:.4f} ({event['elapsed_s']:.0f} s)")
        elif event["type"] in ("end", "timeout", "error"):
            end = event
    targets = end.get("targets_scored", 0)
    return {"stream": source, "terminal": end.get("type"),
            "error": end.get("reason"), "targets": targets, "elapsed_s": end.get("elapsed_s"),
            "options": {k: v for k, v in options.to_dict().items() if k not in ("artifact", "data_dir", "tokenizer")},
            "val_bpb": end.get("val_bpb"), "compliant": (end.get("compliance") or {}).get("compliant"),
            "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
            "tokens_per_s": {"score": targets / phases["score"] if phases["score"] else None,
                             "ngram": targets / phases["ngram"] if phases["ngram"] else None,
                             "ttt_train": trained / phases["train"] if phases["train"] else None,
                             "overall": targets / end["elapsed_s"] if end.get("elapsed_s") else None},
            "ttt_trained_targets": trained, "peak_memory_bytes": peak_memory(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny config on CPU: checks the steps themselves")
    parser.add_argument("--data", type=Path, default=None, help="shards + tokenizer.model (default: embedded)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs/gpu_check", help="scratch directory")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps (default 10; dry run 2)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="stream prefix (default 4 M; dry run 3000)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = apply_thread_policy()
    if args.dry_run:
        import torch._inductor.config

        # One compile worker: a pool of them only pays off for graphs much larger than the tiny model's.
        torch._inductor.config.compile_threads = 1
        device, config, overrides = torch.device("cpu"), DRY_RUN_PRESET, DRY_RUN_EVAL
        steps, eval_tokens = args.train_steps or 2, args.eval_tokens or 3000
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run to check the steps on CPU", file=sys.stderr)
            return 2
        device, config, overrides = torch.device("cuda"), PRESETS["pr940"], {}
        steps, eval_tokens = args.train_steps or 10, args.eval_tokens or 4_000_000
        torch.backends.cuda.matmul.allow_tf32 = True  # as training sets it
        torch.backends.cudnn.allow_tf32 = True
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        from trainer.data.embedded import build_embedded

        data = args.work / "embedded"
        if not (data / "tokenizer.model").is_file():
            build_embedded(data, log=log)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dry_run": args.dry_run, "torch": torch.__version__, "threads": threads.describe(),
                    "completed": False}
    # `timeout` (bench/gpu_check.sh) sends SIGTERM at the cap: print what was measured so far, then exit 124.
    signal.signal(signal.SIGTERM, _stop)
    status = 124
    try:
        train, model = check_training(config, device, steps)
        report["train"] = train
        sample = read_shard(shard_paths(data, "val")[0])
        report["logits_bf16_vs_fp32"] = check_logits(model, sample, config.train_seq_len, device)
        # The engine's own budget stops the evaluation cleanly (a timeout event keeps per-phase figures) before
        # the script's cap would kill it.
        budget = (EvalOptions().max_seconds if args.dry_run
                  else max(30.0, CAP_SECONDS - (time.perf_counter() - started) - 45.0))
        report["eval"] = check_eval(model, config.model, data, args.work, eval_tokens, device,
                                    {**overrides, "max_seconds": budget})
        report["completed"] = True
        ok = train["compiled_matches_eager"] and report["eval"]["terminal"] == "end"
        status = 0 if ok else 1
    except _Stopped:
        log("stopped at the time cap; the report holds the steps that finished")
    finally:
        peaks = [section.get("peak_memory_bytes") for section in report.values() if isinstance(section, dict)]
        report["peak_memory_bytes"] = max((v for v in peaks if v is not None), default=None)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=2), flush=True)
    return status


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


if __name__ == "__main__":
    sys.exit(main())
