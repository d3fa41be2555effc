"""``python -m verifier probe``: black-box probes of the evaluation engine for conditions C1–C4.

Each probe runs a subject (``verifier.probe_subjects``) on a token stream, changes the stream, runs it again and
compares what was committed. Nothing is taken from the engine's own compliance summary.

* C1 (causal): re-draw every token after t; every score at positions ≤ t must stay bit for bit the same.
* C2 (full normalised distribution): at sampled positions the distribution committed before scoring must sum
  to 1 within 1e-6 over the whole vocabulary, must not move when x_t alone is changed, and must be the one the
  score comes from: the NLL committed for x_t = b is −ln p(b), for the actual token and for substituted ones.
* C3 (score before update): every state update (TTT training call, n-gram commit) uses only targets that were
  already scored, judged from the recorded order of scores and updates.
* C4 (single pass): every target position 1..N−1 scored exactly once.

Every condition is probed on random tokens and on real tokens (the validation shards of ``--data``, by default
the embedded corpus). Without ``--artifact`` the model is a small randomly initialised GPT. Exit status: 1 when
any probe fails (``hashed-940`` fails C2 by design and prints its measured sums), 0 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.engine.options import EvalOptions
from verifier.report import FAIL, PASS, CheckResult, render_table

if TYPE_CHECKING:  # the subjects import torch and the engine: only the probe command itself needs them
    from service.engine.ngram import NgramMixer
    from trainer.data.byte_accounting import ByteTables
    from trainer.model import GPT
    from verifier.probe_subjects import ProbeRun, ProbeSubject

SUM_TOLERANCE = 1e-6  # |Σ_v p(v) − 1|
# Changing x_t must leave the committed distribution untouched; deterministic evaluators move it by exactly 0.
INDEPENDENCE_TOLERANCE = 1e-9
# |NLL committed − (−ln p(x_t))|: the probe recomputes the model's softmax over one window, the engine over a
# batch of windows, so float32 rounding differs slightly; any real mixing of one token only moves it by far more.
CONSISTENCY_TOLERANCE_NATS = 1e-4
NUM_TOKENS = 384
CUT_FRACTIONS = (0.2, 0.45, 0.7)  # C1 cut points, plus the end of the first scored range (a chunk edge)
SAMPLE_FRACTIONS = (0.35, 0.6, 0.9)  # C2 positions: late enough for caches and adaptation to be active
FLIPS_PER_POSITION = 2


@dataclass(frozen=True)
class Stream:
    name: str  # "random" | "real"
    tokens: np.ndarray
    vocab_size: int  # the alphabet substitutions are drawn from


# ----------------------------------------------------------------------------------------------------------------
# The four conditions


def probe_causality(subject: ProbeSubject, stream: Stream, base: ProbeRun, rng: np.random.Generator) -> CheckResult:
    tokens = stream.tokens
    cuts = cut_points(base, len(tokens))
    later_changed = False
    for t in cuts:
        changed = tokens.copy()
        changed[t + 1 :] = rng.integers(0, stream.vocab_size, size=len(tokens) - t - 1)
        run = subject.run(changed)
        before, after = base.nll[1 : t + 1], run.nll[1 : t + 1]
        if not np.array_equal(before, after, equal_nan=True):
            differs = np.flatnonzero(~((before == after) | (np.isnan(before) & np.isnan(after))))
            position = int(differs[0]) + 1
            delta = float(np.nanmax(np.abs(after[differs] - before[differs]))) if differs.size else math.nan
            return CheckResult(f"C1 {stream.name}", FAIL,
                               f"t={t}: {differs.size} of {t} scores at positions <= t changed, first at "
                               f"{position}, by up to {delta:.3g} nats",
                               "a score depends on tokens after its position")
        later_changed |= not np.array_equal(base.nll[t + 1 :], run.nll[t + 1 :], equal_nan=True)
    figure = f"scores at positions <= t bit-identical after re-drawing the tokens after t, t in {cuts}"
    note = "" if later_changed else "no later score changed either: this subject showed no input dependence at all"
    return CheckResult(f"C1 {stream.name}", PASS, figure, note)


def probe_distribution(subject: ProbeSubject, stream: Stream, base: ProbeRun, positions: Sequence[int],
                       rng: np.random.Generator) -> CheckResult:
    tokens = stream.tokens
    name = f"C2 {stream.name}"
    missing = [t for t in positions if t not in base.distributions]
    if missing:
        return CheckResult(name, FAIL, f"no distribution at positions {missing}",
                           "the evaluator committed no full-vocabulary distribution before scoring")
    sums: list[float] = []
    invalid: list[int] = []  # positions with a negative or non-finite probability
    largest_move = 0.0
    largest_mismatch = 0.0

    def inspect(vector: np.ndarray, t: int) -> None:
        sums.append(float(vector.sum()))
        if not np.isfinite(vector).all() or vector.min() < 0:
            invalid.append(t)

    def mismatch(nll: float, p: float) -> float:
        """|committed NLL − (−ln p)|; infinite when the position has no score or p gives it no mass."""
        return abs(nll - math.log(1.0 / p)) if p > 0 and math.isfinite(nll) else math.inf

    problems: list[str] = []
    for t in positions:
        reference = base.distributions[t]
        inspect(reference, t)
        largest_mismatch = max(largest_mismatch, mismatch(base.nll[t], reference[tokens[t]]))
        for substitute in substitutes(int(tokens[t]), stream.vocab_size, rng):
            changed = tokens.copy()
            changed[t] = substitute
            run = subject.run(changed, [t])
            vector = run.distributions.get(t)
            if vector is None:
                problems.append(f"no distribution at position {t} when x_t = {substitute}")
                continue
            inspect(vector, t)
            largest_move = max(largest_move, float(np.max(np.abs(vector - reference))))
            largest_mismatch = max(largest_mismatch, mismatch(run.nll[t], reference[substitute]))
    worst = max(sums, key=lambda total: abs(total - 1.0))
    if abs(worst - 1.0) > SUM_TOLERANCE:
        problems.append(f"sum p = {worst:.9g}: not a distribution over the vocabulary (tolerance {SUM_TOLERANCE:g})")
    if invalid:
        problems.append(f"negative or non-finite probabilities at positions {sorted(set(invalid))}")
    if largest_move > INDEPENDENCE_TOLERANCE:
        problems.append(f"changing x_t alone moved the committed distribution by up to {largest_move:.3g}")
    if largest_mismatch > CONSISTENCY_TOLERANCE_NATS:
        problems.append(f"a committed NLL differs from -ln p(x_t) of the committed distribution by up to "
                        f"{largest_mismatch:.3g} nats: the score does not come from that distribution")
    low, high = min(sums), max(sums)
    figure = (f"sum p in [1{low - 1:+.2e}, 1{high - 1:+.2e}] (min {low:.9g}, max {high:.9g}) over {len(sums)} "
              f"vectors at positions {list(positions)}; x_t changes moved p by {largest_move:.2g}; "
              f"|NLL + ln p(x_t)| <= {largest_mismatch:.2g} nats")
    return CheckResult(name, FAIL if problems else PASS, figure, "; ".join(problems[:3]))


def probe_order(stream: Stream, base: ProbeRun) -> CheckResult:
    frontier = 1  # every target < frontier has been scored
    updates: list[tuple[int, int]] = []  # (last updated target, frontier at that moment)
    for event in base.order:
        if event.kind == "score":
            frontier = max(frontier, event.hi)
            continue
        if event.hi > frontier:
            return CheckResult(f"C3 {stream.name}", FAIL,
                               f"{event.what} updated state with targets [{event.lo}, {event.hi}) when only "
                               f"targets < {frontier} were scored",
                               "state was updated with a token before that token's score was fixed")
        updates.append((event.hi - 1, frontier))
    if not updates:
        return CheckResult(f"C3 {stream.name}", PASS, "no state updated from validation tokens (frozen predictor)")
    kinds = sorted({event.what.split(" on ")[0] for event in base.order if event.kind == "update"})
    last_target, scored_below = min(updates, key=lambda update: update[1] - update[0])
    return CheckResult(f"C3 {stream.name}", PASS,
                       f"{len(updates)} updates ({', '.join(kinds)}), each on targets already scored; closest: "
                       f"last updated target {last_target} with targets < {scored_below} scored")


def probe_single_pass(stream: Stream, base: ProbeRun) -> CheckResult:
    times = base.times_scored
    expected = len(times) - 1
    never = int(np.count_nonzero(times[1:] == 0))
    repeated = int(np.count_nonzero(times[1:] > 1))
    problems = []
    if base.outcome != "end":
        problems.append(f"the evaluation did not finish: {base.outcome}")
    if never or repeated or times[0]:
        problems.append(f"{never} targets never scored, {repeated} scored more than once"
                        + (", position 0 (not a target) scored" if times[0] else ""))
    figure = f"{int(np.count_nonzero(times[1:] == 1)):,} of N-1 = {expected:,} targets scored exactly once"
    return CheckResult(f"C4 {stream.name}", FAIL if problems else PASS, figure, "; ".join(problems))


def cut_points(base: ProbeRun, num_tokens: int) -> list[int]:
    cuts = {max(1, int(num_tokens * fraction)) for fraction in CUT_FRACTIONS}
    first_scores = next((event for event in base.order if event.kind == "score"), None)
    if first_scores is not None and first_scores.hi - 1 < num_tokens - 1:
        cuts.add(first_scores.hi - 1)
    return sorted(t for t in cuts if t < num_tokens - 1)


def sample_positions(num_tokens: int) -> list[int]:
    return sorted({min(num_tokens - 1, max(1, int(num_tokens * fraction))) for fraction in SAMPLE_FRACTIONS})


def substitutes(actual: int, vocab_size: int, rng: np.random.Generator) -> list[int]:
    choices = rng.permutation(vocab_size)
    return [int(v) for v in choices[choices != actual][:FLIPS_PER_POSITION]]


def probe_subject(subject: ProbeSubject, streams: Sequence[Stream], seed: int = 0) -> list[CheckResult]:
    """C1–C4 on every stream, ordered by condition."""
    rows: list[CheckResult] = []
    for stream in streams:
        rng = np.random.default_rng(seed)
        positions = sample_positions(len(stream.tokens))
        base = subject.run(stream.tokens, positions)
        rows += [probe_causality(subject, stream, base, rng),
                 probe_distribution(subject, stream, base, positions, rng),
                 probe_order(stream, base), probe_single_pass(stream, base)]
    return sorted(rows, key=lambda row: row.name.split()[0])


# ----------------------------------------------------------------------------------------------------------------
# The engine's modes, and the command line

# mode -> (test-time training, n-gram mode); TTT uses the engine's default recipe. "default" is what the engine runs
# without options, "claimed" the PR #940 method's n-gram with TTT (service.compare.CLAIMED_OPTIONS).
MODES: dict[str, tuple[bool, str]] = {
    "plain": (False, "off"),
    "ttt": (True, "off"),
    "ngram-exact": (False, "exact"),
    "ngram-smoothed": (False, "smoothed"),
    "ngram-tilt": (False, "tilt"),
    "ttt+ngram-exact": (True, "exact"),
    "default": (EvalOptions.ttt, EvalOptions.ngram),
    "hashed-940": (False, "hashed-940"),
    "claimed": (True, "hashed-940"),
}
MODE_GROUPS = {"compliant": [mode for mode, (_, ngram) in MODES.items() if ngram != "hashed-940"],
               "all": list(MODES)}
FULL_VAL_TOKENS = 62_021_632  # the FineWeb val stream (reference §11)


def scaled_hashed_buckets(num_tokens: int) -> int:
    """Buckets giving a short probe stream the load that 2^22 buckets carry on the full validation stream.

    hashed-940 only sums above 1 where buckets collide; with 2^22 buckets a few hundred tokens never collide, so
    the probe would see the formula's collision-free (normalised) special case instead of the scored one.
    """
    from service.engine.ngram_hashed import DEFAULT_BUCKETS

    load = FULL_VAL_TOKENS / DEFAULT_BUCKETS
    return 1 << max(4, round(math.log2(num_tokens / load)))


def engine_subject(mode: str, model: GPT, tables: ByteTables, num_tokens: int) -> tuple[ProbeSubject, str]:
    """The engine in one mode, on a geometry small enough to run dozens of times: 4 chunks of 96 targets."""
    from verifier.probe_subjects import EngineSubject

    ttt, ngram = MODES[mode]
    options = EvalOptions(seq_len=64, stride=16, chunk_tokens=96, batch_windows=4, ttt=ttt, ngram=ngram,
                          device="cpu")
    note = f"ttt {options.ttt_recipe}" if ttt else "no ttt"
    factory = None
    if ngram == "hashed-940":
        from service.engine.ngram_hashed import Hashed940Mixer

        buckets = scaled_hashed_buckets(num_tokens)
        note += (f"; {buckets} hash buckets, the load of 2^22 buckets on the {FULL_VAL_TOKENS:,}-token val set "
                 f"(the upstream setting on {num_tokens} tokens would not collide)")

        def factory(_mode: str, vocab_size: int) -> NgramMixer:
            return Hashed940Mixer(vocab_size, buckets=buckets)

    subject = EngineSubject(model, tables, options, mixer_factory=factory)
    return subject, f"seq_len 64, stride 16, chunks of 96 targets; ngram {ngram}; {note}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe", help="black-box probes of the evaluation engine for conditions C1-C4",
        description="Run the evaluation engine on random and real token streams, perturb them and compare what it "
                    "commits: C1 causality, C2 full normalised distributions, C3 score before update, C4 single "
                    "pass. Exit 1 when any probe fails (hashed-940 fails C2 by design).")
    parser.add_argument("--artifact", type=Path, help="probe with this artifact's model (default: a small random GPT)")
    parser.add_argument("--mode", default="compliant", choices=[*MODES, *MODE_GROUPS],
                        help="engine mode to probe; 'compliant' = every mode but hashed-940 (default), 'all' = all")
    parser.add_argument("--data", type=Path,
                        help="directory with *_val_*.bin shards for the real-token stream (default: data/embedded, "
                             "built into a temporary directory when absent)")
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece model of --data (default: found in DATA)")
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class ProbeInputs:
    model: GPT
    description: str  # of the model
    tables: ByteTables
    streams: list[Stream]
    data: Path


def load_probe_inputs(artifact: Path | None, data: Path | None, tokenizer: Path | None) -> ProbeInputs:
    """The model (the artifact's, or a small random GPT) and the random and real streams; ValueError/OSError
    with a plain message when the inputs cannot be used."""
    from trainer.data.byte_accounting import ByteTables
    from trainer.data.shards import load_validation_tokens
    from trainer.data.stats import resolve_tokenizer
    from verifier.probe_subjects import random_stream

    with tempfile.TemporaryDirectory(prefix="pgolf-probe-") as scratch:
        data = data or _default_data(Path(scratch))
        tokenizer = resolve_tokenizer(data, tokenizer)
        tokenizer_vocab = ByteTables.from_model_file(tokenizer).vocab_size
        model, description = _probe_model(artifact, tokenizer, tokenizer_vocab)
        tables = ByteTables.from_model_file(tokenizer, vocab_size=model.config.vocab_size)
        real = np.ascontiguousarray(load_validation_tokens(data, vocab_size=tokenizer_vocab)[:NUM_TOKENS])
    if len(real) < NUM_TOKENS:
        raise ValueError(f"{data} holds {len(real)} validation tokens, the probes need {NUM_TOKENS}")
    streams = [Stream("random", random_stream(NUM_TOKENS, tokenizer_vocab), tokenizer_vocab),
               Stream("real", real, tokenizer_vocab)]
    return ProbeInputs(model, description, tables, streams, data)


def probe_mode(mode: str, inputs: ProbeInputs) -> tuple[list[CheckResult], str]:
    """The C1–C4 rows of one engine mode on both streams, and a description of the geometry."""
    subject, geometry = engine_subject(mode, inputs.model, inputs.tables, NUM_TOKENS)
    return probe_subject(subject, inputs.streams), geometry


def condition_verdicts(rows: Sequence[CheckResult]) -> dict[str, str]:
    """C1..C4 -> PASS, or FAIL when the condition failed on any stream."""
    verdicts: dict[str, str] = {}
    for row in rows:
        condition = row.name.split()[0]
        verdicts[condition] = FAIL if FAIL in (row.status, verdicts.get(condition)) else PASS
    return verdicts


def run(args: argparse.Namespace) -> int:
    try:
        inputs = load_probe_inputs(args.artifact, args.data, args.tokenizer)
    except (OSError, ValueError) as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    print(f"subject: the evaluation engine (service.engine) with {inputs.description}")
    print(f"streams: {NUM_TOKENS} uniform random tokens; the first {NUM_TOKENS} validation tokens of {inputs.data}")
    verdicts = []
    for mode in MODE_GROUPS.get(args.mode, [args.mode]):
        rows, geometry = probe_mode(mode, inputs)
        failed = sorted({row.name.split()[0] for row in rows if row.status == FAIL})
        verdicts.append(f"{mode} {'FAIL (' + ', '.join(failed) + ')' if failed else PASS}")
        print(f"\nmode {mode}: {geometry}")
        print(render_table(rows, first_column="probe"))
    print("\n" + "; ".join(verdicts))
    return 1 if any("FAIL" in verdict for verdict in verdicts) else 0


def _default_data(scratch: Path) -> Path:
    from trainer.code_bytes import REPO_ROOT
    from trainer.data.embedded import build_embedded

    built = REPO_ROOT / "data" / "embedded"
    if (built / "manifest.json").is_file():
        return built
    print(f"probe: no --data and no {built}: building the embedded corpus in {scratch} (about a minute)",
          file=sys.stderr)
    build_embedded(scratch / "embedded", log=lambda _message: None)
    return scratch / "embedded"


def _probe_model(artifact: Path | None, tokenizer: Path, tokenizer_vocab: int) -> tuple[GPT, str]:
    from trainer.artifact import ArtifactError, load_model
    from trainer.data.byte_accounting import ByteTables
    from verifier.probe_subjects import random_model

    if artifact is None:
        model = random_model(tokenizer_vocab)
        config = model.config
        return model, (f"a random {config.num_layers}-layer {config.model_dim}d GPT "
                       f"(vocabulary {config.vocab_size})")
    try:
        model, loaded = load_model(artifact)
    except ArtifactError as exc:
        raise ValueError(f"artifact refused ({exc.code}): {exc}") from None
    if loaded.manifest["tokenizer"]["sha256"] != ByteTables.from_model_file(tokenizer).sha256:
        raise ValueError(f"{artifact} was trained with another tokenizer than {tokenizer}")
    config = model.config
    return model, f"the model of {artifact} ({config.num_layers} layers, {config.model_dim}d)"
