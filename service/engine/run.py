"""The evaluation loop: chunk by chunk, score → commit → (n-gram commit) → (train), streaming events.

``evaluate(options)`` loads and cross-checks the inputs, then runs ``evaluate_model``, the loop itself (also
driven with in-memory models by tests and benches). The order per chunk and the budget: docs/evaluation.md §2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.engine.dist import DistContext, init_from_env, ranks_from_env, resolve_device
from service.engine.events import (
    Event,
    Totals,
    allocation_failure_reason,
    chunk_event,
    end_event,
    error_event,
    start_event,
    strict_event_stream,
    timeout_event,
)
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
from service.engine.windows import Chunk, plan_chunks, plan_windows
from trainer.artifact import SUBMISSION_LIMIT_BYTES
from trainer.data.byte_accounting import ByteTables
from trainer.data.val_manifest import recorded_val_sha256, tokens_sha256
from trainer.threads import apply_thread_policy

log = logging.getLogger(__name__)

# C2 tolerances (docs/evaluation.md §3): |Σ_v p(v) − 1| (fp32 log-softmax rounding alone is ~1e-7), and
# |p_vector(x_t) − p_shortcut(x_t)| (both float64 from the same counts: rounding only).
NORMALISATION_TOLERANCE = 1e-5
SHORTCUT_TOLERANCE = 1e-9
# The challenge's evaluation limit (compliance-rules §7: "Evaluation ≤ 600 s"), in the verdict whatever the budget.
EVAL_TIME_LIMIT_SECONDS = 600.0

ChunkObserver = Callable[[Chunk, np.ndarray], None]


class EvalInputError(ValueError):
    """The inputs cannot be evaluated together; ``code`` is the error event's slug."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SubmissionSize:
    """What the size rule counts: the artifact file's bytes plus the submission's code bytes, and where the
    latter come from (a .pgolf manifest's ``code_bytes.total``; for an upstream artifact, its script)."""

    artifact_bytes: int
    code_bytes: int
    code_source: str

    def verdict(self) -> dict[str, Any]:
        total = self.artifact_bytes + self.code_bytes
        return {"artifact_bytes": self.artifact_bytes, "code_bytes": self.code_bytes, "code_source": self.code_source,
                "total_bytes": total, "limit_bytes": SUBMISSION_LIMIT_BYTES,
                "within_limit": total <= SUBMISSION_LIMIT_BYTES}


# model, model config, artifact sha256, size, training sequence length (None: not recorded), notes
LoadedModel = tuple[ScoringModel, dict[str, Any], str, SubmissionSize, int | None, list[str]]


def evaluate(options: EvalOptions, *, started: float | None = None) -> Iterator[Event]:
    """Evaluate an artifact file on the validation shards; yields start, chunk…, then end | timeout | error.

    ``started``: the ``time.perf_counter()`` at which the evaluation's clock started; the command line takes it
    before it imports torch and the engine, so the 600 s budget includes those imports.
    """
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
    """The error event of an exception: an input error's own code, `bad_options` for a ValueError while setting
    up, `order_violation`, `resource_limit` when an allocation failed (the service runs evaluators under an
    address-space rlimit), else `internal`."""
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


class _Budget:
    """Stops between chunks when the budget is spent or the next chunk would likely overrun it."""

    def __init__(self, max_seconds: float, started: float, clock: Callable[[], float]) -> None:
        self.max_seconds = max_seconds
        self.started = started
        self.clock = clock
        self.last_chunk_seconds = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def should_stop(self, dist: DistContext, device: torch.device) -> bool:
        over = self.elapsed() + self.last_chunk_seconds > self.max_seconds
        flag = torch.tensor([1.0 if over else 0.0], device=device)
        dist.all_reduce(flag, "max")  # one rank over budget stops them all
        return bool(flag.item() > 0)


