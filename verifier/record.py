"""``python -m verifier check --record DIR``: check an upstream-style record folder against its own logs.

An upstream record folder holds the script (``train_gpt.py`` and any files it needs), the submitters' training
logs (``train_seed*.log``, ``*.txt``; upstream records ship no artifact) and ``submission.json`` with the claims.
Nothing in it is imported or executed. The check reads every log (both the March ``train_time:599544ms`` and the
April ``train_time: 599544ms`` / ``  world_size: 8`` formats, and the other spellings ``verifier.logs`` reads by
shape), then:

* ``record_logs``: which files are training logs, evaluation-only logs or not logs at all;
* ``train_time[LOG]``: the three-valued time verdict of every run in each training log (``verifier.wallclock``),
  plus the training time ``submission.json`` claims for that seed;
* ``train_environment``: the world size (and device, when printed) each training log states;
* ``record_sizes``: the sizes each log states against the 16,000,000-byte cap and against the per-seed claims;
* ``val_bpb[SEED]``: the claimed score of each seed is printed in that seed's log, at the claim's precision;
* ``val_bpb_mean``: the headline claim is the mean over seeds (of the claims, or of the logs' scores), or one
  log's score;
* ``code_bytes``: the code as readable source and as the submission counted it (the self-extracting wrapper file
  when the script is one, decoded statically by ``trainer.source_unwrap``; the compressed size when the logs
  report one);
* ``scan``: the static compliance scan of the folder (``verifier.scan``).

``check_record`` returns the rows plus the per-log facts (for ``bench/scan_corpus.py``); ``--json``/``--junit``
write the same shapes as the artifact check.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import statistics
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from trainer.limits import SUBMISSION_LIMIT_BYTES
from verifier.logs import MAX_LOG_BYTES, Figure, LogError, LogRun, parse_training_log, read_bounded_text
from verifier.report import FAIL, PASS, SKIP, CheckResult
from verifier.wallclock import TRAIN_LIMIT_MS, TimeVerdict, judge_steps, worst

LOG_SUFFIXES = (".log", ".txt")
MAX_LOG_DEPTH = 3  # folder levels under the record searched for logs (logs/, ttt_*/ …)
MAX_LOG_FILES = 1000  # a record has a handful; the rest of a larger folder is not read
ENTRY_POINT = "train_gpt.py"
_SEED_IN_NAME = re.compile(r"seed[_-]?(\d+)", re.I)
_SEED_KEY = re.compile(r"^(?:seed[_-]?)?(\d+)$", re.I)
_HEADLINE_BPB_KEYS = ("val_bpb", "val_bpb_mean", "mean_val_bpb", "mean_bpb")
_CODE_CLAIM_KEYS = ("bytes_code", "code_bytes", "wrapped_code_bytes")


@dataclass(frozen=True)
class Claim:
    """A number from submission.json with the precision it was written at."""

    value: float
    decimals: int
    key: str

    def agrees(self, printed: float, printed_decimals: int | None = None) -> bool:
        """Equal at the coarser of the two precisions (a claim rounded from the log, or the log rounded)."""
        decimals = self.decimals if printed_decimals is None else min(self.decimals, printed_decimals)
        return abs(printed - self.value) <= 0.5 * 10.0 ** -decimals + 1e-12


@dataclass
class SeedClaims:
    val_bpb: Claim | None = None
    artifact_bytes: int | None = None
    total_bytes: int | None = None
    train_time_ms: Claim | None = None  # value in ms; decimals in ms


@dataclass
class SubmissionClaims:
    headline_bpb: Claim | None = None
    per_seed: dict[int, SeedClaims] = field(default_factory=dict)
    unlabelled_bpb: list[Claim] = field(default_factory=list)  # per-seed scores listed without their seeds
    total_bytes: int | None = None
    code_bytes: Claim | None = None
    # Training times stated for the whole submission, by aggregate: "" (one run, or a nominal figure for every
    # seed), "mean", "max" or "min" (from key suffixes such as train_time_s_mean).
    train_times: dict[str, Claim] = field(default_factory=dict)
    track: str | None = None  # as declared ("10min_16mb", "non-record-unlimited-compute-16mb", …)


@dataclass
class RecordLog:
    path: str  # relative to the record folder
    kind: str  # "training log" | "evaluation log" | "not a log" | "unreadable"
    seed: int | None = None
    runs: list[LogRun] = field(default_factory=list)
    verdicts: list[TimeVerdict] = field(default_factory=list)  # one per timed run
    error: str | None = None

    @property
    def formats(self) -> set[str]:
        found = set()
        for run in self.runs:
            for separator in run.time_separators:
                found.add("April" if separator.endswith(": ") else "March")
        return found

    def figures(self) -> list[Figure]:
        return [figure for run in self.runs for figure in run.bpb]

    @property
    def score(self) -> Figure | None:
        scored = [run.score for run in self.runs if run.score is not None]
        return scored[-1] if scored else None

    def to_dict(self) -> dict[str, Any]:
        runs = []
        for index, run in enumerate(self.runs):
            final = run.final
            verdict = self.verdicts[index] if index < len(self.verdicts) and run.steps else None
            runs.append({
                "train_time_ms": final.time_ms if final else None,
                "final_step": final.step if final else None,
                "time_line": final.text if final else None,
                "verdict": verdict.status if verdict else None,
                "overshoot_ms": verdict.overshoot_ms if verdict else None,
                "pace_ms": verdict.pace_ms if verdict else None,
                "reason": verdict.reason if verdict else None,
                "world_size": run.world_size, "seed": run.seed, "device": run.device,
                "score": run.score.value if run.score else None,
                "artifact_bytes": run.artifact_bytes, "total_bytes": run.total_bytes, "code_bytes": run.code_bytes,
                "time_separators": sorted(run.time_separators),
            })
        return {"path": self.path, "kind": self.kind, "seed": self.seed, "formats": sorted(self.formats),
                "error": self.error, "runs": runs}


@dataclass
class RecordCheck:
    folder: Path
    results: list[CheckResult]
    logs: list[RecordLog]
    claims: SubmissionClaims | None

    def to_dict(self) -> dict[str, Any]:
        return {"record": str(self.folder), "logs": [log.to_dict() for log in self.logs],
                "checks": [result.to_dict() for result in self.results]}


# ----------------------------------------------------------------------------------------------------------------
# Reading the folder


def find_logs(folder: Path) -> list[Path]:
    """Every ``*.log``/``*.txt`` up to ``MAX_LOG_DEPTH`` folders deep, in name order; links are not followed."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        depth = len(Path(root).relative_to(folder).parts)
        if depth >= MAX_LOG_DEPTH:
            dirs[:] = []
        found += [Path(root) / name for name in files if Path(name).suffix.lower() in LOG_SUFFIXES]
    found.sort()
    return found[:MAX_LOG_FILES]


