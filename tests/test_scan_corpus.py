"""The scanner's figures on the labelled corpus of real upstream submissions (``../shared/verifier_corpus``).

Skipped when the corpus is absent. The entries and the anchors that say where each violation is written live in
``bench/scan_corpus.py``, which prints the same figures with every false positive and miss; timing is measured
there, not here.
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "verifier_corpus"

pytestmark = pytest.mark.skipif(not (CORPUS / "labels.json").is_file(), reason="verifier corpus not present")


def _bench():
    if "scan_corpus_bench" in sys.modules:
        return sys.modules["scan_corpus_bench"]
    spec = importlib.util.spec_from_file_location("scan_corpus_bench", REPO_ROOT / "bench" / "scan_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def _scan(label: dict[str, object]) -> tuple[str, str, bool, int, list[tuple[str, str, int, str]], str]:
    bench = _bench()
    entry = bench.scan_entry(CORPUS, label)
    findings = [(f.pattern, f.confidence, f.line, f.file) for f in entry.findings]
    return entry.id, entry.label, entry.in_scope, entry.exit, findings, entry.verdict


@pytest.fixture(scope="module")
def results() -> list[tuple[str, str, bool, int, list[tuple[str, str, int, str]], str]]:
    labels = _bench().load_labels(CORPUS)
    # Two workers: the scan is CPU-bound and pure; the machine has two cores.
    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_scan, labels))


def test_the_corpus_has_the_documented_shape(results) -> None:
    groups = [(label, in_scope) for _, label, in_scope, *_ in results]
    assert groups.count(("legal", True)) == 42
    assert groups.count(("illegal", True)) == 32
    assert groups.count(("illegal", False)) == 8


def test_no_entry_is_unreadable(results) -> None:
    assert [entry_id for entry_id, _, _, code, _, _ in results if code == 2] == []


def test_no_legal_entry_is_flagged_high(results) -> None:
    flagged = {entry_id: [f for f in findings if f[1] == "high"]
               for entry_id, label, _, _, findings, _ in results if label == "legal"}
    assert {entry_id: found for entry_id, found in flagged.items() if found} == {}


def test_in_scope_illegal_entries_are_caught_by_a_finding_at_the_named_violation(results) -> None:
    verdicts = {entry_id: verdict for entry_id, label, in_scope, _, _, verdict in results
                if label == "illegal" and in_scope}
    caught = [entry_id for entry_id, verdict in verdicts.items() if verdict == "caught"]
    assert len(caught) >= 31, {entry_id: v for entry_id, v in verdicts.items() if v != "caught"}


def test_out_of_scope_entries_are_caught_or_reported_as_not_analysed(results) -> None:
    verdicts = {entry_id: verdict for entry_id, label, in_scope, _, _, verdict in results
                if label == "illegal" and not in_scope}
    assert {entry_id: v for entry_id, v in verdicts.items() if v not in {"caught", "not analysed"}} == {}
