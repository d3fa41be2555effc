"""Measure ``verifier scan`` (and ``verifier check --record``) on the labelled corpus of real upstream submissions.

    python bench/scan_corpus.py [--corpus ../shared/verifier_corpus] [--no-record] [--json out.json]

Prints the confusion matrix (legal / illegal x flagged high / clean, in-scope and out-of-scope separately), every
false positive and every miss with its rule and line, the per-folder scan time distribution, and a summary of the
record check of every folder. The corpus (``../shared/verifier_corpus``, see its README) is read, never copied.

"On target" means more than "flagged": an illegal entry counts as caught only when a high finding's pattern and
line match one of the ANCHORS below, the places where the violation its label's ``reason`` names is written.
The anchors were read off the corpus sources by hand (pattern, file, line); they measure the scanner, they are
not used by it. An out-of-scope entry counts when it is flagged on target or reported with a not-analysed (NA)
finding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from verifier.scan import EXIT_UNREADABLE, FileReport, exit_code, scan_paths  # noqa: E402
from verifier.scan_findings import Finding  # noqa: E402

DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "verifier_corpus"
LINE_TOLERANCE = 3  # a finding within this many lines of an anchor points at the same statement

# id prefix (the upstream PR or record) -> the (pattern, file, line) places of the violation its reason names.
ANCHORS: dict[str, list[tuple[str, str, int]]] = {
    "pr517": [("P3", "train_gpt.py", 1636)],  # pre-eval TTT on val_tokens
    "pr614": [("P3", "train_gpt.py", 994), ("P3", "train_gpt.py", 1019)],  # per-epoch scoring, best epoch kept
    "pr685": [("P3", "train_gpt.py", 1268), ("P3", "train_gpt.py", 1432), ("P3", "train_gpt.py", 1483)],
    "pr376": [("P1", "train_gpt.py", 946), ("P2", "train_gpt.py", 1015)],
    "pr715": [("P1", "train_gpt.py", 1143), ("P2", "train_gpt.py", 1152)],
    "pr777": [("P4", "train_gpt.py", 1311)],  # GPTQ Hessians on val
    "pr811": [("P1", "train_gpt.py", 196), ("P1", "train_gpt.py", 198), ("P2", "train_gpt.py", 214)],
    "pr840": [("P1", "train_gpt.py", 2155), ("P1", "train_gpt.py", 2160), ("P2", "train_gpt.py", 2321)],
    "pr851": [("P1", "train_gpt.py", 280), ("P1", "train_gpt.py", 551), ("P2", "train_gpt.py", 163)],
    "pr865": [("P1", "train_gpt.py", 404), ("P1", "train_gpt.py", 409), ("P2", "train_gpt.py", 529)],
    "pr883": [("P1", "train_gpt.py", 130), ("P2", "train_gpt.py", 155), ("P2", "train_gpt.py", 889)],
    "pr890": [("P1", "train_gpt.py", 936), ("P2", "train_gpt.py", 1093)],
    "pr925": [("P1", "train_gpt.py", 131), ("P2", "train_gpt.py", 156), ("P2", "train_gpt.py", 890)],
    "pr993": [("P1", "train_gpt.py", 1456), ("P2", "train_gpt.py", 1477)],
    "pr1095": [("P1", "train_gpt.py", 256), ("P1", "train_gpt.py", 259), ("P2", "train_gpt.py", 275)],
    "pr1114": [("P1", "train_gpt.py", 1182), ("P1", "train_gpt.py", 1213), ("P1", "train_gpt.py", 1219),
               ("P2", "train_gpt.py", 1188), ("P2", "train_gpt.py", 1193), ("P2", "train_gpt.py", 1231)],
    "pr1605": [("P1", "train_gpt.py", 1465), ("P1", "train_gpt.py", 1467), ("P2", "train_gpt.py", 1485)],
    "pr853": [("P1", "train_gpt.py", 2158), ("P1", "train_gpt.py", 2163), ("P2", "train_gpt.py", 2335)],
    "pr907": [("P3", "train_gpt.py", 1587)],  # 20-epoch pre-eval TTT
    "pr922": [("P1", "train_gpt.py", 2171), ("P1", "train_gpt.py", 2176), ("P2", "train_gpt.py", 2351)],
    "pr959": [("P1", "train_gpt.py", 2171), ("P1", "train_gpt.py", 2176)],
    "pr1143": [("P3", "train_gpt.py", 1684)],  # two-pass full rescore
    "pr745": [("P2", "train_gpt.py", 110)],  # entropy 'expert'
    "pr967": [("P2", "train_gpt.py", 171)],
    "pr1263": [("P3", "train_gpt.py", 892)],  # SLOT on the scored positions
    "pr1324": [("P3", "train_gpt.py", 1255)],
    "pr1350": [("P3", "train_gpt.py", 2044)],  # pre-quant TTT on val
    "pr1929": [("P3", "train_gpt.py", 1113), ("P3", "train_gpt.py", 1382), ("P3", "train_gpt.py", 2029)],
    "pr1958": [("P3", "train_gpt.py", 3731)],
    "pr1933": [("P2", "train_gpt.py", 1962)],  # token probability spread over bytes, mixed with PPM
    "pr2039": [("P2", "train_gpt.py", 3631)],
    "pr875": [("P5", "train_gpt.py", 199)],
    # out of static scope: flagged for the real cause where the scanner can see it
    "pr179": [("P4", "train_gpt.py", 48)],  # TRAIN_FILES=fineweb_val_*.bin in the README's configuration
    "pr1544": [("P5", "train_gpt.py", 217)],  # byte table
    "pr1687": [("P5", "train_gdn_7k.py", 202)],
}


@dataclass
class Entry:
    id: str
    label: str
    in_scope: bool
    reason: str
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time: what the scan costs without other load on the machine
    exit: int
    reports: list[FileReport]
    findings: list[Finding] = field(default_factory=list)

    @property
    def high(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.confidence == "high"]

    @property
    def not_analysed(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.pattern == "NA"]

    def anchors(self) -> list[tuple[str, str, int]]:
        key = self.id.split("__", 1)[0]
        return ANCHORS.get(key, [])

    def on_target(self) -> list[Finding]:
        return [
            finding for finding in self.high
            if any(pattern == finding.pattern and Path(finding.file).name == name
                   and abs(finding.line - line) <= LINE_TOLERANCE for pattern, name, line in self.anchors())
        ]

    @property
    def verdict(self) -> str:
        if self.exit == EXIT_UNREADABLE:
            return "unreadable"
        if self.label == "legal":
            return "false positive" if self.high else "clean"
        if self.on_target():
            return "caught"
        if not self.in_scope and self.not_analysed:
            return "not analysed"
        return "flagged elsewhere" if self.high else "missed"


def load_labels(corpus: Path) -> list[dict[str, object]]:
    return json.loads((corpus / "labels.json").read_text(encoding="utf-8"))


def scan_entry(corpus: Path, label: dict[str, object]) -> Entry:
    folder = corpus / "submissions" / str(label["id"])
    started, cpu_started = time.perf_counter(), time.process_time()
    reports = scan_paths([folder])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    entry = Entry(str(label["id"]), str(label["label"]), bool(label["in_scope"]), str(label["reason"]), seconds,
                  cpu_seconds, exit_code(reports), reports)
    entry.findings = [finding for report in reports for finding in report.findings]
    return entry


def scan_corpus(corpus: Path) -> list[Entry]:
    return [scan_entry(corpus, label) for label in load_labels(corpus)]


def _describe(finding: Finding) -> str:
    return f"{finding.pattern} {finding.confidence} {Path(finding.file).name}:{finding.line}  {finding.code[:70]}"


def render(entries: list[Entry]) -> str:
    lines: list[str] = []
    legal = [e for e in entries if e.label == "legal"]
    scope = [e for e in entries if e.label == "illegal" and e.in_scope]
    outside = [e for e in entries if e.label == "illegal" and not e.in_scope]

    def count(group: list[Entry], *verdicts: str) -> int:
        return sum(1 for e in group if e.verdict in verdicts)

    lines.append("confusion matrix (flagged = at least one high finding)")
    lines.append(f"  {'':28}{'flagged high':>14}{'clean':>8}{'exit 2':>8}")
    lines.append(f"  {'legal':28}{sum(1 for e in legal if e.high):>14}{sum(1 for e in legal if not e.high):>8}"
                 f"{count(legal, 'unreadable'):>8}")
    for name, group in (("illegal, in scope", scope), ("illegal, out of scope", outside)):
        lines.append(f"  {name:28}{sum(1 for e in group if e.high):>14}{sum(1 for e in group if not e.high):>8}"
                     f"{count(group, 'unreadable'):>8}")
    lines.append("")
    lines.append(f"  in scope caught on target (rule and line at the named violation): {count(scope, 'caught')} of "
                 f"{len(scope)}")
    lines.append(f"  out of scope caught on target or reported not analysed: "
                 f"{count(outside, 'caught', 'not analysed')} of {len(outside)}")
    lines.append(f"  legal flagged high: {sum(1 for e in legal if e.high)} of {len(legal)}")
    lines.append("")
    lines.append("false positives (legal entries with a high finding)")
    for entry in legal:
        if entry.high:
            lines.append(f"  {entry.id}")
            lines += [f"    {_describe(f)}" for f in entry.high]
    if not any(e.high for e in legal):
        lines.append("  none")
    lines.append("")
    lines.append("misses (illegal entries not caught on target)")
    missed = [e for e in scope + outside if e.verdict not in {"caught", "not analysed"}]
    for entry in missed:
        lines.append(f"  {entry.id} [{entry.verdict}]  reason: {entry.reason[:100]}")
        lines += [f"    expected {pattern} {name}:{line}" for pattern, name, line in entry.anchors()]
        lines += [f"    found    {_describe(f)}" for f in entry.findings if f.confidence != "low"]
    if not missed:
        lines.append("  none")
    lines.append("")
    lines.append("out of scope entries")
    for entry in outside:
        shown = entry.on_target() or entry.not_analysed
        lines.append(f"  {entry.id[:60]} [{entry.verdict}] " + "; ".join(_describe(f) for f in shown[:2]))
    lines.append("")
    for name, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
        times = sorted(getattr(e, key) for e in entries)
        slowest = max(entries, key=lambda e: getattr(e, key))
        lines.append(f"scan time per folder, {name} ({len(times)} folders): min {times[0]:.2f} s, median "
                     f"{statistics.median(times):.2f} s, p90 {times[int(0.9 * (len(times) - 1))]:.2f} s, max "
                     f"{times[-1]:.2f} s ({slowest.id[:50]}), total {sum(times):.1f} s")
    lines.append(f"  (load average while measuring: {_load()})")
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def record_checks(corpus: Path, entries: list[Entry]) -> str:
    """``check --record`` on every folder that has a log (the record check lives in ``verifier.record``)."""
    try:
        from verifier.record import check_record
    except ImportError:
        return "record check: verifier.record is not available in this checkout"
    lines = ["record check (python -m verifier check --record DIR)"]
    totals: dict[str, int] = {}
    formats: dict[str, int] = {}
    warned: list[str] = []
    failed: list[str] = []
    failures: list[str] = []
    seconds: list[float] = []
    folders = 0
    for entry in entries:
        folder = corpus / "submissions" / entry.id
        started = time.perf_counter()
        try:
            result = check_record(folder)
        except Exception as exc:  # the bench reports a crash instead of stopping at it
            failures.append(f"{entry.id}: crashed: {type(exc).__name__}: {exc}")
            continue
        seconds.append(time.perf_counter() - started)
        if not any(log.kind == "training log" for log in result.logs):
            continue
        folders += 1
        for log in result.logs:
            for name in log.formats:
                formats[name] = formats.get(name, 0) + 1
            if log.error:
                failures.append(f"{entry.id}/{log.path}: {log.error}")
        for row in result.results:
            totals[row.status] = totals.get(row.status, 0) + 1
            if row.status == "WARN":
                warned.append(f"{entry.id[:55]} {row.name}: {row.figure} {row.reason[:80]}")
            elif row.status == "FAIL":
                failed.append(f"{entry.id[:55]} {row.name}: {row.figure[:60]} {row.reason[:80]}")
    lines.append(f"  folders with a training log: {folders}; log formats read: "
                 + ", ".join(f"{name} {count}" for name, count in sorted(formats.items())))
    lines.append("  rows: " + ", ".join(f"{status} {count}" for status, count in sorted(totals.items())))
    lines.append(f"  parser failures / crashes: {len(failures)}")
    lines += [f"    {failure}" for failure in failures]
    lines.append(f"  WARN rows ({len(warned)}):")
    lines += [f"    {line}" for line in warned]
    lines.append(f"  FAIL rows ({len(failed)}):")
    lines += [f"    {line}" for line in failed]
    if seconds:
        lines.append(f"  check time per folder: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--no-record", action="store_true", help="skip check --record")
    parser.add_argument("--json", type=Path, help="also write per-entry results as JSON")
    args = parser.parse_args(argv)
    if not (args.corpus / "labels.json").is_file():
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    entries = scan_corpus(args.corpus)
    print(render(entries))
    if not args.no_record:
        print()
        print(record_checks(args.corpus, entries))
    if args.json:
        args.json.write_text(json.dumps([
            {"id": e.id, "label": e.label, "in_scope": e.in_scope, "verdict": e.verdict, "seconds": e.seconds,
             "cpu_seconds": e.cpu_seconds, "exit": e.exit, "findings": [f.to_dict() for f in e.findings]}
            for e in entries
        ], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
