"""The evaluation: ``evaluate`` loads and cross-checks the inputs, ``evaluate_model`` runs the loop, chunk by chunk
score → commit → (n-gram commit) → (train), and streams the events (docs/evaluation.md §2, §5)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from service.engine.dist import DistContext, init_from_env, ranks_from_env, resolve_device
from service.engine.events import Event, Totals, allocation_failure_reason, error_event, partial_figures
from service.engine.ngram import NgramMixer, make_mixer
from service.engine.options import FALLBACK_SEQ_LEN, RECIPES, EvalOptions, TTTRecipe, is_upstream_artifact
from service.engine.scoring import (
    DistributionCheck,
    ScoreLedger,
    ScoreOrderError,
    ScoringModel,
    score_chunk,
)
from service.engine.ttt import TTTUpdater
from service.engine.windows import plan_chunks, plan_windows
from trainer.data.byte_accounting import ByteTables
from trainer.data.val_manifest import recorded_val_sha256, tokens_sha256
from trainer.threads import apply_thread_policy

log = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """The inputs cannot be evaluated together; ``code`` is the error event's slug."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SubmissionSize:
    """What the size rule counts: the artifact file's bytes, the submission's code bytes and where they come from
    (a .pgolf manifest's ``code_bytes.total``; an upstream artifact's script)."""

    artifact_bytes: int
    code_bytes: int
    code_source: str


# model, model config, artifact sha256, size, training sequence length (None: not recorded), notes
LoadedModel = tuple[ScoringModel, dict[str, Any], str, SubmissionSize, int | None, list[str]]


def evaluate(options: EvalOptions, *, started: float | None = None) -> Iterator[Event]:
    """Evaluate an artifact file on the validation shards; ``started``: the ``time.perf_counter()`` at which the
    evaluation's clock started (docs/evaluation.md §2)."""
    started = time.perf_counter() if started is None else started
    try:
        options.validate()
        threads = apply_thread_policy()  # CPU scoring and the n-gram mixer share the cores with local peers
        rank, world_size, local_rank = ranks_from_env()
        device = resolve_device(options.device, local_rank)
        dist = init_from_env(device, rank, world_size)
        loaded, tables, tokens = load_inputs(options, device)
    except Exception as exc:  # bad inputs, or e.g. a CUDA or process-group failure: still one error event
        yield _error_of(exc, time.perf_counter() - started, setting_up=True)
        return
    model, model_config, artifact_sha256, size, train_seq_len, notes = loaded
    seq_len_source = "option" if options.seq_len is not None else (
        "artifact training.train_seq_len" if train_seq_len else f"default {FALLBACK_SEQ_LEN}")
    yield from evaluate_model(model, tokens, tables, options.resolved(train_seq_len), dist=dist, device=device,
                              artifact_sha256=artifact_sha256, submission=size,
                              extra_config={"model_config": model_config, "seq_len_source": seq_len_source,
                                            "cpu_threads": {"intra_op": threads.threads, "reason": threads.reason},
                                            **({"notes": notes} if notes else {})},
                              started=started, validation_manifest_sha256=recorded_val_sha256(options.data_dir))


def _error_of(exc: Exception, elapsed_s: float, totals: Totals | None = None, *, setting_up: bool = False) -> Event:
    """The error event of an exception (its codes: docs/evaluation.md §5)."""
    if isinstance(exc, EvalInputError) or (setting_up and isinstance(exc, ValueError)):
        return error_event(code=getattr(exc, "code", "bad_options"), reason=str(exc), elapsed_s=elapsed_s)
    log.exception("evaluation failed")
    allocation = allocation_failure_reason(exc)
    if isinstance(exc, ScoreOrderError):
        code, reason = "order_violation", str(exc)
    elif allocation is not None:
        code, reason = "resource_limit", f"{allocation}: {type(exc).__name__}: {exc}"[:2000]
    else:
        code, reason = "internal", f"{type(exc).__name__}: {exc}"
    return error_event(code=code, reason=reason, totals=totals, elapsed_s=elapsed_s)


def load_inputs(options: EvalOptions, device: torch.device) -> tuple[LoadedModel, ByteTables, np.ndarray]:
    """Load tokenizer tables, artifact and validation tokens, refusing any combination that does not match."""
    from trainer.data.shards import ShardError, load_validation_tokens

    if options.artifact is None or options.data_dir is None:
        raise EvalInputError("bad_options", "an artifact path and a data directory are required")
    tokenizer_path = options.resolved_tokenizer()
    try:
        tables = ByteTables.from_model_file(tokenizer_path)
    except (OSError, RuntimeError) as exc:
        raise EvalInputError("bad_tokenizer", f"cannot read tokenizer {tokenizer_path}: {exc}") from exc
    artifact_path = Path(options.artifact)
    if is_upstream_artifact(artifact_path):
        from service.engine.upstream_inputs import load_upstream  # not counted: only a .ptz evaluation needs it

        loaded = load_upstream(options, artifact_path, device, tables, tokenizer_path)
    else:
        loaded = _load_pgolf(options, artifact_path, device, tables, tokenizer_path)
    try:  # both loaders checked that the model's vocabulary is the tokenizer's
        tokens = load_validation_tokens(options.data_dir, vocab_size=tables.vocab_size)
    except (OSError, ShardError) as exc:
        raise EvalInputError("bad_data", f"cannot load validation data from {options.data_dir}: {exc}") from exc
    return loaded, tables, np.ascontiguousarray(tokens[: options.max_tokens])


