"""``python -m verifier check --record DIR`` on small record folders written here (never copies of submissions).

A folder is built per test: a tiny train_gpt.py (plain, or a self-extracting lzma+base85 wrapper built here), the
training logs of its seeds in either upstream format, and a submission.json with the claims. Each test changes one
thing and asserts the row that must notice it.
"""

from __future__ import annotations

import base64
import json
import lzma
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from verifier.record import check_record, read_claims

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "import os\n\n\ndef main() -> None:\n    print(os.environ.get('SEED', '1337'))\n\n\nmain()\n"


def march_log(seed: int, final_ms: int, bpb: str, *, total: int = 15_900_000, pace_ms: float = 100.0) -> str:
    """A March-style stdout log: steps every 1000, the forced last step, the stop line and the results."""
    last = int(final_ms // pace_ms)
    lines = [f"seed:{seed}", "world_size:8 grad_accum_steps:1"]
    lines += [f"step:{s}/20000 train_loss:2.0000 train_time:{s * pace_ms:.0f}ms step_avg:{pace_ms:.2f}ms"
              for s in range(1000, last, 1000)]
    lines += [f"step:{last}/20000 val_loss:1.9 val_bpb:1.15 train_time:{final_ms}ms step_avg:{pace_ms:.2f}ms",
              f"stopping_early: wallclock_cap train_time:{final_ms}ms step:{last}/20000",
              "Code size: 200 bytes", f"Serialized model int6+lzma: {total - 200} bytes",
              f"Total submission size int6+lzma: {total} bytes",
              f"final_int6_sliding_window_exact val_loss:1.90000000 val_bpb:{bpb}"]
    return "\n".join(lines) + "\n"


def april_log(seed: int, final_ms: int, bpb: str) -> str:
    """An April-style log: hyperparameter dump, step lines in minutes, a spaced stop line."""
    return (f"Hyperparameters:\n  seed: {seed}\n  world_size: 8\n"
            "1000/20000 train_loss: 2.0 train_time: 2.0m tok/s: 100\n"
            "4000/20000 train_loss: 2.0 train_time: 8.0m tok/s: 100\n"
            f"4999/20000 val_loss: 2.3 val_bpb: 1.07\n"
            f"stopping_early: wallclock_cap train_time: {final_ms}ms step: 4999/20000\n"
            "Code size (compressed): 150 bytes\nTotal submission size quantized+brotli: 15950000 bytes\n"
            f"quantized_ttt_phased val_loss:2.3 val_bpb:{bpb} eval_time:400000ms\n")


def make_record(tmp_path: Path, logs: dict[str, str], submission: dict, script: str = SCRIPT) -> Path:
    folder = tmp_path / "record"
    folder.mkdir()
    (folder / "train_gpt.py").write_text(script)
    for name, text in logs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "submission.json").write_text(json.dumps(submission))
    (folder / "requirements.txt").write_text("numpy\n")
    return folder


def rows(folder: Path, **kwargs) -> dict[str, tuple[str, str, str]]:
    return {r.name: (r.status, r.figure, r.reason) for r in check_record(folder, **kwargs).results}


def three_seeds() -> dict:
    return {"val_bpb": 1.12, "bytes_total": 15_900_000, "bytes_code": 200,
            "seed_results": {"1": {"val_bpb": 1.11, "artifact_bytes": 15_900_000},
                             "2": {"val_bpb": 1.12, "train_time_s": 599.9},
                             "3": {"val_bpb": 1.13}}}


def test_a_clean_record_passes_with_both_log_formats(tmp_path: Path) -> None:
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 599_500, "1.11000000"),
                                    "train_seed2.log": march_log(2, 599_900, "1.12000000"),
                                    "logs/seed3.txt": april_log(3, 599_000, "1.13000000")}, three_seeds())
    found = rows(folder)
    failing = {name: row for name, row in found.items() if row[0] == "FAIL"}
    assert not failing, failing
    assert found["record_logs"][1] == "3 training log(s) (2 March format, 1 April format); not logs: requirements.txt"
    assert found["val_bpb[seed 3]"][0] == "PASS" and "logs/seed3.txt line 10" in found["val_bpb[seed 3]"][1]
    assert found["val_bpb_mean"][1].startswith("claimed val_bpb 1.12 = mean of 3 per-seed claims")
    assert "submission.json train_time_s agrees" in found["train_time[train_seed2.log]"][1]
    assert found["scan"][:2] == ("PASS", "1 file(s) scanned: train_gpt.py (entry point); 0 finding(s), 0 high")
    assert rows(folder, scan=False)["scan"] == ("SKIP", "", "not run by this caller")


