"""The tolerant training-log reader (verifier.logs) and the three-valued time verdict (verifier.wallclock).

Each test is one mechanism, on a few lines written here (never copied from a submission): the spellings of a
step line, prefixes, the script source echoed at a file log's head, several runs in one file, what belongs to
which run, and the rule that decides PASS / WARN / FAIL from a run's own step timings.
"""

from __future__ import annotations

import pytest

import verifier.logs as logs
from verifier.logs import LogError, TimedStep, parse_training_log
from verifier.wallclock import STEP_ALLOWANCE, judge_steps, judge_total


def steps_of(text: str) -> list[tuple[int, float, bool]]:
    (run,) = parse_training_log(text)
    return [(s.step, s.time_ms, s.stop) for s in run.steps]


def test_march_and_april_separators_and_units_read_alike() -> None:
    march = "step:10/20 train_loss:2.0 train_time:1000ms step_avg:100.00ms\n" \
            "stopping_early: wallclock_cap train_time:2000ms step:20/20\n"
    april = "10/20 train_loss: 2.0 train_time: 1.5m tok/s: 100\n" \
            "stopping_early: wallclock_cap train_time: 2000ms step: 20/20\n"
    assert steps_of(march) == [(10, 1000.0, False), (20, 2000.0, True)]
    assert steps_of(april) == [(10, 90_000.0, False), (20, 2000.0, True)]
    (march_run,) = parse_training_log(march)
    (april_run,) = parse_training_log(april)
    assert march_run.time_separators == {"train_time:"}
    assert april_run.time_separators == {"train_time: "}


def test_abbreviated_keys_and_line_prefixes_are_read() -> None:
    text = ("[2026-01-02 03:04:05] INFO: step:5/9 train_loss:3.0 train_time:500ms\n"
            "1776000000.125 6/9 train_loss: 2.9 train_time: 0.1m tok/s: 5\n"
            "s:7/9 tl:2.8 tt:700ms sa:100.00ms\n"
            "stop tt:800ms s:8/9\n")
    assert steps_of(text) == [(5, 500.0, False), (6, 6000.0, False), (7, 700.0, False), (8, 800.0, True)]


def test_a_time_without_a_unit_or_not_at_the_line_start_is_not_a_step() -> None:
    text = ("step:1/9 train_loss:3.0 train_time:100\n"  # no unit: unknown scale, ignored
            "note: step:2/9 train_time:200ms\n"  # a step token inside another line
            "warmup_step: 3/9 train_time: 300ms\n"  # a different counter
            "step:4/9 train_time:400ms\n")
    assert steps_of(text) == [(4, 400.0, False)]


def test_world_size_and_seed_in_any_spelling() -> None:
    for line in ("world_size:8 grad_accum_steps:1", "  world_size: 8", "World size: 8, Grad accum: 1", "ws:8 ga:1"):
        (run,) = parse_training_log(f"seed:7\n{line}\nstep:1/2 train_time:10ms\n")
        assert (run.world_size, run.seed) == (8, 7), line


def test_the_script_source_at_a_file_logs_head_is_skipped() -> None:
    text = ("import os\n"
            "seed = 1337\n"
            "running_bpb = 0.0\n"
            "# stopping_early: wallclock_cap train_time:999999ms step:9/9\n"
            '    log0(f"step:{step}/{n} train_time:{t:.0f}ms")\n'
            + "=" * 100 + "\n"
            "seed:7\nstep:1/9 train_loss:3.0 train_time:100ms\nfinal val_bpb:1.25\n")
    (run,) = parse_training_log(text)
    assert [(s.step, s.time_ms) for s in run.steps] == [(1, 100.0)]
    assert run.seed == 7 and [f.value for f in run.bpb] == [1.25]


def test_a_source_block_never_swallows_a_run() -> None:
    # A stdout log followed by the file log of the same run (source echo cut short at its head, then the run).
    run = "step:1/9 train_time:100ms\nstopping_early: wallclock_cap train_time:200ms step:2/9\nval_bpb:1.5\n"
    text = "import os\n" + run + "    x = f(y)\nimport sys\n" + "=" * 100 + "\n" + run
    assert [r.final.time_ms for r in parse_training_log(text)] == [200.0, 200.0]


def test_nvidia_smi_gpus_are_counted_across_the_table() -> None:
    gpu = "|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |\n"
    row = "| N/A   33C    P0            118W /  700W |       1MiB /  81559MiB |      0%      Default |\n"
    table = "+----+\n" + "".join(gpu.format(i=i) + row + "+----+\n" for i in range(4))
    (run,) = parse_training_log(table + "step:1/2 train_time:10ms\n")
    assert run.device == "4xNVIDIA H100 80GB HBM3"


