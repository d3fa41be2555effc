"""Regression tests for the scanner mechanisms that real submissions exposed (issue 10).

Each test holds a minimal script written for the test, never corpus code, and a near twin that differs only in
the property the mechanism is about, so that the assertion fails if the mechanism breaks in either direction.
"""

from __future__ import annotations

from pathlib import Path

from trainer.source_syntax import normalise_fstrings, parse_python
from verifier.scan import EXIT_UNREADABLE, exit_code, scan_paths, scan_source


def highs(source: str) -> list[tuple[str, int]]:
    report = scan_source(source, "train_gpt.py")
    assert report.error is None, report.error
    return [(f.pattern, f.line) for f in report.findings if f.confidence == "high"]


def line_of(source: str, fragment: str) -> int:
    return next(number for number, text in enumerate(source.splitlines(), 1) if fragment in text)


# -- Python 3.12 payloads ------------------------------------------------------------------------------------------

PEP701 = '''
import math
stats = {"val_bpb": 1.0}
print(f"val_bpb:{stats["val_bpb"]:.4f} {'a' + "b"} {math.log(2)=} {stats!r:>{10}}")
print(f"""{
    stats["val_bpb"]  # a comment inside a field
}""")
'''


def test_pep701_fstrings_parse_on_any_interpreter_and_keep_their_lines() -> None:
    tree = parse_python(PEP701)
    calls = [node for node in tree.body if hasattr(node, "value")]
    assert [node.lineno for node in calls[1:]] == [4, 5]
    normalised = normalise_fstrings(PEP701)
    assert normalised.count("\n") == PEP701.count("\n")
    assert "val_bpb:{:.4f}" in normalised  # the literal text the detectors read survives


def test_a_syntax_error_in_a_decoded_payload_names_the_layer_and_its_own_line() -> None:
    import base64
    import lzma

    payload = "x = 1\ny = 2\ndef broken(:\n"
    blob = base64.b85encode(lzma.compress(payload.encode())).decode()
    wrapper = f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{blob}")))\n'
    report = scan_source(wrapper, "train_gpt.py")
    assert report.error is not None
    assert "decoded payload 1 (base85+lzma payload exec'd at line 2)" in report.error
    assert "line 3 of the decoded text" in report.error
    assert exit_code([report]) == EXIT_UNREADABLE


# -- a helper that adds the loss into the caller's accumulators is the score -------------------------------------

HELPER_SCORES = '''
import math
import torch


def add_chunk(nll, nbytes, loss_sum, byte_sum):
    loss_sum += nll.double().sum()
    byte_sum += nbytes.double().sum()


def eval_lora_ttt(model, lora, val_tokens, byte_lut, chunk=2048):
    opt = torch.optim.Adam(lora.parameters(), lr=1e-3)
    loss_sum = torch.zeros((), dtype=torch.float64)
    byte_sum = torch.zeros((), dtype=torch.float64)
    for start in range(0, val_tokens.numel() - 1, chunk):
        x = val_tokens[start:start + chunk][None]
        y = val_tokens[start + 1:start + chunk + 1][None]
        ptl = model(x, y, lora=lora)
        with torch.no_grad():
            add_chunk(ptl, byte_lut[y], loss_sum, byte_sum)
        opt.zero_grad()
        ptl.mean().backward()
        opt.step()
    return float(loss_sum / byte_sum / math.log(2))


def main():
    model, lora, val_tokens, lut = torch.load("m.pt")
    print(f"val_bpb:{eval_lora_ttt(model, lora, val_tokens, lut):.4f}")


main()
'''


def test_a_helper_accumulating_into_the_callers_loss_sum_is_scoring_not_a_discarded_phase() -> None:
    assert highs(HELPER_SCORES) == []
    # The same loop whose helper drops the loss: the no_grad pass now scores nothing before the update.
    discarding = HELPER_SCORES.replace("    loss_sum += nll.double().sum()\n", "    print(nll.shape)\n")
    assert ("P3", line_of(discarding, "add_chunk(ptl, byte_lut[y], loss_sum, byte_sum)")) in highs(discarding)


# -- branches the defaults switch off ------------------------------------------------------------------------------

