"""Honest vs claimed: two evaluations of one artifact side by side, as a table and as a per-chunk bpb picture.

The project was founded on one comparison: what the seed submission's method claims on an artifact (the
``hashed-940`` reproduction of PR #940's scoring) against what a compliant evaluation of the same artifact gives.
``compare_reports`` builds it from the two evaluations' event streams (NDJSON reports of ``python -m service
evaluate``, or a service job's stored events); ``render_markdown`` writes the table and ``render_plot`` the
picture, both for ``python -m verifier compare`` and for the service's ``/comparisons`` routes.

The C1–C4 columns come from the verifier's black-box probes when the caller ran them (``verifier compare``);
otherwise they are the verdicts of service/judge.py as the evaluation's end event carries them, and the table
says which.
Torch-free: the HTTP service imports this module; matplotlib is imported only to draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from service.judge import condition_verdicts

# PR #940's method as far as the engine runs it: its TTT recipe (score-first here: the engine cannot train before it
# scores, which is what the upstream code did, reference §7.4) and its target-keyed hashed n-gram cache.
CLAIMED_OPTIONS: dict[str, Any] = {"ttt": True, "ttt_recipe": "pr940", "ngram": "hashed-940"}
CONDITIONS = ("C1", "C2", "C3", "C4")
CONDITION_NAMES = {"C1": "causal", "C2": "full normalised distribution", "C3": "score before update",
                   "C4": "single pass"}


class ComparisonError(ValueError):
    """The two evaluations cannot be compared (not finished, or not of the same artifact)."""


@dataclass(frozen=True)
class ChunkPoint:
    target_lo: int
    target_hi: int
    bpb: float | None


@dataclass(frozen=True)
class EvaluationSide:
    """One evaluation as the comparison shows it."""

    label: str  # "compliant default" | "claimed (hashed-940)" | a job id
    method: str  # e.g. "ttt legal-sgd + ngram smoothed"
    artifact_sha256: str | None
    status: str  # the terminal event's type
    val_bpb: float | None
    targets_scored: int | None
    elapsed_s: float | None
    compliant: bool | None
    probability_sum: dict[str, Any]  # measured Σ_v p(v) of the scored distribution: min, max, positions
    conditions: dict[str, str]  # C1..C4 -> PASS | FAIL | "n/a"
    conditions_source: str  # "verifier probes" | "engine self-check"
    chunks: list[ChunkPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_method(config: dict[str, Any]) -> str:
    ttt = f"score-first TTT {config.get('ttt_recipe')}" if config.get("ttt") else "no TTT"
    return f"{ttt} + ngram {config.get('ngram')}, seq {config.get('seq_len')} / stride {config.get('stride')}"


def summarize(events: Sequence[dict[str, Any]], label: str,
              probe_verdicts: dict[str, str] | None = None) -> EvaluationSide:
    """One side of the comparison from an evaluation's events (start, chunk…, terminal; a leading `queued`
    event of the service is skipped)."""
    start = next((e for e in events if e.get("type") == "start"), None)
    terminal = next((e for e in reversed(events) if e.get("type") in ("end", "timeout", "error")), None)
    if start is None or terminal is None:
        raise ComparisonError(f"{label}: the evaluation has no start or no terminal event yet")
    compliance = terminal.get("compliance") or {}
    chunks = [ChunkPoint(int(e["target_range"][0]), int(e["target_range"][1]), e.get("chunk_bpb"))
              for e in events if e.get("type") == "chunk"]
    sums = (compliance.get("ngram") or {}).get("probability_sum") or {}
    return EvaluationSide(
        label=label, method=describe_method(start.get("config") or {}), artifact_sha256=start.get("artifact_sha256"),
        status=str(terminal.get("type")), val_bpb=terminal.get("val_bpb", terminal.get("partial_val_bpb")),
        targets_scored=terminal.get("targets_scored"), elapsed_s=terminal.get("elapsed_s"),
        compliant=compliance.get("compliant"), probability_sum=dict(sums),
        conditions=dict(probe_verdicts) if probe_verdicts else condition_verdicts(compliance),
        conditions_source="verifier probes" if probe_verdicts else "engine self-check", chunks=chunks)


def compare_reports(honest: EvaluationSide, claimed: EvaluationSide) -> dict[str, Any]:
    """The comparison as JSON-ready data; refused unless both sides evaluated the same artifact."""
    if honest.artifact_sha256 != claimed.artifact_sha256:
        raise ComparisonError(f"the evaluations are of different artifacts ({str(honest.artifact_sha256)[:12]}… "
                              f"and {str(claimed.artifact_sha256)[:12]}…); a comparison needs one artifact")
    gap = (claimed.val_bpb - honest.val_bpb
           if honest.val_bpb is not None and claimed.val_bpb is not None else None)
    return {"format": "pgolf-comparison/1", "artifact_sha256": honest.artifact_sha256,
            "claimed_minus_honest_bpb": gap, "sides": [honest.to_dict(), claimed.to_dict()]}


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table_rows(comparison: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, first side, second side) rows of the side-by-side table."""
    first, second = comparison["sides"]

    def sums(side: dict[str, Any]) -> str:
        ps = side["probability_sum"]
        if not ps or ps.get("max") is None:
            return "–"
        return f"[{ps['min']:.7g}, {ps['max']:.7g}] at {ps.get('positions', 0):,} positions"

    rows = [("method", first["method"], second["method"]),
            ("status", first["status"], second["status"]),
            ("val_bpb", _fmt(first["val_bpb"]), _fmt(second["val_bpb"])),
            ("compliant (engine)", _fmt(first["compliant"]), _fmt(second["compliant"])),
            ("measured Σp over the vocabulary", sums(first), sums(second))]
    for condition in CONDITIONS:
        rows.append((f"{condition} {CONDITION_NAMES[condition]} ({first['conditions_source']})",
                     first["conditions"].get(condition, "n/a"), second["conditions"].get(condition, "n/a")))
    rows += [("targets scored", _fmt(first["targets_scored"]), _fmt(second["targets_scored"])),
             ("eval seconds", _fmt(first["elapsed_s"], 1), _fmt(second["elapsed_s"], 1))]
    return rows