def _reduced(check: DistributionCheck, stats: dict[str, float], dist: DistContext, device: torch.device
             ) -> tuple[DistributionCheck, dict[str, float]]:
    """A chunk's check and mixer counters over all ranks."""
    if dist.world_size == 1:
        return check, stats
    # One MIN gives the smallest sum, the largest sum and gap (negated) and whether every rank scored from vectors.
    gap = check.gap_max if check.gap_max is not None else -1.0
    extremes = torch.tensor([check.sum_min, -check.sum_max, -gap, float(check.from_vector)], dtype=torch.float64,
                            device=device)
    dist.all_reduce(extremes, "min")
    counts = torch.tensor([check.positions, check.targets, *stats.values()], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    low, high, gap, from_vector = extremes.tolist()
    merged = DistributionCheck(int(counts[0]), int(counts[1]), low, -high, -gap if gap <= 0 else None,
                               from_vector == 1.0)
    return merged, dict(zip(stats, counts[2:].tolist(), strict=True))


def compliance_summary(ledger: ScoreLedger, options: EvalOptions, check: DistributionCheck, *,
                       updater: TTTUpdater | None, last_chunk_index: int | None, mixer_compliant: bool,
                       elapsed_s: float, val_tokens_sha256: str, validation_manifest_sha256: str | None,
                       ngram_stats: dict[str, float] | None = None, submission: SubmissionSize | None = None
                       ) -> dict[str, Any]:
    """The verdict: C1–C4 as far as the engine can check them, the size rule (null for an in-memory model) and
    the challenge's 600 s limit, whatever the run's own budget (docs/evaluation.md §5)."""
    normalised = check.within(NORMALISATION_TOLERANCE, SHORTCUT_TOLERANCE)
    sums = {"min": check.sum_min, "max": check.sum_max, "positions": check.positions} if check.positions else \
        {"min": None, "max": None, "positions": 0}
    scored_once = ledger.scored_once()
    score_before_update = ledger.trace.score_before_update(last_chunk_index)
    size = submission.verdict() if submission is not None else None
    within_time_limit = elapsed_s <= EVAL_TIME_LIMIT_SECONDS
    return {
        # A mixer that declares itself non-compliant (hashed-940) never is, whatever its sums show.
        "compliant": (scored_once and score_before_update and normalised and mixer_compliant and within_time_limit
                      and (size is None or size["within_limit"])),
        "scored_once": scored_once,
        "targets_expected": ledger.num_targets,
        "targets_scored": ledger.totals.targets,
        "positions_not_scored_once": ledger.positions_not_scored_once,
        "score_before_update": score_before_update,
        "ttt": updater.summary() if updater is not None else None,
        "ngram": {"mode": options.ngram, "mixer_compliant": mixer_compliant, "normalised": normalised,
                  "probability_sum": sums, "tolerance": NORMALISATION_TOLERANCE, **check.as_dict(),
                  "shortcut_tolerance": SHORTCUT_TOLERANCE, "stats": ngram_stats or None},
        "trace_digest": ledger.trace.digest(),
        "within_time_budget": elapsed_s <= options.max_seconds,
        "within_time_limit": within_time_limit,
        "time_limit_seconds": EVAL_TIME_LIMIT_SECONDS,
        "size": size,
        # A max_tokens prefix, a truncated shard or data without a manifest all fail this.
        "full_validation_set": val_tokens_sha256 == validation_manifest_sha256,
        "val_tokens_sha256": val_tokens_sha256,
        "validation_manifest_sha256": validation_manifest_sha256,
        "sliding_window": options.stride is not None and options.seq_len is not None
                          and options.stride < options.seq_len,
    }


@strict_event_stream
def evaluate_model(model: ScoringModel, tokens: np.ndarray, tables: ByteTables, options: EvalOptions, *,
                   dist: DistContext | None = None, device: torch.device | str = "cpu",
                   artifact_sha256: str | None = None, submission: SubmissionSize | None = None,
                   extra_config: dict[str, Any] | None = None,
                   started: float | None = None, clock: Callable[[], float] = time.perf_counter,
                   observer: ChunkObserver | None = None, ttt_recipe: TTTRecipe | None = None,
                   validation_manifest_sha256: str | None = None) -> Iterator[Event]:
    """The evaluation loop over an in-memory model and token stream (docs/evaluation.md §2).

    ``validation_manifest_sha256``: the val digest the data's manifest records (a full-val score needs the tokens
    to hash to it). ``ttt_recipe`` replaces ``options.ttt_recipe``'s recipe (benches). ``observer`` gets each
    committed chunk and its per-position float64 NLL (tests).
    """
    dist = dist or DistContext()
    device = torch.device(device)
    started = clock() if started is None else started
    options = options.resolved()  # already concrete when called from evaluate(); else seq 2048, recipe chunk
    val_tokens_sha256 = tokens_sha256(tokens)
    budget = _Budget(options.max_seconds, started, clock)
    ledger = ScoreLedger(tokens, tables)
    check = DistributionCheck()
    ngram_stats: dict[str, float] = {}
    last_chunk_index: int | None = None
    mixer: NgramMixer | None = None
    updater: TTTUpdater | None = None

    def summary() -> dict[str, Any]:
        return compliance_summary(ledger, options, check, updater=updater, ngram_stats=ngram_stats,
                                  last_chunk_index=last_chunk_index, elapsed_s=budget.elapsed(), submission=submission,
                                  mixer_compliant=mixer is None or bool(mixer.compliant),
                                  val_tokens_sha256=val_tokens_sha256,
                                  validation_manifest_sha256=validation_manifest_sha256)

    try:
        options.validate()
        if len(tokens) < 2:
            raise EvalInputError("bad_data", f"the validation stream has {len(tokens)} tokens; nothing to score")
        windows = plan_windows(len(tokens), options.seq_len, options.stride)
        chunks = plan_chunks(windows, options.chunk_tokens)
        last_chunk_index = chunks[-1].index
        vocab_size = len(tables.base_bytes)
        mixer = make_mixer(options.ngram, vocab_size)
        recipe = (ttt_recipe or RECIPES[options.ttt_recipe]) if options.ttt else None
        updater = (TTTUpdater(model, recipe, ledger, seq_len=options.seq_len,
                              num_chunks=len(chunks), dist=dist, device=device) if recipe is not None else None)
        config = {**options.to_dict(), "world_size": dist.world_size, "device_resolved": str(device),
                  "ttt_recipe_settings": asdict(recipe) if recipe is not None else None,
                  **(extra_config or {})}
        yield start_event(config=config, artifact_sha256=artifact_sha256, tokens=len(tokens),
                          targets=len(tokens) - 1, bytes_total=tables.total_bytes(tokens),
                          chunks=len(chunks), val_tokens_sha256=val_tokens_sha256,
                          validation_manifest_sha256=validation_manifest_sha256)
    except ValueError as exc:  # bad options or inputs (EvalInputError); anything else is the caller's to see
        yield _error_of(exc, budget.elapsed(), setting_up=True)
        return

    model.eval()
    try:
        for chunk in chunks:
            if budget.should_stop(dist, device):
                yield timeout_event(
                    reason=f"wall-clock budget of {options.max_seconds:g} s reached after {chunk.index} of "
                           f"{len(chunks)} chunks; stopped cleanly before chunk {chunk.index}",
                    totals=ledger.totals, chunks_done=chunk.index, elapsed_s=budget.elapsed(), compliance=summary())
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
                                  totals=ledger.totals, elapsed_s=budget.elapsed())
                return
            chunk_check, chunk_stats = _reduced(scores.check, mixer.take_stats() if mixer is not None else {},
                                                dist, device)
            check.merge(chunk_check)
            for name, value in chunk_stats.items():
                ngram_stats[name] = ngram_stats.get(name, 0) + value
            chunk_totals = ledger.commit(scores)
            if observer is not None:
                observer(chunk, scores.sums[0].cpu().numpy())
            mix_commit_seconds = 0.0
            if mixer is not None:
                commit_started = time.perf_counter()
                # The ledger has just committed every target of the chunk (whichever rank scored it).
                mixer.commit(tokens, ledger.frontier)
                mix_commit_seconds = time.perf_counter() - commit_started
            trained_range = None
            train_seconds = 0.0
            if updater is not None and chunk.index != last_chunk_index:
                train_started = time.perf_counter()
                # Tokens [target_lo − 1, target_hi): inputs and targets of exactly the chunk just committed.
                span = ledger.committed_span(chunk.target_lo - 1, chunk.target_hi)
                trained_range = updater.train(span, chunk.index)
                train_seconds = time.perf_counter() - train_started
            budget.last_chunk_seconds = clock() - chunk_started
            yield chunk_event(index=chunk.index, target_range=(chunk.target_lo, chunk.target_hi), chunk=chunk_totals,
                              running=ledger.totals, trained_range=trained_range, elapsed_s=budget.elapsed(),
                              phase_seconds={"score": scores.score_seconds,
                                             "ngram": scores.mix_seconds + mix_commit_seconds,
                                             "train": train_seconds},
                              order_trace=dict(ledger.trace.chunks[-1]),
                              distribution=chunk_check.as_dict(), ngram_stats=chunk_stats or None)
    except Exception as exc:  # a failure mid-run: report what was committed, then the reason
        yield _error_of(exc, budget.elapsed(), ledger.totals)
        return
    yield end_event(totals=ledger.totals, elapsed_s=budget.elapsed(), compliance=summary())