def _regular_file(path: Path) -> bool:
    """A plain file, not a link, FIFO or device (reading /dev/zero through a link would never end)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def read_record_log(path: Path, folder: Path) -> RecordLog:
    relative = str(path.relative_to(folder))
    if not _regular_file(path):
        return RecordLog(relative, "unreadable", error="not a regular file (a link, FIFO or device): not read")
    try:
        runs = parse_training_log(read_bounded_text(path))
    except (OSError, LogError) as exc:
        return RecordLog(relative, "unreadable", error=str(exc))
    timed = any(run.steps or run.step_lines for run in runs)
    kind = "training log" if timed else ("evaluation log" if any(run.bpb for run in runs) else "not a log")
    seeds = [run.seed for run in runs if run.seed is not None]
    named = _SEED_IN_NAME.search(path.name)
    seed = seeds[-1] if seeds else (int(named.group(1)) if named else None)
    verdicts = [judge_steps(run.steps) for run in runs] if timed else []
    return RecordLog(relative, kind, seed, runs, verdicts)


def read_claims(document: Any) -> SubmissionClaims:
    """The claims of a submission.json, whichever of the spellings seen upstream it uses."""
    claims = SubmissionClaims()
    if not isinstance(document, dict):
        return claims
    for key in _HEADLINE_BPB_KEYS:
        claim = _claim(document.get(key), key)
        if claim is not None:
            claims.headline_bpb = claim
            break
    claims.total_bytes = _count(document.get("bytes_total"))
    if isinstance(document.get("track"), str):
        claims.track = document["track"][:100]
    for key in _CODE_CLAIM_KEYS:
        claim = _claim(document.get(key), key)
        if claim is not None:
            claims.code_bytes = claim
            break
    for key, value in document.items():
        aggregate = next((a for a in ("mean", "max", "min") if key.endswith(f"_{a}")), "")
        claim = _time_claim(value, key.removesuffix(f"_{aggregate}") if aggregate else key)
        if claim is not None:
            claims.train_times.setdefault(aggregate, claim)
    order = [int(s) for s in document.get("seeds", []) if isinstance(s, int) and not isinstance(s, bool)] \
        if isinstance(document.get("seeds"), list) else []
    for key, value in document.items():
        if isinstance(value, dict) and value and all(_SEED_KEY.match(str(k)) for k in value):
            for seed_key, entry in value.items():
                seed = int(_SEED_KEY.match(str(seed_key)).group(1))  # type: ignore[union-attr]
                _seed_entry(claims.per_seed.setdefault(seed, SeedClaims()), key, entry)
        elif isinstance(value, list) and value and key != "seeds" and all(_is_number(v) for v in value):
            if "bpb" in key or "score" in key:
                listed = [c for c in (_claim(v, key) for v in value) if c is not None]
                if len(order) == len(listed):
                    for seed, claim in zip(order, listed, strict=True):
                        claims.per_seed.setdefault(seed, SeedClaims()).val_bpb = claim
                else:
                    claims.unlabelled_bpb = listed
        elif key == "seeds" and isinstance(value, list) and value and all(isinstance(v, Decimal) for v in value):
            claims.unlabelled_bpb = [c for c in (_claim(v, key) for v in value) if c is not None]
    return claims


def _seed_entry(target: SeedClaims, table: str, entry: Any) -> None:
    if isinstance(entry, dict):
        target.val_bpb = target.val_bpb or _claim(entry.get("val_bpb"), "val_bpb")
        for name, value in entry.items():
            if name == "artifact_bytes" or name.startswith("bytes_model"):
                target.artifact_bytes = _count(value)
            elif name == "bytes_total":
                target.total_bytes = _count(value)
            elif _time_unit(name) is not None:
                target.train_time_ms = _time_claim(value, name)
        return
    table_name = table.lower()
    if any(word in table_name for word in ("bytes", "size")):
        target.artifact_bytes = _count(entry)
    elif _time_unit(table_name) is not None:
        target.train_time_ms = _time_claim(entry, table_name)
    elif not any(word in table_name for word in ("time", "loss")):  # val_bpb_seeds, seed_results, …
        target.val_bpb = target.val_bpb or _claim(entry, table)


def _time_unit(name: str) -> float | None:
    """ms per unit of a training-time field name (train_time_ms, train_s, wallclock_seconds, …); None for any
    other field, and for a bare name whose unit is not written (training_time: 600 could be s or min)."""
    name = name.lower()
    if not name.startswith(("train", "wallclock")) or "ttt" in name or "eval" in name:
        return None
    if name.endswith("_ms"):
        return 1.0
    if name.endswith(("_s", "_seconds", "_sec")):
        return 1000.0
    return None


def _time_claim(value: Any, name: str) -> Claim | None:
    unit = _time_unit(name)
    claim = _claim(value, name)
    if claim is None or unit is None:
        return None
    # 599.46 s is a claim to the nearest 10 ms: the precision carries over in negative decimals.
    return Claim(claim.value * unit, claim.decimals - round(math.log10(unit)), name)


def _claim(value: Any, key: str) -> Claim | None:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        # An integral float ("600.0") is how JSON writers print a whole number, not a claim to 0.1.
        decimals = 0 if value == value.to_integral_value() else max(-int(value.as_tuple().exponent), 0)
        return Claim(float(value), decimals, key)
    return Claim(float(value), 0, key)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------------------
# The checks


def check_record(folder: Path, *, strict: bool = False, scan: bool = True) -> RecordCheck:
    """Every check of a record folder; ``strict`` turns the WARN of a final-step overshoot into FAIL.

    ``scan=False`` leaves the scan row SKIP, for callers that scan the folder themselves (bench/scan_corpus.py).
    """
    logs = [read_record_log(path, folder) for path in find_logs(folder)]
    document, problem = _read_submission(folder)
    claims = read_claims(document) if document is not None else None
    training = [log for log in logs if log.kind == "training log"]
    results = [_check_logs(logs), _check_submission(problem)]
    results += [_check_log_time(log, claims, strict) for log in training]
    results += [_check_time_claims(training, claims), _check_environment(training), _check_sizes(logs, claims)]
    results += _check_seed_scores(logs, claims)
    results += [_check_mean(logs, claims), _check_code_bytes(folder, logs, claims),
                _check_scan(folder) if scan else CheckResult("scan", SKIP, "", "not run by this caller")]
    return RecordCheck(folder, results, logs, claims)


def _read_submission(folder: Path) -> tuple[Any, str]:
    path = folder / "submission.json"
    if not path.exists() and not path.is_symlink():
        return None, "no submission.json in the folder"
    if not _regular_file(path):
        return None, "submission.json is not a regular file (a link, FIFO or device): not read"
    try:
        return json.loads(read_bounded_text(path), parse_float=Decimal), ""
    except (OSError, LogError, ValueError, RecursionError) as exc:
        return None, f"submission.json does not parse: {exc}"


def _check_logs(logs: list[RecordLog]) -> CheckResult:
    by_kind: dict[str, list[RecordLog]] = {}
    for log in logs:
        by_kind.setdefault(log.kind, []).append(log)
    training = by_kind.get("training log", [])
    formats = {name: sum(1 for log in training if name in log.formats) for name in ("March", "April")}
    parts = [f"{len(training)} training log(s) ({formats['March']} March format, {formats['April']} April format)"]
    if by_kind.get("evaluation log"):
        parts.append(f"{len(by_kind['evaluation log'])} evaluation log(s)")
    if by_kind.get("not a log"):
        parts.append("not logs: " + ", ".join(log.path for log in by_kind["not a log"]))
    figure = "; ".join(parts)
    if by_kind.get("unreadable"):
        return CheckResult("record_logs", FAIL, figure,
                           "; ".join(f"{log.path}: {log.error}" for log in by_kind["unreadable"]))
    if not training:
        return CheckResult("record_logs", FAIL, figure, "no training log in the folder: nothing shows the run")
    return CheckResult("record_logs", PASS, figure)


def _check_submission(problem: str) -> CheckResult:
    if problem:
        return CheckResult("submission_json", FAIL, "", problem)
    return CheckResult("submission_json", PASS, "submission.json read")


def _check_log_time(log: RecordLog, claims: SubmissionClaims | None, strict: bool) -> CheckResult:
    name = f"train_time[{log.path}]"
    timed = [(run, verdict) for run, verdict in zip(log.runs, log.verdicts, strict=True) if run.steps]
    if not timed:
        return CheckResult(name, FAIL, f"{sum(run.step_lines for run in log.runs)} step line(s), none timed",
                           "the log shows training steps but states no training time the verifier can read "
                           "(train_time:…ms, train_time: …m, stopping_early …)")
    verdict = worst([v for _, v in timed])
    if strict:
        verdict = verdict.strict()
    figures = []
    for run, run_verdict in timed:
        final = run.final
        assert final is not None
        relation = ">" if final.time_ms > TRAIN_LIMIT_MS else "<="
        over = f", {run_verdict.overshoot_ms:.0f} ms over" if run_verdict.overshoot_ms else ""
        figures.append(f"{final.time_ms:,.0f} ms {relation} {TRAIN_LIMIT_MS:,.0f} ms at step {final.step}{over} "
                       f"(line {final.line}: {final.text[:80]})")
    figure = "; ".join(figures) if len(figures) == 1 else f"{len(figures)} runs: " + "; ".join(figures)
    reasons = [verdict.reason] if verdict.reason else []
    status = verdict.status
    if status != PASS and claims is not None and claims.track and "non" in claims.track.replace("_", "-"):
        # The verdict stays the 600 s one; the reader should know the submission does not claim that track.
        reasons.append(f"submission.json declares track {claims.track!r}, not the 10-minute record track")
    seed_claim = claims.per_seed.get(log.seed) if claims and log.seed is not None else None
    if seed_claim and seed_claim.train_time_ms is not None:
        stated = timed[-1][0].final.time_ms  # type: ignore[union-attr]
        claim = seed_claim.train_time_ms
        if claim.agrees(stated):
            figure += f"; submission.json {claim.key} agrees"
        else:
            status = FAIL
            reasons.append(f"submission.json {claim.key} says {claim.value:.0f} ms for seed {log.seed}, the log "
                           f"{stated:.0f} ms")
    return CheckResult(name, status, figure, "; ".join(reasons))


def _check_time_claims(training: list[RecordLog], claims: SubmissionClaims | None) -> CheckResult:
    """The training time submission.json states for the whole submission, against the logs' final times."""
    if claims is None or not claims.train_times:
        return CheckResult("train_time_claims", SKIP, "", "submission.json states no training time with a unit")
    by_seed: dict[object, float] = {}
    for log in training:
        finals = [run.final.time_ms for run in log.runs if run.final is not None]
        if finals:
            by_seed[log.seed if log.seed is not None else log.path] = finals[-1]
    if not by_seed:
        return CheckResult("train_time_claims", SKIP, "", "no log states a training time")
    times = list(by_seed.values())
    observed = {"mean": statistics.fmean(times), "max": max(times), "min": min(times)}
    parts, problems = [], []
    for aggregate, claim in claims.train_times.items():
        if aggregate:
            agrees = claim.agrees(observed[aggregate])
            seen = f"the {aggregate} over {len(times)} seed log(s) is {observed[aggregate]:,.0f} ms"
        else:
            agrees = any(claim.agrees(t) for t in times)
            seen = f"the logs state {', '.join(f'{t:,.0f}' for t in times)} ms"
        parts.append(f"{claim.key} {claim.value:,.0f} ms {'agrees' if agrees else 'disagrees'}")
        if not agrees:
            problems.append(f"{claim.key} says {claim.value:,.0f} ms; {seen}")
    return CheckResult("train_time_claims", FAIL if problems else PASS, "; ".join(parts), "; ".join(problems))


