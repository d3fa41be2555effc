"""``python -m verifier scan FILE...``: static compliance scan of upstream-style ``train_gpt.py`` submissions.

The scanner parses each file with ``ast`` (it never imports or executes it), peels self-extracting lzma / zlib /
base85 / base64 wrappers statically (``scan_unwrap``), runs a label-based data-flow analysis over the decoded code
(``scan_flow``) and reports the violation patterns of the compliance rules:

====  ==========  ==============================================================================
P1    C1+C2       the target token hashed into an n-gram lookup key whose count becomes a score
P2    C2          the gold token's probability mixed alone, with no full-vocabulary distribution
P3    C3 / C4     adaptation on validation tokens before they are scored, discarded score phases,
                  final-epoch scoring, rescoring, caches filled from the whole stream, min over passes
P4    data        calibration or training on validation data
P5    metric      a hard-coded bytes-per-token constant in the bits-per-byte formula
====  ==========  ==============================================================================

Every finding carries a confidence. ``high`` means the code shape is the one the organisers ruled against and it
runs under the script's defaults; findings in code that nothing calls, or in a branch that the defaults route
around, are lowered. Exit status: 0 when no high-confidence finding, 1 when at least one, 2 when an input could
not be read, parsed or decoded (this takes precedence: an unreadable submission is not a clean one).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from verifier.scan_findings import CONFIDENCES, PATTERNS, Finding
from verifier.scan_rules import analyse_source
from verifier.scan_unwrap import UnwrapError, unwrap

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_UNREADABLE = 2

# Submissions are capped at 16 MB in total; anything far larger is not a training script.
MAX_INPUT_BYTES = 64 * 1024 * 1024


@dataclass
class FileReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # decoded wrapper layers, outermost first
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "error": self.error,
            "layers": self.layers,
            "notes": self.notes,
            "findings": [finding.to_dict() for finding in self.findings],
        }


def scan_source(source: str, filename: str = "<string>") -> FileReport:
    """Scan source text. Wrapper decoding and parse errors are reported in ``FileReport.error``."""
    report = FileReport(path=filename)
    try:
        unwrapped = unwrap(source)
        origin = " > ".join(layer.describe() for layer in unwrapped.layers) or None
        report.layers = [layer.describe() for layer in unwrapped.layers]
        report.notes = list(unwrapped.notes)
        report.findings = analyse_source(
            unwrapped.source, filename, origin, unwrapped.env_overrides, unwrapped.tree
        )
    except SyntaxError as exc:
        report.error = f"file is not valid Python: {exc.msg} (line {exc.lineno})"
    except UnwrapError as exc:
        report.error = str(exc)
    except RecursionError:
        report.error = "source nests too deeply to analyse"
    return report


def scan_file(path: Path) -> FileReport:
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            return FileReport(path=str(path), error=f"file is {size} bytes, over the {MAX_INPUT_BYTES}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        return FileReport(path=str(path), error=f"cannot read: {exc.strerror or exc}")
    try:
        source = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return FileReport(path=str(path), error=f"not UTF-8 text: {exc.reason} at byte {exc.start}")
    return scan_source(source, str(path))


def exit_code(reports: list[FileReport]) -> int:
    if any(report.error for report in reports):
        return EXIT_UNREADABLE
    if any(finding.confidence == "high" for report in reports for finding in report.findings):
        return EXIT_FINDINGS
    return EXIT_CLEAN


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def render_table(reports: list[FileReport]) -> str:
    lines: list[str] = []
    for report in reports:
        header = report.path + (f"  [decoded: {' > '.join(report.layers)}]" if report.layers else "")
        lines.append(header)
        if report.error:
            lines.append(f"  ERROR  {report.error}")
        for note in report.notes:
            lines.append(f"  note   {note}")
        if not report.findings and not report.error:
            lines.append("  no findings")
        for finding in sorted(report.findings, key=Finding.sort_key):
            lines.append(
                f"  {finding.pattern:<3} {finding.condition:<6} {finding.confidence:<6} "
                f"line {finding.line:<6} {_shorten(finding.code, 90)}"
            )
            lines.append(f"{'':>8}{finding.explanation}")
        lines.append("")
    counts = Counter(f.confidence for report in reports for f in report.findings)
    errors = sum(1 for report in reports if report.error)
    summary = ", ".join(f"{counts.get(level, 0)} {level}" for level in reversed(CONFIDENCES))
    lines.append(f"{len(reports)} file(s): {summary}" + (f", {errors} unreadable" if errors else ""))
    return "\n".join(lines)


def render_json(reports: list[FileReport]) -> str:
    counts = Counter(f.confidence for report in reports for f in report.findings)
    document = {
        "files": [report.to_dict() for report in reports],
        "summary": {level: counts.get(level, 0) for level in reversed(CONFIDENCES)},
        "patterns": PATTERNS,
        "exit_code": exit_code(reports),
    }
    return json.dumps(document, indent=2)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="static compliance scan of train_gpt.py submissions",
        description="Static (AST) scan of upstream-style train_gpt.py files for the known violation patterns "
        "P1-P5. Self-extracting lzma/zlib/base85/base64 wrappers are decoded without executing them. Exit 0: no "
        "high-confidence finding; 1: at least one; 2: an input could not be read or decoded.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="train_gpt.py files to scan")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reports = [scan_file(path) for path in args.files]
    sys.stdout.write((render_json(reports) if args.json else render_table(reports)) + "\n")
    return exit_code(reports)
