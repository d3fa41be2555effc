"""``python -m verifier scan PATH...``: static compliance scan of upstream-style submissions (files or record folders).

The scanner parses each file with ``ast`` (it never imports or executes it), peels self-extracting lzma / zlib /
base85 / base64 wrappers statically (``trainer.source_unwrap``), runs a label-based data-flow analysis over the
decoded code (``scan_flow``) and reports the violation patterns of the compliance rules:

====  ==========  ==============================================================================
P1    C1+C2       the target token hashed into an n-gram lookup key whose count becomes a score
P2    C2          the gold token's probability mixed alone, with no full-vocabulary distribution
P3    C3 / C4     adaptation on validation tokens before they are scored, discarded score phases,
                  final-epoch scoring, rescoring, caches filled from the whole stream, min over passes
P4    data        calibration or training on validation data
P5    metric      a hard-coded bytes-per-token constant in the bits-per-byte formula
====  ==========  ==============================================================================

A PATH that is a record folder is scanned from its entry point (``train_gpt.py``) through every Python file of
the folder that it execs, imports or reads, with the folder's documented run command as configuration, and source
the scanner cannot read (C / C++ / CUDA files or strings) is reported as not analysed (``scan_folder``).

Every finding carries a confidence. ``high`` means the code shape is the one the organisers ruled against and it
runs under the script's defaults; findings in code that nothing calls, or in a branch that the defaults route
around, are lowered. Exit status: 0 when no high-confidence finding, 1 when at least one, 2 when an input could
not be read, parsed or decoded (this takes precedence: an unreadable submission is not a clean one).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trainer.source_unwrap import UnwrapError, unwrap
from verifier import scan_folder
from verifier.scan_context import LogEvidence
from verifier.scan_findings import CONFIDENCES, PATTERNS, Finding
from verifier.scan_rules import analyse_source

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
    via: str | None = None  # in a folder scan: how the file was reached ("entry point", "imported by x.py line 3")

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "via": self.via,
            "error": self.error,
            "layers": self.layers,
            "notes": self.notes,
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass
class _Scanned:
    report: FileReport
    tree: ast.Module | None = None
    env: dict[str, str] = field(default_factory=dict)  # environment defaults its wrapper sets for what it runs


def _scan_text(source: str, filename: str, run_env: dict[str, str] | None = None,
               evidence: LogEvidence | None = None) -> _Scanned:
    report = FileReport(path=filename)
    scanned = _Scanned(report)
    try:
        unwrapped = unwrap(source)
        origin = " > ".join(layer.describe() for layer in unwrapped.layers) or None
        report.layers = [layer.describe() for layer in unwrapped.layers]
        report.notes = list(unwrapped.notes)
        # The run command's environment wins over a wrapper's os.environ.setdefault(...), as it does at run time.
        scanned.env = {**unwrapped.env_overrides, **(run_env or {})}
        scanned.tree = unwrapped.tree
        report.findings = analyse_source(unwrapped.source, filename, origin, scanned.env, unwrapped.tree, evidence)
    except SyntaxError as exc:
        report.error = f"file is not valid Python: {exc.msg} (line {exc.lineno})"
    except UnwrapError as exc:
        report.error = str(exc)
    except RecursionError:
        report.error = "source nests too deeply to analyse"
    return scanned


def scan_source(source: str, filename: str = "<string>") -> FileReport:
    """Scan source text. Wrapper decoding and parse errors are reported in ``FileReport.error``."""
    return _scan_text(source, filename).report


def _read_source(path: Path) -> tuple[str | None, str | None]:
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            return None, f"file is {size} bytes, over the {MAX_INPUT_BYTES}-byte limit"
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text: {exc.reason} at byte {exc.start}"


def _scan_path(path: Path, run_env: dict[str, str] | None = None, evidence: LogEvidence | None = None) -> _Scanned:
    source, error = _read_source(path)
    if source is None:
        return _Scanned(FileReport(path=str(path), error=error))
    return _scan_text(source, str(path), run_env, evidence)


def scan_file(path: Path) -> FileReport:
    return _scan_path(path).report


def scan_folder_reports(folder: Path) -> list[FileReport]:
    """Scan a record folder: its entry point and every Python file of the folder reached from it (see
    ``scan_folder``). The entry point's report carries the folder-level notes and not-analysed findings."""
    files = scan_folder.folder_files(folder)
    python_files = [path for path in files if path.suffix == ".py"]
    entry = scan_folder.entry_point(folder, python_files)
    if entry is None:
        names = ", ".join(path.name for path in python_files[:5]) or "none"
        return [FileReport(path=str(folder), error=f"no entry point: no {scan_folder.ENTRY_POINT} and not exactly "
                                                     f"one top-level Python file (found: {names})")]
    run_env, env_sources = scan_folder.run_command_env(files)
    log_files, log_lines = scan_folder.record_log_lines(files)
    evidence = LogEvidence(log_lines) if log_lines else None
    siblings: dict[str, Path] = {}
    for path in python_files:
        siblings.setdefault(path.name, path)
        if path.parent == folder:
            siblings.setdefault(path.stem, path)
    reports: list[FileReport] = []
    pending: list[tuple[Path, str, dict[str, str]]] = [(entry, "entry point", run_env)]
    seen = {entry}
    while pending:
        path, via, env = pending.pop(0)
        scanned = _scan_path(path, env, evidence)
        scanned.report.via = via
        reports.append(scanned.report)
        if scanned.tree is None:
            continue
        for line, first in scan_folder.foreign_strings(scanned.tree):
            scanned.report.findings.append(scan_folder.not_analysed(
                str(path), line, first, f"C / C++ / CUDA source in a string (line {line}, compiled at run time)"))
        for target, how, line in scan_folder.references(scanned.tree, siblings):
            if target not in seen:
                seen.add(target)
                pending.append((target, f"{how} by {path.name} line {line}", scanned.env))
    head = reports[0]
    if log_files:
        head.notes.append(f"training logs read for evidence of what ran: {len(log_files)} file(s)")
    if env_sources:
        settings = " ".join(f"{name}={value}" for name, value in sorted(run_env.items()))
        head.notes.append(f"run command ({', '.join(env_sources)}): {settings or 'no environment settings'}")
    unreached = [path for path in python_files if path not in seen]
    if unreached:
        head.notes.append("not reached from the entry point, not scanned: "
                          + ", ".join(str(path.relative_to(folder)) for path in unreached))
    for name, value in scan_folder.run_data_files(run_env):
        head.findings.append(scan_folder.not_analysed(
            str(folder / env_sources[0]), 0, f"{name}={value}",
            f"the data file the run command passes in {name}={value} (supplied at run time; a file built from "
            "validation tokens would be a paid prefix)"))
    for path in files:
        if path.suffix.lower() in scan_folder.FOREIGN_SOURCE:
            head.findings.append(scan_folder.not_analysed(
                str(path), 0, "", f"{path.relative_to(folder)} ({path.suffix} source in the record folder)"))
    return reports


def scan_paths(paths: list[Path]) -> list[FileReport]:
    reports: list[FileReport] = []
    for path in paths:
        reports.extend(scan_folder_reports(path) if path.is_dir() else [scan_file(path)])
    return reports


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
        if report.via:
            header += f"  ({report.via})"
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
        "P1-P5. A record folder is scanned from train_gpt.py through every Python file it execs, imports or "
        "reads, configured by its documented run command. Self-extracting lzma/zlib/base85/base64 wrappers are "
        "decoded without executing them. Exit 0: no "
        "high-confidence finding; 1: at least one; 2: an input could not be read or decoded.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="train_gpt.py files or record folders to scan")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reports = scan_paths(args.paths)
    sys.stdout.write((render_json(reports) if args.json else render_table(reports)) + "\n")
    return exit_code(reports)
