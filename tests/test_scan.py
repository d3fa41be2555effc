"""Tests of ``python -m verifier scan``: fixtures for every pattern, wrapper decoding, exit codes, precision.

The fixtures in tests/fixtures/scan/ are realistic upstream-style scripts: for each pattern a positive and a
near-miss negative, a positive hidden in an lzma+base85 self-extracting wrapper, and a complete clean submission.
Exit codes are checked through the real CLI in a subprocess; finer properties in-process.
"""

from __future__ import annotations

import base64
import json
import lzma
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from trainer import source_unwrap as scan_unwrap
from verifier.scan import EXIT_CLEAN, EXIT_FINDINGS, EXIT_UNREADABLE, scan_file, scan_paths, scan_source

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "scan"

# fixture -> (pattern, a fragment of the flagged source line) for every expected high-confidence finding
POSITIVES: dict[str, set[tuple[str, str]]] = {
    "p1_hashed_ngram.py": {("P1", "full_key = ((ctx ^ (tgt *"), ("P2", "p_model[matched] = (1.0 - alpha")},
    "p2_gold_only_mix.py": {("P2", "p = (1.0 - CACHE_LAMBDA) * p_model[i]")},
    "p3_pre_eval_ttt.py": {("P3", "ttt_adapt(args, model, device, val_tokens)")},
    "p3_discarded_score_phase.py": {("P3", "base_model.forward_logits(x)"), ("P3", "ttt_adapt(args, eval_model")},
    "p3_final_epoch.py": {("P3", "loss_sum += loss.item()")},
    "p3_rescore_min.py": {("P3", "adapt(model, val_tokens)"), ("P3", "torch.minimum(first_pass, second_pass)")},
    "p3_slot_delta.py": {("P3", "loss_sum += nll[s:]")},
    "p3_prequant_ttt_golfed.py": {("P3", "prequant_ttt_adapt_adamw(h,base_model")},
    "p4_val_calibration.py": {("P4", "collect_hessians(model, calib_loader")},
    "p5_bytes_constant.py": {("P5", "/ BYTES_PER_TOKEN")},
    "wrapped_p1_lzma_b85.py": {("P1", "full_key = ((ctx ^ (tgt *"), ("P2", "p_model[matched] = (1.0 - alpha")},
}
NEGATIVES = [
    "p1_bigram_normalised_negative.py",
    "p2_full_vocab_mix_negative.py",
    "p3_score_first_negative.py",
    "p3_lora_score_first_negative.py",
    "p4_train_calibration_negative.py",
    "p5_exact_bytes_negative.py",
    "clean_full_submission.py",
]