def test_a_final_step_overshoot_is_warn_and_strict_fails_it(tmp_path: Path) -> None:
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 600_080, "1.11000000")},
                         {"val_bpb": 1.11, "seeds": [1], "seed_scores": [1.11]})
    status, figure, reason = rows(folder)["train_time[train_seed1.log]"]
    assert status == "WARN" and "600,080 ms > 600,000 ms at step 6000, 80 ms over" in figure
    assert "only the final step (step 6000) crossed the cap: over by 80 ms" in reason
    assert rows(folder, strict=True)["train_time[train_seed1.log]"][0] == "FAIL"


def test_minutes_over_is_fail(tmp_path: Path) -> None:
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 700_000, "1.11000000")},
                         {"val_bpb": 1.11, "track": "non-record-16mb"})
    status, _, reason = rows(folder)["train_time[train_seed1.log]"]
    assert reason.endswith("submission.json declares track 'non-record-16mb', not the 10-minute record track")
    assert status == "FAIL" and reason.startswith("training wall-clock") is False
    assert "over the cap by 100000 ms: more than 2 steps at the run's pace of 100.0 ms/step" in reason


def test_claims_that_the_logs_do_not_print_fail(tmp_path: Path) -> None:
    claims = three_seeds()
    claims["seed_results"]["1"]["val_bpb"] = 1.104  # the log prints 1.11000000
    claims["seed_results"]["2"]["train_time_s"] = 590.0
    claims["val_bpb"] = 1.104
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 599_500, "1.11000000"),
                                    "train_seed2.log": march_log(2, 599_900, "1.12000000")}, claims)
    found = rows(folder)
    assert found["val_bpb[seed 1]"][0] == "FAIL" and "train_seed1.log 1.11" in found["val_bpb[seed 1]"][2]
    assert found["val_bpb[seed 3]"][0] == "SKIP"  # claimed, but no log of seed 3
    assert found["val_bpb_mean"][0] == "FAIL"
    assert found["train_time[train_seed2.log]"][0] == "FAIL"
    assert "train_time_s says 590000 ms for seed 2, the log 599900 ms" in found["train_time[train_seed2.log]"][2]


def test_sizes_over_the_cap_or_unlike_the_log_fail(tmp_path: Path) -> None:
    claims = three_seeds()
    claims["seed_results"]["1"]["artifact_bytes"] = 15_000_000
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 599_500, "1.11000000", total=16_000_001)},
                         claims)
    status, _, reason = rows(folder)["record_sizes"]
    assert status == "FAIL"
    assert "train_seed1.log states a submission of 16,000,001 bytes, over 16,000,000" in reason
    assert "seed 1: submission.json claims 15,000,000 bytes" in reason


def test_code_bytes_count_the_self_extracting_wrapper(tmp_path: Path) -> None:
    payload = base64.b85encode(lzma.compress(SCRIPT.encode() * 20)).decode()
    wrapper = f"import lzma as L,base64 as B\nexec(L.decompress(B.b85decode({payload!r})))\n"
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 599_500, "1.11000000")},
                         {"val_bpb": 1.11}, script=wrapper)
    status, figure, _ = rows(folder)["code_bytes"]
    assert status == "PASS"
    assert f"train_gpt.py {len(wrapper):,} bytes as submitted (self-extracting: " in figure
    assert f"{len(SCRIPT) * 20:,} bytes of readable source" in figure


def test_a_folder_without_training_logs_fails(tmp_path: Path) -> None:
    folder = make_record(tmp_path, {"notes.txt": "nothing to see\n"}, {"val_bpb": 1.2})
    status, figure, reason = rows(folder)["record_logs"]
    assert status == "FAIL" and "not logs: notes.txt" in figure and "no training log" in reason


