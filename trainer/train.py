"""The training loop: one process or torchrun DDP on one or many nodes, a synchronised 600 s cap, EMA, export.

Order of events (reference §5): build the model and optimisers; run ``warmup_steps`` priming steps (compile,
allocator) and roll model, optimisers and data back so they leave no trace; start the timer; train with the
wall-clock warmdown, pausing the timer around validation; stop when the next step would cross the cap (warmdown
and stop read the training time all ranks agree on, the largest of their clocks); apply the EMA weights; export the
artifact through the fit-to-budget ladder; evaluate the dequantised round trip. Global rank 0 alone writes
``train.log`` (reference line formats), ``summary.json`` (machine-readable) and the artifact into the output
directory, on its own node (docs/training.md).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.artifact import load_model
from trainer.code_bytes import counted_code_bytes
from trainer.config import TrainConfig, to_dict
from trainer.data.byte_accounting import ByteTables
from trainer.data.loader import DistributedTokenLoader
from trainer.data.shards import load_validation_tokens
from trainer.evaluate import ValResult, evaluate_non_overlapping, whole_sequences
from trainer.export import export_to_budget
from trainer.limits import SUBMISSION_LIMIT_BYTES, TRAIN_LIMIT_MS
from trainer.model import GPT, autocast_for
from trainer.muon import Muon
from trainer.threads import apply_thread_policy

try:
    __version__ = version("pgolf")  # pyproject.toml's: the one copy of the version
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+source"


@dataclass(frozen=True)
class Runtime:
    """Where this process sits: global ``rank`` of ``world_size`` (data shards, collectives, who writes), and on
    its node ``local_rank`` of ``local_world_size`` (which GPU) on node ``node_rank`` of ``nodes``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    node_rank: int = 0
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not set: launch with torchrun, "
                               "which sets RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and GROUP_RANK for every process")
        return default
    return int(raw)