def _load_pgolf(options: EvalOptions, artifact_path: Path, device: torch.device, tables: ByteTables,
                tokenizer_path: Path) -> LoadedModel:
    from trainer.artifact import ArtifactError, load_model

    try:
        model, artifact = load_model(artifact_path, device=device)
    except OSError as exc:
        raise EvalInputError("bad_artifact", f"cannot read artifact {artifact_path}: {exc}") from exc
    except ArtifactError as exc:
        raise EvalInputError(exc.code, f"artifact refused: {exc}") from exc
    manifest = artifact.manifest  # validated: its tokenizer's vocab_size is the model's
    trained_with = (manifest["tokenizer"]["sha256"], manifest["tokenizer"]["vocab_size"])
    if trained_with != (tables.sha256, tables.vocab_size):
        raise EvalInputError(
            "tokenizer_mismatch",
            f"the artifact was trained with tokenizer sha256 {trained_with[0]} (a vocabulary of {trained_with[1]} "
            f"tokens), but the data's tokenizer {tokenizer_path} has sha256 {tables.sha256} ({tables.vocab_size}); "
            f"refusing to score it on this data")
    size = SubmissionSize(artifact.file_nbytes, manifest["code_bytes"]["total"], "manifest code_bytes.total")
    recorded = manifest["training"].get("train_seq_len")
    train_seq_len = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0 else None
    ignored = [flag for flag, given in (("--code", options.code is not None), ("--env", bool(options.env))) if given]
    notes = [f"{' and '.join(ignored)} ignored: a .pgolf artifact carries its own model config"] if ignored else []
    return model, dict(manifest["model_config"]), artifact.file_sha256, size, train_seq_len, notes


def _add_stats(total: dict[str, float], stats: dict[str, float]) -> None:
    for name, value in stats.items():
        total[name] = total.get(name, 0) + value


def _reduced(check: DistributionCheck, stats: dict[str, float], dist: DistContext
             ) -> tuple[DistributionCheck, dict[str, float]]:
    """A chunk's check and mixer counters over all ranks, merged as chunks are."""
    if dist.world_size == 1:
        return check, stats
    ranks: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(ranks, (check, stats))
    merged, total = DistributionCheck(), {}
    for rank_check, rank_stats in ranks:
        merged.merge(rank_check)
        _add_stats(total, rank_stats)
    return merged, total