SLOT = '''
import os
import torch
import torch.nn.functional as F

SLOT_ENABLED = bool(int(os.environ.get("SLOT_ENABLED", "0")))


def eval_slot(logits_fn, val_tokens, seq_len=1024, stride=64):
    loss_sum, count = 0.0, 0
    for ws in range(0, val_tokens.numel() - seq_len, stride):
        x = val_tokens[ws:ws + seq_len][None]
        y = val_tokens[ws + 1:ws + seq_len + 1][None]
        s = 0 if ws == 0 else seq_len - stride
        logits = logits_fn(x).detach()
        delta = torch.zeros(logits.size(-1), requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=0.01)
        if SLOT_ENABLED:
            for _ in range(4):
                opt.zero_grad()
                F.cross_entropy((logits + delta)[0, s:], y[0, s:]).backward()
                opt.step()
        nll = F.cross_entropy((logits + delta)[0, s:], y[0, s:], reduction="none")
        loss_sum += float(nll.sum())
        count += nll.numel()
    return loss_sum / count


def main():
    fn, val_tokens = torch.load("m.pt")
    print(f"val_loss:{eval_slot(fn, val_tokens):.4f}")


main()
'''


def test_a_slot_branch_that_the_env_default_switches_off_is_not_high_unless_the_run_command_sets_it(
    tmp_path: Path,
) -> None:
    scored = line_of(SLOT, "loss_sum += float(nll.sum())")
    assert highs(SLOT) == []
    findings = scan_source(SLOT, "train_gpt.py").findings
    assert [(f.pattern, f.line, f.confidence) for f in findings] == [("P3", scored, "medium")]
    assert highs(SLOT.replace('"SLOT_ENABLED", "0"', '"SLOT_ENABLED", "1"')) == [("P3", scored)]
    (tmp_path / "train_gpt.py").write_text(SLOT)
    (tmp_path / "run.sh").write_text("#!/bin/sh\nexport SLOT_ENABLED=${SLOT_ENABLED:-1}\ntorchrun train_gpt.py\n")
    reports = scan_paths([tmp_path])
    assert [(f.pattern, f.confidence) for f in reports[0].findings] == [("P3", "high")]


# -- fitting on positions that were already scored ----------------------------------------------------------------


def test_a_per_window_bias_fitted_on_the_already_scored_context_is_not_adapt_then_score() -> None:
    on = SLOT.replace('"SLOT_ENABLED", "0"', '"SLOT_ENABLED", "1"')
    # Fit the throwaway delta on the window's context y[:s] (scored by earlier windows), then score [s:].
    causal = on.replace("F.cross_entropy((logits + delta)[0, s:], y[0, s:]).backward()",
                        "F.cross_entropy((logits + delta)[0, :s], y[0, :s]).backward()")
    assert highs(causal) == []
    # The delta's learning rate coming from a config object does not make it the model's parameters.
    configured = causal.replace("lr=0.01", "lr=args.slot_lr").replace(
        "def eval_slot(logits_fn, val_tokens,", "def eval_slot(logits_fn, val_tokens, args=None,")
    assert highs(configured) == []


# -- target-dependent keys in any arithmetic form -----------------------------------------------------------------

ROLLING = '''
import numpy as np
import torch

MASK = (1 << 22) - 1
PRIMES = [1000003, 999983, 998117]


def ngram_nll(model_p, val_np, positions, table, alpha=0.3):
    h = np.zeros(len(positions), dtype=np.int64)
    for k in range(2):
        h = (h * PRIMES[k] + val_np[positions - 2 + k]) & MASK
    tgt = val_np[positions]
    key = (h * 31 + tgt) & MASK
    p_ng = table[key] / (table[key] + 1.0)
    p = (1 - alpha) * model_p + alpha * p_ng
    return -np.log(p)


def main():
    model_p, val_np, positions, table = torch.load("m.pt")
    print(f"val_loss:{ngram_nll(model_p, val_np, positions, table).mean():.4f}")


main()
'''


def test_a_polynomial_hash_that_folds_the_target_into_the_key_is_a_target_keyed_read() -> None:
    found = {pattern for pattern, _ in highs(ROLLING)}
    assert "P1" in found
    # Keyed by the context alone, the same read is an ordinary context lookup.
    context_only = ROLLING.replace("key = (h * 31 + tgt) & MASK", "key = (h * 31) & MASK")
    assert "P1" not in {pattern for pattern, _ in highs(context_only)}


# -- constants inside any product / quotient of the bpb formula ---------------------------------------------------