def render_markdown(comparison: dict[str, Any]) -> str:
    first, second = comparison["sides"]
    lines = [f"| artifact {str(comparison['artifact_sha256'])[:12]}… | {first['label']} | {second['label']} |",
             "|---|---|---|"]
    lines += [f"| {what} | {a} | {b} |" for what, a, b in table_rows(comparison)]
    gap = comparison["claimed_minus_honest_bpb"]
    if gap is not None:
        lines.append("")
        lines.append(f"{second['label']} minus {first['label']}: {gap:+.6f} bpb")
    return "\n".join(lines) + "\n"


def render_plot(comparison: dict[str, Any], image_format: str) -> bytes:
    """Per-chunk bpb of both sides against the target position, as PNG or SVG bytes (matplotlib, Agg)."""
    if image_format not in ("png", "svg"):
        raise ValueError(f"image format must be png or svg, got {image_format!r}")
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: the service and CI render headless
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), dpi=110, layout="constrained")
    axes = figure.subplots()
    for side, colour in zip(comparison["sides"], ("#1a7f37", "#cf222e"), strict=True):
        xs: list[float] = []
        ys: list[float] = []
        for point in side["chunks"]:
            if point["bpb"] is None:
                continue
            xs += [point["target_lo"], point["target_hi"]]
            ys += [point["bpb"], point["bpb"]]
        label = f"{side['label']}: {_fmt(side['val_bpb'], 4)} bpb" + ("" if side["compliant"] else " (not valid)")
        axes.plot(xs, ys, color=colour, linewidth=1.6, label=label)
    axes.set_xlabel("target position (each flat segment is one chunk)")
    axes.set_ylabel("bits per byte of the chunk")
    axes.set_title(f"honest vs claimed on artifact {str(comparison['artifact_sha256'])[:12]}…", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    # SVG text stays text (searchable, testable); the metadata date would make two renders differ.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format=image_format, metadata={"Date": None} if image_format == "svg" else None)
    return buffer.getvalue()