def _check_environment(training: list[RecordLog]) -> CheckResult:
    if not training:
        return CheckResult("train_environment", SKIP, "", "no training log")
    parts, missing = [], []
    worlds: set[int] = set()
    for log in training:
        stated = sorted({run.world_size for run in log.runs if run.world_size is not None})
        devices = sorted({run.device for run in log.runs if run.device})
        worlds.update(stated)
        if not stated:
            missing.append(log.path)
        parts.append(f"{log.path}: world_size {','.join(map(str, stated)) or '?'}"
                     + (f", {', '.join(devices)}" if devices else ""))
    figure = "; ".join(parts)
    if missing:
        return CheckResult("train_environment", FAIL, figure, f"no world size stated in {', '.join(missing)}")
    note = "" if len(worlds) == 1 else f"the logs state different world sizes: {sorted(worlds)}"
    return CheckResult("train_environment", PASS, figure, note)


def _check_sizes(logs: list[RecordLog], claims: SubmissionClaims | None) -> CheckResult:
    problems, parts, notes = [], [], []
    log_totals = {}
    for log in logs:
        run = next((r for r in reversed(log.runs) if r.total_bytes is not None or r.artifact_bytes is not None),
                   None)
        if run is None:
            continue
        if run.total_bytes is not None:
            log_totals[log.path] = run.total_bytes
            parts.append(f"{log.path}: total {run.total_bytes:,}")
            if run.total_bytes > SUBMISSION_LIMIT_BYTES:
                problems.append(f"{log.path} states a submission of {run.total_bytes:,} bytes, over "
                                f"{SUBMISSION_LIMIT_BYTES:,}")
        seed_claim = claims.per_seed.get(log.seed) if claims and log.seed is not None else None
        if seed_claim is None:
            continue
        # Submitters call the whole submission "artifact_bytes" as often as the model alone: a claimed size
        # agrees when it is one of the sizes the log states.
        stated = {n for n in (run.total_bytes, run.artifact_bytes) if n is not None}
        for claimed in (seed_claim.total_bytes, seed_claim.artifact_bytes):
            if claimed is not None and stated and claimed not in stated:
                problems.append(f"seed {log.seed}: submission.json claims {claimed:,} bytes, {log.path} states "
                                f"{' and '.join(f'{n:,}' for n in sorted(stated))}")
    if claims is not None and claims.total_bytes is not None:
        parts.insert(0, f"submission.json bytes_total {claims.total_bytes:,}")
        if claims.total_bytes > SUBMISSION_LIMIT_BYTES:
            problems.append(f"submission.json claims {claims.total_bytes:,} bytes, over {SUBMISSION_LIMIT_BYTES:,}")
        elif log_totals and claims.total_bytes not in log_totals.values():
            notes.append("bytes_total is none of the logs' totals (a mean or another run)")
    if not parts:
        return CheckResult("record_sizes", SKIP, "", "neither the logs nor submission.json state a size")
    status = FAIL if problems else PASS
    return CheckResult("record_sizes", status, "; ".join(parts), "; ".join(problems + notes))