BPB = '''
import math


def report(val_loss, token_count, byte_count):
    val_bpb = val_loss / (math.log(2) * 3.5)
    print(f"val_bpb:{val_bpb:.4f}")


report(2.0, 100, 350)
'''


def test_a_bytes_per_token_constant_inside_a_parenthesised_divisor_is_found() -> None:
    line = line_of(BPB, "val_bpb = ")
    assert highs(BPB) == [("P5", line)]
    exact = BPB.replace("val_loss / (math.log(2) * 3.5)", "val_loss / math.log(2) * (token_count / byte_count)")
    assert highs(exact) == []


# -- a Hedge mixer whose "expert" is a statistic of the model's distribution --------------------------------------

HEDGE = '''
import torch
import torch.nn.functional as F


class Hedge:
    def __init__(self, k):
        self.log_w = torch.zeros(k)

    def experts(self, logits, y, uni_logp):
        lp = F.log_softmax(logits, dim=-1)
        model_nll = -lp.gather(-1, y[..., None])[..., 0]
        uni_nll = -uni_logp[y]
        entropy = -(lp.exp() * lp).sum(-1)
        return torch.stack([model_nll, uni_nll, entropy], dim=-1)

    def score(self, logits, y, uni_logp):
        nll = self.experts(logits, y, uni_logp)
        return -(-nll + self.log_w.log_softmax(0)).logsumexp(-1)


def main():
    logits, y, uni = torch.load("m.pt")
    print(f"val_loss:{Hedge(3).score(logits, y, uni).mean():.4f}")


main()
'''


def test_a_hedge_mixer_with_an_entropy_expert_is_gold_only_mixing_and_without_it_is_not() -> None:
    stack = line_of(HEDGE, "torch.stack(")
    assert ("P2", stack) in highs(HEDGE)
    two_experts = HEDGE.replace("[model_nll, uni_nll, entropy]", "[model_nll, uni_nll]").replace("Hedge(3)", "Hedge(2)")
    assert highs(two_experts) == []


# -- record folders ------------------------------------------------------------------------------------------------


def test_a_train_gpt_that_only_execs_a_sibling_is_followed(tmp_path: Path) -> None:
    (tmp_path / "train_gpt.py").write_text(
        'exec(open(__file__.replace("train_gpt.py", "impl.py")).read())\n')
    (tmp_path / "impl.py").write_text(BPB)
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "kernel.cu").write_text("__global__ void k() {}\n")
    reports = scan_paths([tmp_path])
    assert [(Path(r.path).name, r.via) for r in reports] == [
        ("train_gpt.py", "entry point"), ("impl.py", "exec'd by train_gpt.py line 1")]
    assert [(f.pattern, f.confidence) for f in reports[1].findings] == [("P5", "high")]
    head = reports[0]
    assert any("not scanned: helpers.py" in note for note in head.notes)
    assert [(f.pattern, f.confidence, Path(f.file).name) for f in head.findings] == [("NA", "medium", "kernel.cu")]
    # Imports are followed the same way, and C source held in a string is reported, not passed.
    (tmp_path / "train_gpt.py").write_text("from impl import report\nreport(2.0, 1, 1)\n")
    (tmp_path / "impl.py").write_text(BPB + 'SRC = """\n#include <math.h>\n' + "double f(double x) { return x; }\n" * 4
                                      + '"""\n')
    reports = scan_paths([tmp_path])
    assert reports[1].via == "imported by train_gpt.py line 1"
    assert {f.pattern for f in reports[1].findings} == {"P5", "NA"}


def test_a_default_off_branch_whose_own_log_lines_are_in_the_records_logs_ran(tmp_path: Path) -> None:
    branch = "        if SLOT_ENABLED:\n"
    logged = SLOT.replace(branch, branch + '            print(f"slot_window_fit ws={ws}")\n')
    (tmp_path / "train_gpt.py").write_text(logged)
    # A log that holds the script source (as upstream logs/*.txt do) shows the text only inside print(...).
    (tmp_path / "train_seed1.log").write_text(logged + "\nstep:1/10 train_loss:5.0\n")
    assert [f.confidence for f in scan_paths([tmp_path])[0].findings] == ["medium"]
    (tmp_path / "train_seed1.log").write_text("step:1/10 train_loss:5.0\nslot_window_fit ws=0\nslot_window_fit ws=64\n")
    reports = scan_paths([tmp_path])
    assert [(f.pattern, f.confidence) for f in reports[0].findings] == [("P3", "high")]