def evaluate_model(model: ScoringModel, tokens: np.ndarray, tables: ByteTables, options: EvalOptions, *,
                   dist: DistContext | None = None, device: torch.device | str = "cpu",
                   artifact_sha256: str | None = None, submission: SubmissionSize | None = None,
                   extra_config: dict[str, Any] | None = None,
                   started: float | None = None, clock: Callable[[], float] = time.perf_counter,
                   ttt_recipe: TTTRecipe | None = None,
                   validation_manifest_sha256: str | None = None) -> Iterator[Event]:
    """The evaluation loop over an in-memory model and token stream; its parameters: docs/evaluation.md §2."""
    dist = dist or DistContext()
    device = torch.device(device)
    started = clock() if started is None else started
    options = options.resolved()  # already concrete when called from evaluate(); else seq 2048, recipe chunk
    ledger = ScoreLedger(tokens, tables)
    check = DistributionCheck()
    ngram_stats: dict[str, float] = {}
    mixer: NgramMixer | None = None
    updater: TTTUpdater | None = None
    last_chunk_seconds = 0.0

    def elapsed() -> float:
        return clock() - started

    def measured() -> dict[str, Any]:  # what service/judge.py needs beyond the report's own events
        sums = {"min": check.sum_min, "max": check.sum_max} if check.positions else {"min": None, "max": None}
        return {"positions_not_scored_once": ledger.positions_not_scored_once,
                "ttt": updater.summary() if updater is not None else None,
                "ngram": {"mixer_compliant": mixer is None or bool(mixer.compliant),
                          "probability_sum": {**sums, "positions": check.positions}, **check.as_dict(),
                          "stats": ngram_stats or None},
                "size": asdict(submission) if submission is not None else None}

    try:
        options.validate()
        if len(tokens) < 2:
            raise EvalInputError("bad_data", f"the validation stream has {len(tokens)} tokens; nothing to score")
        windows = plan_windows(len(tokens), options.seq_len, options.stride)
        chunks = plan_chunks(windows, options.chunk_tokens)
        mixer = make_mixer(options.ngram, len(tables.base_bytes))
        recipe = (ttt_recipe or RECIPES[options.ttt_recipe]) if options.ttt else None
        updater = (TTTUpdater(model, recipe, ledger, seq_len=options.seq_len,
                              num_chunks=len(chunks), dist=dist, device=device) if recipe is not None else None)
        config = {**options.to_dict(), "world_size": dist.world_size, "device_resolved": str(device),
                  "ttt_recipe_settings": asdict(recipe) if recipe is not None else None,
                  **(extra_config or {})}
        yield {"type": "start", "config": config, "artifact_sha256": artifact_sha256, "tokens": len(tokens),
               "targets": len(tokens) - 1, "bytes": tables.total_bytes(tokens), "chunks": len(chunks),
               "val_tokens_sha256": tokens_sha256(tokens), "validation_manifest_sha256": validation_manifest_sha256}
    except ValueError as exc:  # bad options or inputs (EvalInputError); anything else is the caller's to see
        yield _error_of(exc, elapsed(), setting_up=True)
        return

    model.eval()
    try:
        for chunk in chunks:
            # Stop between chunks when the budget is spent or the next chunk would likely overrun it.
            over = torch.tensor([float(elapsed() + last_chunk_seconds > options.max_seconds)], device=device)
            dist.all_reduce(over, "max")  # one rank over budget stops them all
            if over.item() > 0:
                yield {"type": "timeout",
                       "reason": f"wall-clock budget of {options.max_seconds:g} s reached after {chunk.index} of "
                                 f"{len(chunks)} chunks; stopped cleanly before chunk {chunk.index}",
                       **partial_figures(ledger.totals), "chunks_done": chunk.index,
                       "elapsed_s": elapsed(), "measured": measured()}
                return
            chunk_started = clock()
            scores = score_chunk(model, tokens, windows, chunk, rank=dist.rank, world_size=dist.world_size,
                                 batch_windows=options.batch_windows, device=device, mixer=mixer)
            dist.all_reduce(scores.sums)
            non_finite = int((~torch.isfinite(scores.sums[0])).sum())
            if non_finite:  # a score of NaN/inf is no score: stop before it enters the committed totals
                yield error_event(code="non_finite_score",
                                  reason=f"the model produced {non_finite} non-finite NLL value(s) in chunk "
                                         f"{chunk.index}; nothing of that chunk was committed",
                                  totals=ledger.totals, elapsed_s=elapsed())
                return
            chunk_check, chunk_stats = _reduced(scores.check, mixer.take_stats() if mixer is not None else {}, dist)
            check.merge(chunk_check)
            _add_stats(ngram_stats, chunk_stats)
            chunk_totals = ledger.commit(scores)
            mix_commit_seconds = 0.0
            if mixer is not None:
                commit_started = time.perf_counter()
                # The ledger has just committed every target of the chunk (whichever rank scored it).
                mixer.commit(tokens, ledger.frontier)
                mix_commit_seconds = time.perf_counter() - commit_started
            trained_range = None
            train_seconds = 0.0
            if updater is not None and chunk is not chunks[-1]:
                train_started = time.perf_counter()
                # Tokens [target_lo − 1, target_hi): inputs and targets of exactly the chunk just committed.
                span = ledger.committed_span(chunk.target_lo - 1, chunk.target_hi)
                trained_range = updater.train(span, chunk.index)
                train_seconds = time.perf_counter() - train_started
            last_chunk_seconds = clock() - chunk_started
            running = ledger.totals
            phases = {"score": scores.score_seconds, "ngram": scores.mix_seconds + mix_commit_seconds,
                      "train": train_seconds}
            yield {"type": "chunk", "index": chunk.index, "target_range": [chunk.target_lo, chunk.target_hi],
                   "targets": chunk_totals.targets, "bytes": chunk_totals.bytes, "nll_sum": chunk_totals.nll_sum,
                   "chunk_bpb": chunk_totals.val_bpb, "running_targets": running.targets,
                   "running_bytes": running.bytes, "running_bpb": running.val_bpb,
                   "trained_range": list(trained_range) if trained_range is not None else None,
                   "elapsed_s": round(elapsed(), 4),
                   "phase_seconds": {name: round(seconds, 4) for name, seconds in phases.items()},
                   "order_trace": dict(ledger.trace.chunks[-1]), "distribution": chunk_check.as_dict(),
                   "ngram_stats": chunk_stats or None}
    except Exception as exc:  # a failure mid-run: report what was committed, then the reason
        yield _error_of(exc, elapsed(), ledger.totals)
        return
    totals = ledger.totals
    yield {"type": "end", "val_loss": totals.val_loss, "val_bpb": totals.val_bpb, "targets_scored": totals.targets,
           "bytes": totals.bytes, "nll_sum": totals.nll_sum, "elapsed_s": elapsed(),
           "measured": measured()}