def _logs_of_seed(logs: list[RecordLog], seed: int) -> list[RecordLog]:
    return [log for log in logs if log.seed == seed and log.kind in ("training log", "evaluation log")]


def _printed(claim: Claim, logs: list[RecordLog]) -> tuple[RecordLog, Figure] | None:
    for log in logs:
        for figure in reversed(log.figures()):
            if claim.agrees(figure.value, figure.decimals):
                return log, figure
    return None


def _check_seed_scores(logs: list[RecordLog], claims: SubmissionClaims | None) -> list[CheckResult]:
    if claims is None:
        return []
    results = []
    for seed, seed_claims in sorted(claims.per_seed.items()):
        claim = seed_claims.val_bpb
        if claim is None:
            continue
        name = f"val_bpb[seed {seed}]"
        own = _logs_of_seed(logs, seed)
        if not own:
            results.append(CheckResult(name, SKIP, f"claimed {claim.value}", f"no log of seed {seed}"))
            continue
        found = _printed(claim, own)
        if found is None:
            scores = ", ".join(f"{log.path} {log.score.value}" for log in own if log.score) or "none"
            results.append(CheckResult(name, FAIL, f"claimed {claim.value} ({claim.key})",
                                       f"not printed in the log(s) of seed {seed}; their final scores: {scores}"))
            continue
        log, figure = found
        results.append(CheckResult(name, PASS, f"claimed {claim.value} = {log.path} line {figure.line}: "
                                               f"{figure.text[:80]}"))
    return results