def init_runtime() -> Runtime:
    """Single process, or one process of a torchrun launch on one or many nodes: NCCL on CUDA, gloo on CPU.

    Global RANK decides everything shared (data span, Muon's parameter owner, who writes); the GPU is chosen by
    LOCAL_RANK, since RANK runs past a node's device count from the second node on.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
        local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
        node_rank, nodes = _env_int("GROUP_RANK", 0), _env_int("GROUP_WORLD_SIZE", 1)
    else:
        rank, local_rank, local_world_size, node_rank, nodes = 0, 0, 1, 0, 1
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                               "--nproc-per-node must not exceed the node's GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, device, local_world_size, node_rank, nodes)


class RunLog:
    """Rank 0 prints each line and appends it to train.log; other ranks stay silent."""

    def __init__(self, path: Path | None) -> None:
        self.file = path.open("w", encoding="utf-8") if path else None

    def __call__(self, line: str) -> None:
        if self.file is None:
            return
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# Names of the small learned gains, mixes and gates. Upstream routes them to the scalar AdamW group even when
# they are 2-D (resid_mix is 2×d, attn_gate.weight is heads×d) and keeps them fp32; matching is by substring.
CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weights",
    "smear",
    "vr_lambda",
    "attn_gate",
)


def parameter_groups(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """Split parameters as the non-banked PR #287/#761 code does (reference §5.1).

    matrix: 2-D block matrices (Q, K, V, out, MLP up/down) and the BigramHash projection → Muon.
    embed:  tok_emb and the BigramHash table → AdamW "tok" group.
    scalar: everything else (gains, mixes, q_gain, vr_lambda, attention gate, skips, smear, bigram scale).
    The matrix order is deterministic (blocks in order, then bigram.proj) because distributed Muon assigns
    parameter i to rank i % world_size.
    """
    matrix: list[torch.nn.Parameter] = []
    scalar: list[torch.nn.Parameter] = []
    for name, p in model.blocks.named_parameters():
        is_control = any(pattern in name for pattern in CONTROL_TENSOR_NAME_PATTERNS)
        (matrix if p.ndim == 2 and not is_control else scalar).append(p)
    embed: list[torch.nn.Parameter] = [model.tok_emb.weight]
    if model.bigram is not None:
        embed.append(model.bigram.embed.weight)
        if model.bigram.proj is not None:
            matrix.append(model.bigram.proj.weight)
        scalar.append(model.bigram.scale)
    if model.skip_weights is not None:
        scalar.append(model.skip_weights)
    if model.smear is not None:
        scalar.append(model.smear.gate)
    return {"matrix": matrix, "embed": embed, "scalar": scalar}


def build_optimizers(model: GPT, config: TrainConfig) -> list[torch.optim.Optimizer]:
    groups = parameter_groups(model)
    # bf16 Newton–Schulz as the reference on GPUs; CPUs without bf16 matrix units run it ~5× slower than fp32.
    on_gpu = next(model.parameters()).device.type == "cuda"
    adam = dict(betas=(config.beta1, config.beta2), eps=config.adam_eps, weight_decay=config.adam_wd)
    optimizers: list[torch.optim.Optimizer] = [
        Muon(groups["matrix"], lr=config.matrix_lr, momentum=config.muon_momentum, nesterov=True,
             weight_decay=config.muon_wd, backend_steps=config.muon_backend_steps,
             backend_dtype=torch.bfloat16 if on_gpu else torch.float32),
        torch.optim.AdamW(groups["embed"], lr=config.tied_embed_lr, **adam),
        torch.optim.AdamW(groups["scalar"], lr=config.scalar_lr, **adam),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(config: TrainConfig, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to zero: over the last warmdown_iters × mean step time before the cap, else by steps."""
    if config.warmdown_iters <= 0:
        return 1.0
    if config.max_wallclock_seconds <= 0:
        start = config.iterations - config.warmdown_iters
        return 1.0 if step < start else max(0.0, (config.iterations - step) / config.warmdown_iters)
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = config.warmdown_iters * step_ms
    remaining_ms = max(config.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
    return remaining_ms / warmdown_ms if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(config: TrainConfig, step: int) -> float:
    frac = min(step / config.muon_momentum_warmup_steps, 1.0) if config.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * config.muon_momentum_warmup_start + frac * config.muon_momentum


class EMA:
    """fp32 shadow of every parameter and buffer, updated after every optimiser step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict_like(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: self.shadow[k].to(v.dtype) for k, v in model.state_dict().items()}


class Timer:
    """Accumulates training time only; paused around validation. Synchronises CUDA before reading the clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.accumulated_ms = 0.0
        self.started: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.started = self._now()

    def pause(self) -> None:
        if self.started is not None:
            self.accumulated_ms += (self._now() - self.started) * 1000.0
            self.started = None

    def elapsed_ms(self) -> float:
        running = (self._now() - self.started) * 1000.0 if self.started is not None else 0.0
        return self.accumulated_ms + running


def _agreed_max(runtime: Runtime, *values: float) -> list[float]:
    """The largest of each value over all ranks: one tiny all_reduce, the same numbers on every rank."""
    if not runtime.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _announce_nodes(runtime: Runtime, out_dir: Path, log: RunLog) -> None:
    """Say which host holds global rank 0, the only writer: with c10d rendezvous it need not be --node-rank 0."""
    hosts: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    log(f"distributed: nodes:{runtime.nodes} local_world_size:{runtime.local_world_size} "
        f"backend:{dist.get_backend()} rank0_host:{hosts[0]}")
    if runtime.local_rank == 0 and not runtime.is_main:
        print(f"node {runtime.node_rank} ({hosts[runtime.rank]}): global rank 0 runs on {hosts[0]} and alone writes "
              f"train.log, summary.json and model.pgolf, to {out_dir} there", flush=True)


def train(config: TrainConfig, data_dir: Path, tokenizer: Path, out_dir: Path,
          runtime: Runtime | None = None) -> dict:
    """Train, export and round-trip one model. Returns the summary (also written to summary.json on rank 0)."""
    threads = apply_thread_policy()  # before any torch work; under torchrun, LOCAL_WORLD_SIZE shares the cores
    runtime = runtime or init_runtime()
    if config.grad_accum_base % runtime.world_size:
        raise ValueError(f"world size {runtime.world_size} must divide grad_accum_base {config.grad_accum_base} "
                         f"(micro-steps per rank = grad_accum_base // world size, upstream's 8 // WORLD_SIZE); "
                         f"with more processes set GRAD_ACCUM_BASE to a multiple of {runtime.world_size}")
    grad_accum = config.grad_accum_base // runtime.world_size
    out_dir = Path(out_dir)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "train.log" if runtime.is_main else None)
    device = runtime.device
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    tables = ByteTables.from_model_file(tokenizer, config.model.vocab_size)
    if tables.vocab_size != config.model.vocab_size:
        raise ValueError(f"tokenizer has {tables.vocab_size} pieces but the model's vocab_size is "
                         f"{config.model.vocab_size}")
    val_tokens = whole_sequences(load_validation_tokens(data_dir, config.model.vocab_size), config.train_seq_len)
    log(f"pgolf {__version__} python {platform.python_version()} torch {torch.__version__} device {device}")
    log(threads.describe())
    log(f"config {json.dumps(to_dict(config), sort_keys=True)}")
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={tokenizer}")
    log(f"val_loader:shards pattern={data_dir}/*_val_*.bin tokens:{len(val_tokens)}")

    base_model = GPT(config.model).to(device)
    log(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    log(f"world_size:{runtime.world_size} grad_accum_steps:{grad_accum}")
    if runtime.distributed:
        _announce_nodes(runtime, out_dir, log)
    log(f"attention_mode:gqa num_heads:{config.model.num_heads} num_kv_heads:{config.model.num_kv_heads}")
    log(f"tie_embeddings:True embed_lr:{config.tied_embed_lr} "
        f"matrix_lr:{config.matrix_lr} scalar_lr:{config.scalar_lr}")
    log(f"train_batch_tokens:{config.train_batch_tokens} train_seq_len:{config.train_seq_len} "
        f"iterations:{config.iterations} warmup_steps:{config.warmup_steps} "
        f"max_wallclock_seconds:{config.max_wallclock_seconds:.3f}")
    log(f"seed:{config.seed}")

    forward_model: torch.nn.Module = base_model
    if device.type == "cuda" and config.compile:
        forward_model = torch.compile(base_model, dynamic=False)
    if runtime.distributed:
        # static_graph: layer 0's upstream vr_lambda pair is never used, so it never receives a gradient.
        forward_model = DistributedDataParallel(forward_model, broadcast_buffers=False, static_graph=True,
                                                device_ids=[runtime.local_rank] if device.type == "cuda" else None)
    optimizers = build_optimizers(base_model, config)

    def new_loader() -> DistributedTokenLoader:
        return DistributedTokenLoader(data_dir, runtime.rank, runtime.world_size, config.model.vocab_size)

    def train_step(loader: DistributedTokenLoader) -> float:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(grad_accum):
            x, y = loader.next_batch(config.train_batch_tokens, config.train_seq_len, grad_accum)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == grad_accum - 1
            context = forward_model.no_sync() if runtime.distributed and not sync else nullcontext()
            with context, autocast_for(device):
                loss = forward_model(x, y)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        if runtime.distributed:  # log the global mean loss, not rank 0's share of the batch
            t = torch.tensor([total], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total = t.item() / runtime.world_size
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), config.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        return total

    # Priming steps on real batches, then roll everything back: they only warm up compilation and allocators.
    if config.warmup_steps > 0:
        initial_model = copy.deepcopy(base_model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        loader = new_loader()
        for i in range(config.warmup_steps):
            train_step(loader)
            log(f"warmup_step:{i + 1}/{config.warmup_steps}")
        base_model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts, strict=True):
            opt.load_state_dict(state)
        del initial_model, initial_opts
    loader = new_loader()
    ema = EMA(base_model, config.ema_decay) if config.ema_decay > 0 else None

    def validate() -> ValResult:
        return evaluate_non_overlapping(base_model, val_tokens, tables, config.train_seq_len,
                                        config.val_batch_tokens, device, runtime.rank, runtime.world_size)

    cap_ms = config.max_wallclock_seconds * 1000.0
    timer = Timer(device)
    progress = _progress_bar(runtime, config)
    step, stop_reason, last_loss = 0, "iterations", float("nan")
    step_times: list[float] = []
    loss_curve: list[tuple[int, float]] = []
    # Training time as every rank agrees it: the largest of the ranks' own clocks. Under a cap, the wall-clock
    # warmdown and the stop decision read this one number, so all ranks use the same learning rate (Muon and AdamW
    # keep the replicas bit-identical only then) and leave the loop after the same step (a rank that stopped alone
    # would leave the others waiting in a collective).
    elapsed = 0.0
    timer.start()
    while True:
        last_step = step >= config.iterations or stop_reason == "wallclock_cap"
        if last_step or (config.val_loss_every > 0 and step % config.val_loss_every == 0) or step == 0:
            timer.pause()
            if last_step:
                (elapsed,) = _agreed_max(runtime, timer.elapsed_ms())
            val = validate()
            log(f"step:{step}/{config.iterations} val_loss:{val.loss:.4f} val_bpb:{val.bpb:.4f} "
                f"train_time:{elapsed:.0f}ms step_avg:{elapsed / max(step, 1):.2f}ms")
            if last_step:
                break
            timer.start()
        multiplier = lr_multiplier(config, step, elapsed)
        momentum = muon_momentum(config, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * multiplier
                if isinstance(opt, Muon):
                    group["momentum"] = momentum
        before = timer.elapsed_ms()
        last_loss = train_step(loader)
        if ema is not None:
            ema.update(base_model)
        step += 1
        own = timer.elapsed_ms()
        step_times.append(own - before)
        if cap_ms > 0:
            # Stop *before* the step that would cross the cap: the next step is predicted from the slowest of the
            # recent ones, so an honest run ends under the limit instead of overshooting it by one step.
            elapsed, predicted_end = _agreed_max(runtime, own, own + max(step_times[-5:]))
            if predicted_end > cap_ms:
                stop_reason = "wallclock_cap"
        else:
            elapsed = own  # nothing depends on the time: no collective per step
        loss_curve.append((step, last_loss))
        if step <= 10 or step % config.train_log_every == 0:
            log(f"step:{step}/{config.iterations} train_loss:{last_loss:.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms")
        if progress is not None:
            tokens_per_s = config.train_batch_tokens * step / max(elapsed / 1000.0, 1e-9)
            left = f"{max(cap_ms - elapsed, 0) / 1000:.0f}s" if cap_ms > 0 else "-"
            progress.update(1)
            progress.set_postfix_str(f"loss {last_loss:.3f} tok/s {tokens_per_s:,.0f} left {left}")
    if progress is not None:
        progress.close()
    train_time_ms = elapsed
    if stop_reason == "wallclock_cap":
        log(f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{step}/{config.iterations}")
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    if ema is not None:
        log("ema:applying EMA weights")
        base_model.load_state_dict(ema.state_dict_like(base_model))
        t0 = time.perf_counter()
        post = validate()
        log(f"DIAGNOSTIC post_ema val_loss:{post.loss:.4f} val_bpb:{post.bpb:.4f} "
            f"eval_time:{(time.perf_counter() - t0) * 1000:.0f}ms")
    else:
        post = val

    summary: dict = {}
    if runtime.is_main:
        summary = _export_and_roundtrip(config, runtime, base_model, tables, val_tokens, out_dir, log,
                                        step=step, stop_reason=stop_reason, train_time_ms=train_time_ms,
                                        final_val=post, loss_curve=loss_curve)
    if runtime.distributed:
        dist.barrier()
    log.close()
    return summary


def _export_and_roundtrip(config: TrainConfig, runtime: Runtime, model: GPT, tables: ByteTables,
                          val_tokens: np.ndarray, out_dir: Path, log: RunLog, *, step: int, stop_reason: str,
                          train_time_ms: float, final_val: ValResult, loss_curve: list[tuple[int, float]]) -> dict:
    code = counted_code_bytes()
    training = {
        "seed": config.seed, "steps": step, "world_size": runtime.world_size, "device": _device_name(runtime),
        "train_time_ms": round(train_time_ms, 3), "code_version": __version__,
        "stop_reason": stop_reason, "train_seq_len": config.train_seq_len, "export_scheme": config.export_scheme,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    artifact_path = out_dir / "model.pgolf"
    result = export_to_budget(artifact_path, state, config.model, tables.sha256, tables.vocab_size, training,
                              code_bytes=code, log=log, scheme=config.export_scheme)
    t0 = time.perf_counter()
    roundtrip_model, artifact = load_model(artifact_path, runtime.device)
    rt = evaluate_non_overlapping(roundtrip_model, val_tokens, tables, config.train_seq_len,
                                  config.val_batch_tokens, runtime.device)
    eval_ms = (time.perf_counter() - t0) * 1000
    log(f"final_int6_roundtrip val_loss:{rt.loss:.4f} val_bpb:{rt.bpb:.4f} eval_time:{eval_ms:.0f}ms")
    log(f"final_int6_roundtrip_exact val_loss:{rt.loss:.8f} val_bpb:{rt.bpb:.8f}")
    summary = {
        "format": "pgolf-train-summary/1",
        "code_version": __version__,
        "config": to_dict(config),
        "world_size": runtime.world_size,
        "nodes": runtime.nodes,
        "device": _device_name(runtime),
        "steps": step,
        "stop_reason": stop_reason,
        "train_time_ms": round(train_time_ms, 3),
        "train_time_limit_ms": TRAIN_LIMIT_MS,
        "within_train_time_limit": train_time_ms <= TRAIN_LIMIT_MS,
        "loss_curve": [[s, loss] for s, loss in loss_curve],
        "final_val": {"val_loss": final_val.loss, "val_bpb": final_val.bpb, "tokens": final_val.tokens,
                      "bytes": final_val.bytes},
        "roundtrip": {"val_loss": rt.loss, "val_bpb": rt.bpb, "eval_time_ms": round(eval_ms, 3)},
        "artifact": {
            "path": artifact_path.name, "bytes": result.artifact_nbytes, "sha256": artifact.file_sha256,
            "code_bytes": result.code_nbytes, "code_files": code.files, "total_bytes": result.total_nbytes,
            "limit_bytes": SUBMISSION_LIMIT_BYTES, "within_size_limit": result.total_nbytes <= SUBMISSION_LIMIT_BYTES,
            "quantization": {"label": result.winner.label, "zstd_level": result.winner.level,
                             "int5_blocks": list(result.winner.int5_blocks)},
        },
        "tokenizer_sha256": tables.sha256,
        "log": "train.log",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["within_train_time_limit"]:
        log(f"LIMIT EXCEEDED: training took {train_time_ms:.0f}ms > {TRAIN_LIMIT_MS}ms")
    return summary


def _device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return f"{runtime.world_size}x{torch.cuda.get_device_name(runtime.device)}"
    return f"{runtime.world_size}xcpu ({platform.processor() or platform.machine()})"


def _progress_bar(runtime: Runtime, config: TrainConfig):
    if not runtime.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=config.iterations, desc="train", unit="step", dynamic_ncols=True)