def test_several_runs_in_one_file_and_what_belongs_to_each() -> None:
    text = ("seed:1\n"
            "step:1/9 train_time:100ms\nstep:2/9 train_time:200ms\n"
            "final_exact val_loss:2.0 val_bpb:1.2345\n"
            "Total submission size int6+lzma: 15000000 bytes\n"
            "seed:2\n"  # the second run's setup, printed after the first run's results
            "step:1/9 train_time:110ms\nstep:2/9 train_time:220ms\n"
            "final_exact val_loss:2.0 val_bpb:1.11111111\n")
    first, second = parse_training_log(text)
    assert (first.seed, first.final.time_ms, first.score.value, first.total_bytes) == (1, 200.0, 1.2345, 15_000_000)
    assert (second.seed, second.final.time_ms, second.score.value) == (2, 220.0, 1.11111111)
    assert second.score.decimals == 8 and second.total_bytes is None


def test_bpb_figures_come_from_results_not_from_training_steps() -> None:
    text = ("step:100/200 val_loss:2.5 val_bpb:1.5 train_time:1000ms\n"
            "100/200 val_loss: 2.4 val_bpb: 1.4\n"  # an April-style validation step line, untimed
            "stopping_early: wallclock_cap train_time:2000ms step:200/200\n"
            '  "post_ttt_val_bpb": 1.0640,\n'
            "Quantized BPB: 1.041537\n")
    (run,) = parse_training_log(text)
    assert [(f.value, f.decimals) for f in run.bpb] == [(1.064, 4), (1.041537, 6)]


def test_an_evaluation_only_log_has_figures_and_no_steps() -> None:
    (run,) = parse_training_log("seed: 42\nquantized_ttt val_loss:2.3 val_bpb:1.06400238 eval_time:5000ms\n")
    assert run.steps == [] and run.step_lines == 0 and run.seed == 42 and run.score.value == 1.06400238


# ---------------------------------------------------------------------------------------------------------------
# The time verdict


def run_steps(*points: tuple[int, float], stop: tuple[int, float] | None = None) -> list[TimedStep]:
    steps = [TimedStep(step, ms, line, f"step:{step} {ms}ms") for line, (step, ms) in enumerate(points, start=1)]
    if stop:
        steps.append(TimedStep(stop[0], stop[1], len(points) + 1, "stop", stop=True))
    return steps


def test_under_the_cap_passes_and_the_cap_itself_is_in() -> None:
    assert judge_steps(run_steps((0, 0.0), (100, 500_000.0), (120, 600_000.0))).status == "PASS"


def test_only_the_final_step_crossing_is_a_warn_with_its_milliseconds() -> None:
    # 100 ms per step up to step 5999 (599,900 ms); the final step 6000 ends 50 ms over the cap.
    verdict = judge_steps(run_steps((0, 0.0), (5000, 500_000.0), (5999, 599_900.0), stop=(6000, 600_050.0)))
    assert verdict.status == "WARN" and verdict.overshoot_ms == 50.0 and verdict.pace_ms == 100.0
    assert "over by 50 ms" in verdict.reason and "organisers accepted" in verdict.reason
    strict = verdict.strict()
    assert strict.status == "FAIL" and strict.reason.startswith("--strict: ")


def test_the_overshoot_allowance_is_two_steps_at_the_runs_pace() -> None:
    def over_by(ms: float) -> str:
        return judge_steps(run_steps((0, 0.0), (5000, 500_000.0), stop=(6001, 600_000.0 + ms))).status

    assert STEP_ALLOWANCE == 2
    assert over_by(200.0) == "WARN"  # exactly two steps of 100 ms
    assert over_by(201.0) == "FAIL"


def test_an_earlier_step_past_the_cap_fails_however_small_the_overshoot() -> None:
    verdict = judge_steps(run_steps((0, 0.0), (6000, 600_010.0), stop=(6001, 600_020.0)))
    assert verdict.status == "FAIL" and "step 6000 was already at 600010 ms" in verdict.reason


def test_a_final_step_out_of_pace_with_the_run_fails() -> None:
    # Two 100 ms steps, then a "step" of ten minutes ending 100 ms over: the time is not one step's overshoot.
    verdict = judge_steps(run_steps((1, 100.0), (2, 200.0), stop=(3, 600_100.0)))
    assert verdict.status == "FAIL" and "took 599900.0 ms each" in verdict.reason


def test_minutes_over_fails() -> None:
    verdict = judge_steps(run_steps((0, 0.0), (4000, 400_000.0), (8000, 800_000.0), stop=(8001, 800_100.0)))
    assert verdict.status == "FAIL" and verdict.overshoot_ms == 200_100.0


def test_no_step_timings_cannot_show_a_final_step_overshoot() -> None:
    assert judge_total(600_000.0).status == "PASS"
    assert judge_total(600_001.0).status == "FAIL"
    assert judge_steps(run_steps(stop=(10, 600_050.0))).status == "FAIL"
    assert judge_steps([]).reason == "no line states the training time"


def test_a_file_with_more_lines_than_any_log_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "MAX_TIMED_LINES", 10)
    monkeypatch.setattr(logs, "MAX_FIGURES", 10)
    with pytest.raises(LogError, match="more than 10 timed step lines"):
        parse_training_log("".join(f"step:{i}/99 train_time:{i}ms\n" for i in range(11)))
    with pytest.raises(LogError, match="more than 10 bits-per-byte figures"):
        parse_training_log("val_bpb:1.0\n" * 11)