def _check_mean(logs: list[RecordLog], claims: SubmissionClaims | None) -> CheckResult:
    if claims is None or claims.headline_bpb is None:
        return CheckResult("val_bpb_mean", SKIP, "", "submission.json claims no val_bpb")
    headline = claims.headline_bpb
    figure = f"claimed {headline.key} {headline.value}"
    seed_claims = [c.val_bpb for c in claims.per_seed.values() if c.val_bpb is not None] or claims.unlabelled_bpb
    if seed_claims:
        mean = statistics.fmean(c.value for c in seed_claims)
        if headline.agrees(mean):
            return CheckResult("val_bpb_mean", PASS, f"{figure} = mean of {len(seed_claims)} per-seed claims "
                                                     f"{mean:.8f}")
    by_seed: dict[int | str, float] = {}  # one score per seed (a log without a seed counts on its own)
    for log in logs:
        if log.score is None or log.kind == "not a log":
            continue
        claim = claims.per_seed.get(log.seed, SeedClaims()).val_bpb if log.seed is not None else None
        found = _printed(claim, [log]) if claim else None
        by_seed[log.seed if log.seed is not None else log.path] = found[1].value if found else log.score.value
    if by_seed:
        mean = statistics.fmean(by_seed.values())
        if headline.agrees(mean):
            return CheckResult("val_bpb_mean", PASS, f"{figure} = mean of {len(by_seed)} logs' scores {mean:.8f}")
    single = _printed(headline, [log for log in logs if log.kind != "not a log"])
    if single is not None:
        log, printed = single
        return CheckResult("val_bpb_mean", PASS, f"{figure} = {log.path} line {printed.line}: {printed.text[:80]}",
                           "the headline is one log's score, not a mean over seeds")
    means = []
    if seed_claims:
        means.append(f"per-seed claims average {statistics.fmean(c.value for c in seed_claims):.8f}")
    if by_seed:
        means.append(f"the logs' scores average {statistics.fmean(by_seed.values()):.8f}")
    return CheckResult("val_bpb_mean", FAIL, figure,
                       "the headline is neither the mean over seeds nor printed in a log"
                       + (f" ({'; '.join(means)})" if means else ""))