def test_the_claims_reader_understands_the_seed_table_spellings() -> None:
    from decimal import Decimal

    def parsed(document: str):
        return read_claims(json.loads(document, parse_float=Decimal))

    claims = parsed('{"mean_val_bpb": 1.2, "val_bpb_seeds": {"seed_7": 1.19, "seed_8": 1.21}}')
    assert claims.headline_bpb.value == 1.2 and sorted(claims.per_seed) == [7, 8]
    assert claims.per_seed[7].val_bpb.value == 1.19 and claims.per_seed[7].val_bpb.decimals == 2
    claims = parsed('{"val_bpb": 1.0, "seeds": [1, 2], "seed_bpbs": [0.9, 1.1], "train_time_seconds": 600}')
    assert claims.per_seed[2].val_bpb.value == 1.1
    claims = parsed('{"val_bpb": 1.0, "seeds": [1.01, 0.99]}')  # scores listed under "seeds", without seeds
    assert [c.value for c in claims.unlabelled_bpb] == [1.01, 0.99] and not claims.per_seed
    claims = parsed('{"per_seed": {"3": {"val_bpb": 1.5, "train_ms": 599000, "bytes_total": 15000000}}}')
    assert claims.per_seed[3].train_time_ms.value == 599_000 and claims.per_seed[3].total_bytes == 15_000_000


def test_the_cli_prints_the_table_and_writes_json_and_junit(tmp_path: Path) -> None:
    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 600_080, "1.11000000")},
                         {"val_bpb": 1.11, "seeds": [1], "seed_scores": [1.11]})
    command = [sys.executable, "-m", "verifier", "check", "--record", str(folder), "--json", str(tmp_path / "c.json"),
               "--junit", str(tmp_path / "c.xml")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    document = json.loads((tmp_path / "c.json").read_text())
    checks = {check["name"]: check for check in document["checks"]}
    assert checks["train_time[train_seed1.log]"]["status"] == "WARN"
    (log,) = [entry for entry in document["logs"] if entry["path"] == "train_seed1.log"]
    assert log["formats"] == ["March"] and log["runs"][0]["overshoot_ms"] == 80.0
    assert done.returncode == (0 if document["passed"] else 1), done.stdout
    suite = ET.parse(tmp_path / "c.xml").getroot().find("testsuite")
    assert suite is not None and [c.get("name") for c in suite.iter("testcase")] == list(checks)
    strict = subprocess.run([*command[:6], "--strict"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert strict.returncode == 1 and "--strict: only the final step" in strict.stdout
    both = subprocess.run([sys.executable, "-m", "verifier", "check", str(folder / "x.ptz"), "--record", str(folder)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert both.returncode == 2 and "either ARTIFACT or --record DIR" in both.stderr


def test_links_fifos_and_huge_lines_are_refused_or_bounded(tmp_path: Path) -> None:
    import os

    folder = make_record(tmp_path, {"train_seed1.log": march_log(1, 599_500, "1.11000000")}, {"val_bpb": 1.11})
    (folder / "zero.log").symlink_to("/dev/zero")  # would never end if read
    os.mkfifo(folder / "pipe.txt")  # would block forever if opened
    # A line that costs quadratic time in a naive nvidia-smi pattern (hours at this length), and a very long line
    # of pairs: lines are read up to MAX_LINE_CHARS, with patterns that stay linear.
    (folder / "long.txt").write_text("|  0  NVIDIA" + " " * 2_000_000 + "x\n" + "bpb:1 " * 500_000 + "\n")
    record = check_record(folder, scan=False)
    logs = {log.path: log for log in record.logs}
    assert logs["zero.log"].kind == logs["pipe.txt"].kind == "unreadable"
    assert "not a regular file" in logs["zero.log"].error
    assert logs["long.txt"].kind == "evaluation log" and len(logs["long.txt"].figures()) < 1000
    rows = {r.name: r for r in record.results}
    assert rows["record_logs"].status == "FAIL" and "zero.log: not a regular file" in rows["record_logs"].reason