def run_cli(*args: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "verifier", "scan", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def high_findings(path: Path) -> set[tuple[str, str]]:
    report = scan_file(path)
    assert report.error is None, report.error
    return {(f.pattern, f.code) for f in report.findings if f.confidence == "high"}


def lzma_b85_wrapper(source: str, prelude: str = "") -> str:
    """The self-extracting shim used by upstream submissions (raw LZMA2, base85, exec)."""
    blob = lzma.compress(source.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    payload = base64.b85encode(blob).decode("ascii")
    return (f"{prelude}import lzma as L,base64 as B\n"
            f'exec(L.decompress(B.b85decode("{payload}"),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]))\n')


# -- exit codes through the real CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", sorted(POSITIVES))
def test_cli_exits_1_on_each_positive(fixture: str) -> None:
    result = run_cli(FIXTURES / fixture)
    assert result.returncode == EXIT_FINDINGS, result.stdout + result.stderr
    assert " high " in result.stdout


def test_cli_exits_0_on_all_near_misses_and_the_clean_submission() -> None:
    result = run_cli(*(FIXTURES / name for name in NEGATIVES))
    assert result.returncode == EXIT_CLEAN, result.stdout + result.stderr
    assert f"{len(NEGATIVES)} file(s): 0 high" in result.stdout


def test_cli_exit_1_wins_over_clean_files_and_json_reports_every_file() -> None:
    result = run_cli("--json", FIXTURES / "p3_pre_eval_ttt.py", FIXTURES / "clean_full_submission.py")
    assert result.returncode == EXIT_FINDINGS
    document = json.loads(result.stdout)
    assert document["exit_code"] == EXIT_FINDINGS
    assert [Path(f["path"]).name for f in document["files"]] == ["p3_pre_eval_ttt.py", "clean_full_submission.py"]
    finding = document["files"][0]["findings"][0]
    assert {"pattern", "condition", "file", "line", "code", "confidence", "explanation", "origin"} <= set(finding)
    assert finding["pattern"] == "P3" and finding["condition"] == "C3" and finding["confidence"] == "high"
    assert document["files"][1]["findings"] == []
    assert document["summary"]["high"] == 1


def test_cli_exits_2_on_unreadable_inputs(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def main(:\n    pass\n")
    corrupt = tmp_path / "corrupt_wrapper.py"
    corrupt.write_text('import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("VPa!sWoBj")))\n')
    for path, message in [(tmp_path / "missing.py", "cannot read"), (broken, "not valid Python"),
                          (corrupt, "lzma payload does not decode")]:
        result = run_cli(path, FIXTURES / "p3_pre_eval_ttt.py")
        assert result.returncode == EXIT_UNREADABLE, (path, result.stdout)
        assert message in result.stdout


def test_scanning_never_executes_the_submission(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    payload = f"open({str(marker)!r}, 'w').write('payload ran')\n"
    shell = tmp_path / "train_gpt.py"
    shell.write_text(lzma_b85_wrapper(payload, prelude=f"open({str(marker)!r}, 'w').write('shell ran')\n"))
    result = run_cli(shell, cwd=tmp_path)
    assert result.returncode == EXIT_CLEAN, result.stdout
    assert not marker.exists()


# -- what is found, where ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", sorted(POSITIVES))
def test_positive_fixture_findings(fixture: str) -> None:
    found = high_findings(FIXTURES / fixture)
    for pattern, fragment in POSITIVES[fixture]:
        assert any(p == pattern and fragment in code for p, code in found), (pattern, fragment, found)
    assert {p for p, _ in found} == {p for p, _ in POSITIVES[fixture]}


@pytest.mark.parametrize("fixture", NEGATIVES)
def test_near_miss_fixtures_have_no_findings(fixture: str) -> None:
    report = scan_file(FIXTURES / fixture)
    assert report.error is None
    assert report.findings == [], [(f.pattern, f.line, f.confidence, f.explanation) for f in report.findings]


def test_findings_carry_condition_location_and_explanation() -> None:
    report = scan_file(FIXTURES / "p1_hashed_ngram.py")
    lines = (FIXTURES / "p1_hashed_ngram.py").read_text().splitlines()
    # One finding per pattern: the target-keyed *updates* in update_tables() are how counts are built.
    assert sorted(f.pattern for f in report.findings) == ["P1", "P2"]
    by_pattern = {f.pattern: f for f in report.findings}
    p1, p2 = by_pattern["P1"], by_pattern["P2"]
    assert (p1.condition, p2.condition) == ("C1+C2", "C2")
    assert lines[p1.line - 1].strip() == p1.code and "full_key" in p1.code
    assert "tgt" in p1.explanation and "PR #779" in p1.explanation
    assert p1.origin is None


def test_wrapped_payload_is_decoded_and_scanned_like_the_plain_file() -> None:
    wrapped = scan_file(FIXTURES / "wrapped_p1_lzma_b85.py")
    plain = scan_file(FIXTURES / "p1_hashed_ngram.py")
    assert wrapped.layers == ["base85+lzma payload exec'd at line 2"]
    located = [(f.pattern, f.line, f.code) for f in wrapped.findings]
    assert located == [(f.pattern, f.line, f.code) for f in plain.findings]
    assert all(f.origin == wrapped.layers[0] for f in wrapped.findings)


@pytest.mark.parametrize("codec", ["zlib+base64", "nested"])
def test_other_wrapper_variants_are_decoded(codec: str) -> None:
    inner = (FIXTURES / "p3_pre_eval_ttt.py").read_text()
    if codec == "zlib+base64":
        blob = base64.b64encode(zlib.compress(inner.encode())).decode()
        source = f"import zlib, base64\n_C = '{blob}'\nexec(zlib.decompress(base64.b64decode(_C)).decode())\n"
    else:
        source = lzma_b85_wrapper(lzma_b85_wrapper(inner))
    report = scan_source(source, "train_gpt.py")
    assert report.error is None
    assert len(report.layers) == (1 if codec == "zlib+base64" else 2)
    assert any(f.pattern == "P3" and f.confidence == "high" for f in report.findings)


def test_decompression_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_unwrap, "MAX_DECODED_BYTES", 10_000)
    report = scan_source(lzma_b85_wrapper("#" * 50_000), "bomb.py")
    assert report.error is not None and "decompression bomb" in report.error


def test_brotli_payload_that_does_not_decode_is_reported_not_skipped() -> None:
    source = "import brotli,base64\nexec(brotli.decompress(base64.b85decode('VPa!sWoBj')))\n"
    report = scan_source(source, "train_gpt.py")
    assert report.error is not None and "brotli" in report.error


def brotli_b85_wrapper(inner: str) -> str:
    import brotli

    blob = base64.b85encode(brotli.compress(inner.encode())).decode()
    return f"import brotli,base64\nexec(brotli.decompress(base64.b85decode('{blob}')))\n"


def test_brotli_wrapper_is_decoded_and_scanned() -> None:
    inner = (FIXTURES / "p3_pre_eval_ttt.py").read_text()
    report = scan_source(brotli_b85_wrapper(inner), "train_gpt.py")
    assert report.error is None and len(report.layers) == 1
    assert any(f.pattern == "P3" and f.confidence == "high" for f in report.findings)


def test_brotli_decompression_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_unwrap, "MAX_DECODED_BYTES", 10_000)
    report = scan_source(brotli_b85_wrapper("#" * 50_000), "bomb.py")
    assert report.error is not None and "expands beyond 10000 bytes" in report.error


# -- precision: the same code shape, legal vs illegal -----------------------------------------------------------


def test_dropping_the_accumulation_turns_the_legal_loop_into_a_discarded_score_phase() -> None:
    legal = (FIXTURES / "p3_score_first_negative.py").read_text()
    accumulation = "                    loss_sum += nll[s:].double().sum()\n"
    assert accumulation in legal
    report = scan_source(legal.replace(accumulation, ""), "train_gpt.py")
    found = [(f.pattern, f.confidence, f.code) for f in report.findings]
    assert ("P3", "high", "nll = F.cross_entropy(logits, y, reduction=\"none\")") in found


def test_scoring_on_the_first_epoch_only_is_not_final_epoch_scoring() -> None:
    source = (FIXTURES / "p3_final_epoch.py").read_text()
    assert "if epoch == TTT_EPOCHS - 1:" in source
    report = scan_source(source.replace("if epoch == TTT_EPOCHS - 1:", "if epoch == 0:"), "train_gpt.py")
    assert report.findings == []


def test_a_branch_the_defaults_switch_off_is_lowered_unless_the_run_command_switches_it_on(tmp_path: Path) -> None:
    source = (FIXTURES / "p3_pre_eval_ttt.py").read_text()
    call = "        ttt_adapt(args, model, device, val_tokens)\n"
    assert 'TTT_ENABLED", "1"' in source and call in source
    assert ("P3", call.strip()) in high_findings(FIXTURES / "p3_pre_eval_ttt.py")
    # TTT_ENABLED=0 by default: the plain `if args.ttt_enabled:` branch does not run, so the finding is medium.
    off = source.replace('TTT_ENABLED", "1"', 'TTT_ENABLED", "0"')
    findings = scan_source(off, "train_gpt.py").findings
    assert [(f.pattern, f.confidence) for f in findings] == [("P3", "medium")]
    assert "only when `args.ttt_enabled` differs from its default" in findings[0].explanation
    # The same with a legal alternative that the defaults take.
    shadowed = source.replace(call, call + "    else:\n        print('score-first TTT runs inside the eval')\n")
    assert [(f.pattern, f.confidence) for f in scan_source(shadowed, "train_gpt.py").findings] == [("P3", "high")]
    shadowed_off = shadowed.replace('TTT_ENABLED", "1"', 'TTT_ENABLED", "0"')
    assert [(f.pattern, f.confidence) for f in scan_source(shadowed_off, "train_gpt.py").findings] == [
        ("P3", "medium")]
    # A wrapper shell that sets the flag makes the branch the default one again.
    wrapped = lzma_b85_wrapper(off, prelude="import os\nos.environ.setdefault('TTT_ENABLED', '1')\n")
    assert [(f.pattern, f.confidence) for f in scan_source(wrapped, "train_gpt.py").findings] == [("P3", "high")]
    # So does the record's documented run command, when the folder is scanned.
    (tmp_path / "train_gpt.py").write_text(off)
    command = "SEED=1 TTT_ENABLED=1 \\\n  torchrun --nproc_per_node=8 train_gpt.py"
    (tmp_path / "README.md").write_text(f"Run:\n\n```\n{command}\n```\n")
    reports = scan_paths([tmp_path])
    assert [(f.pattern, f.confidence) for f in reports[0].findings] == [("P3", "high")]
    assert any("run command (README.md): SEED=1 TTT_ENABLED=1" in note for note in reports[0].notes)


def test_code_that_nothing_calls_is_reported_low() -> None:
    source = (FIXTURES / "p1_hashed_ngram.py").read_text()
    call = "    val_loss, val_bpb = eval_val_sliding_ngram(model, val_tokens, *luts, args.seq_len, args.stride)\n"
    assert call in source
    dead = source.replace(call, "    val_loss, val_bpb = 0.0, 0.0\n")
    findings = scan_source(dead, "train_gpt.py").findings
    assert {f.pattern for f in findings} == {"P1", "P2"}
    assert all(f.confidence == "low" and "nothing in the script calls" in f.explanation for f in findings)


def test_full_vocabulary_lookup_keyed_by_candidates_is_not_p1_but_by_target_is() -> None:
    source = (FIXTURES / "p1_bigram_normalised_negative.py").read_text()
    candidates = "(candidates[None, :] * PRIME_TOK)"
    assert candidates in source
    # Keying the same read by the realised next token turns it into a target-only lookup.
    keyed_by_target = source.replace(
        "def full_vocab_ngram(table: np.ndarray, ctx_hash: np.ndarray) -> np.ndarray:",
        "def full_vocab_ngram(table: np.ndarray, ctx_hash: np.ndarray, y_np=None) -> np.ndarray:",
    ).replace(candidates, "(y_np.astype(np.uint64)[:, None] * PRIME_TOK)").replace(
        "p_ng = full_vocab_ngram(table, prev)", "p_ng = full_vocab_ngram(table, prev, y.numpy())")
    findings = scan_source(keyed_by_target, "train_gpt.py").findings
    assert any(f.pattern == "P1" and f.confidence == "high" and "keys = " in f.code for f in findings)


SHIFTED_TTT = '''
import math
import torch
import torch.nn.functional as F


def eval_ttt_shifted(model, val_tokens, chunk=32768, seq_len=1024):
    """Train on chunk c-1, then score chunk c: the same order as score-first, shifted by one iteration."""
    opt = torch.optim.SGD(model.parameters(), lr=0.002)
    loss_sum, count = 0.0, 0
    for ci in range((val_tokens.numel() - 1) // chunk):
        if ci > 0:
            prev = val_tokens[(ci - 1) * chunk : ci * chunk + 1]
            loss = model(prev[:-1].view(-1, seq_len), prev[1:].view(-1, seq_len))
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.inference_mode():
            cur = val_tokens[ci * chunk : (ci + 1) * chunk + 1]
            nll = F.cross_entropy(model.forward_logits(cur[:-1][None])[0], cur[1:], reduction="none")
            loss_sum += float(nll.sum())
            count += nll.numel()
    return loss_sum / count, loss_sum / count / math.log(2.0)


def main():
    model, val_tokens = torch.load("m.pt"), torch.load("val_tokens.pt")
    print(f"ttt val_bpb:{eval_ttt_shifted(model, val_tokens)[1]}")


if __name__ == "__main__":
    main()
'''


def test_training_on_the_previous_chunk_before_scoring_the_next_is_score_first() -> None:
    assert scan_source(SHIFTED_TTT, "train_gpt.py").findings == []
    same_chunk = SHIFTED_TTT.replace("(ci - 1) * chunk : ci * chunk + 1", "ci * chunk : (ci + 1) * chunk + 1")
    same_chunk = same_chunk.replace("if ci > 0:", "if True:")
    findings = scan_source(same_chunk, "train_gpt.py").findings
    assert [(f.pattern, f.confidence) for f in findings] == [("P3", "high")]
    assert "loss_sum += float(nll.sum())" in findings[0].code


def test_validation_warmup_whose_weights_are_restored_is_low() -> None:
    source = '''
import torch


def eval_val(model, val_tokens):
    loss_sum = 0.0
    with torch.inference_mode():
        for s in range(0, val_tokens.numel() - 1, 1024):
            local = val_tokens[s : s + 1025]
            loss_sum += float(model(local[:-1][None], local[1:][None]))
    return loss_sum


def main():
    model, val_tokens = torch.load("m.pt"), torch.load("val_tokens.pt")
    opt = torch.optim.AdamW(model.parameters())
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        loss = model(val_tokens[:1024][None], val_tokens[1:1025][None])
        loss.backward()
        opt.step()
    model.load_state_dict(initial_state)
    print(f"val_bpb:{eval_val(model, val_tokens)}")


if __name__ == "__main__":
    main()
'''
    findings = scan_source(source, "train_gpt.py").findings
    assert [(f.pattern, f.confidence) for f in findings] == [("P3", "low")]
    assert "restored" in findings[0].explanation
    # Restoring weights produced *after* the update (a dequantised artifact) is not a restore.
    dequantised = "model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})"
    later_weights = source.replace("model.load_state_dict(initial_state)", dequantised)
    assert [(f.pattern, f.confidence) for f in scan_source(later_weights, "train_gpt.py").findings] == [("P3", "high")]


def test_torch_mixer_class_reads_target_keyed_counts_but_updates_are_not_flagged() -> None:
    source = '''
import torch
import torch.nn.functional as F


class BackoffMixer:
    def __init__(self, buckets=1 << 20):
        self.mask = buckets - 1
        self.primes = torch.tensor([36313, 27191, 51647])
        self.ctx_counts = torch.zeros(buckets, dtype=torch.int32)
        self.full_counts = torch.zeros(buckets, dtype=torch.int32)

    def update(self, tokens):
        ctx_hash = tokens[:-1] * self.primes[0]
        nxt = tokens[1:]
        self.ctx_counts.scatter_add_(0, ctx_hash & self.mask, torch.ones_like(nxt, dtype=torch.int32))
        full = (ctx_hash ^ (nxt * self.primes[1])) & self.mask
        self.full_counts.scatter_add_(0, full, torch.ones_like(nxt, dtype=torch.int32))

    def ngram_probs(self, x_batch, y_batch):
        ctx_hash = x_batch.long() * self.primes[0]
        full_key = ((ctx_hash ^ (y_batch.long() * self.primes[1])) & self.mask).long()
        ctx = self.ctx_counts[(ctx_hash & self.mask).reshape(-1)].float()
        full = self.full_counts[full_key.reshape(-1)].float()
        return torch.minimum(full, ctx) / ctx.clamp(min=1.0)


def score(model, mixer, val_tokens, seq_len=1024):
    nll_sum = 0.0
    for start in range(0, val_tokens.numel() - 1, seq_len):
        local = val_tokens[start : start + seq_len + 1]
        x, y = local[:-1][None], local[1:][None]
        p_model = F.softmax(model.forward_logits(x).float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)
        p_ng = mixer.ngram_probs(x, y).view_as(p_model)
        nll_sum += float(-torch.log(0.8 * p_model + 0.2 * p_ng).sum())
        mixer.update(local)
    return nll_sum


def main():
    print(f"val_loss:{score(torch.load('m.pt'), BackoffMixer(), torch.load('val_tokens.pt'))}")


if __name__ == "__main__":
    main()
'''
    findings = scan_source(source, "train_gpt.py").findings
    located = sorted((f.pattern, f.confidence, f.code) for f in findings)
    assert located == [
        ("P1", "high", "full_key = ((ctx_hash ^ (y_batch.long() * self.primes[1])) & self.mask).long()"),
        ("P2", "high", "nll_sum += float(-torch.log(0.8 * p_model + 0.2 * p_ng).sum())"),
    ]