def _check_code_bytes(folder: Path, logs: list[RecordLog], claims: SubmissionClaims | None) -> CheckResult:
    """The code as readable source and as the submission counted it; informational unless the script is missing.

    Upstream counts the bytes of ``train_gpt.py`` as shipped, so a self-extracting wrapper counts as the wrapper
    file; some later scripts count their own compressed source instead (``Code size (compressed)``). Each figure
    the logs or submission.json state is matched to what it equals."""
    from trainer.source_unwrap import UnwrapError, unwrap

    entry = folder / ENTRY_POINT
    if not _regular_file(entry):
        return CheckResult("code_bytes", FAIL, "", f"no {ENTRY_POINT} in the folder (or not a regular file)")
    on_disk = entry.stat().st_size
    if on_disk > MAX_LOG_BYTES:
        return CheckResult("code_bytes", FAIL, f"{ENTRY_POINT} {on_disk:,} bytes",
                           f"over {MAX_LOG_BYTES:,} bytes: not a training script")
    readable_bytes: int | None = None
    notes: list[str] = []
    try:
        unwrapped = unwrap(entry.read_bytes().decode("utf-8-sig"))
        readable_bytes = len(unwrapped.source.encode("utf-8"))
        wrapper = (f"self-extracting: {' > '.join(layer.describe() for layer in unwrapped.layers)}"
                   if unwrapped.layers else "plain source")
        notes += unwrapped.notes
    except (UnicodeDecodeError, SyntaxError, UnwrapError, RecursionError, ValueError) as exc:
        wrapper = f"not decoded: {type(exc).__name__}: {exc}"
    readable = f"{readable_bytes:,} bytes of readable source" if readable_bytes is not None else "readable size unknown"
    figure = f"{ENTRY_POINT} {on_disk:,} bytes as submitted ({wrapper}), {readable}"

    def what(nbytes: int) -> str:
        if nbytes == on_disk:
            return "= as submitted"
        if nbytes == readable_bytes:
            return "= readable source"
        return "= neither"

    counted: dict[str, int] = {}
    for log in logs:
        for run in log.runs:
            for label, nbytes in run.code_bytes.items():
                counted.setdefault(f"logs 'Code size{f' ({label})' if label else ''}'", nbytes)
    if claims is not None and claims.code_bytes is not None:
        counted[f"submission.json {claims.code_bytes.key}"] = int(claims.code_bytes.value)
    if counted:
        figure += "; counted: " + ", ".join(f"{label} {n:,} ({what(n)})" for label, n in counted.items())
    others = sorted(p for p in folder.glob("*.py") if p.name != ENTRY_POINT)
    if others:
        figure += "; other Python files: " + ", ".join(f"{p.name} {p.stat().st_size:,}" for p in others)
    return CheckResult("code_bytes", PASS, figure, "; ".join(notes))


def _check_scan(folder: Path) -> CheckResult:
    """The folder scan of ``verifier scan DIR``: the entry point and every file it reaches."""
    from verifier import scan

    reports = scan.scan_paths([folder])
    code = scan.exit_code(reports)
    findings = [(report.path, f) for report in reports for f in report.findings]
    high = [(path, f) for path, f in findings if f.confidence == "high"]
    scanned = ", ".join(f"{Path(report.path).name}{f' ({report.via})' if report.via else ''}" for report in reports)
    figure = f"{len(reports)} file(s) scanned: {scanned}; {len(findings)} finding(s), {len(high)} high"
    if code == scan.EXIT_UNREADABLE:
        errors = "; ".join(f"{Path(report.path).name}: {report.error}" for report in reports if report.error)
        return CheckResult("scan", FAIL, figure, f"unreadable: {errors}")
    if high:
        path, first = high[0]
        return CheckResult("scan", FAIL, figure, f"{first.pattern} {first.condition} at {Path(path).name} line "
                                                 f"{first.line}: {first.explanation}")
    return CheckResult("scan", PASS, figure)
