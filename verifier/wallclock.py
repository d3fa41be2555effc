"""The training-time verdict: PASS, WARN when only the final step crossed the 600 s cap, FAIL otherwise.

Upstream's loop (reference-stack.md §5.4) reads the clock after each optimizer step *without* waiting for the
device, compares it with the cap, and stops after the first step whose reading reached it; the final,
synchronised time is what the log reports. So an honest run overshoots the cap by part of its last step, and the
organisers accepted such runs. The verifier grants that and nothing more, judged from the log's own step timings:

* ``T`` = the training time after the run's last step ``N`` (the forced last step counts: it trained); of the
  lines at step ``N``, the most precise (a stop line in ms rather than a step line in minutes).
* ``T <= 600,000 ms``: PASS.
* Otherwise it is WARN only when all of these hold, and FAIL when any does not:

  1. no step line before step ``N`` is over the cap by more than its printing precision (no earlier step had
     crossed it);
  2. the run's pace ``d`` (ms per step) is measured from its step lines under the cap: the slope between the last
     two of them (the first of which may be step 0);
  3. the overshoot ``T - 600,000`` is at most ``STEP_ALLOWANCE`` steps at that pace;
  4. the time the log accounts for after its last step line under the cap, per step, is at most
     ``STEP_ALLOWANCE`` steps at that pace (a final "step" of minutes is not a step that crossed the cap).

``STEP_ALLOWANCE`` is 2 because of how the cap is read: the reading that stayed under the cap was taken before
the device had finished that step (its end can be up to one step later; each step ends in a device sync), and the
final step itself takes one more. A run whose final time exceeds the cap by more than that had already crossed
before its final step. Records without step timings (summary.json, the artifact manifest) cannot show that only
the final step crossed, so any time over the cap is FAIL there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.limits import TRAIN_LIMIT_MS
from verifier.logs import TimedStep, final_step
from verifier.report import FAIL, PASS, WARN

# The final step, plus the one step by which an unsynchronised clock reading can trail the device.
STEP_ALLOWANCE = 2


@dataclass(frozen=True)
class TimeVerdict:
    status: str  # PASS | WARN | FAIL
    time_ms: float | None
    overshoot_ms: float | None  # time_ms - limit when over the limit
    reason: str = ""
    pace_ms: float | None = None  # the run's ms per step under the cap, when it was measured

    def strict(self) -> TimeVerdict:
        """The verdict under ``--strict``: a WARN is a FAIL."""
        if self.status != WARN:
            return self
        return TimeVerdict(FAIL, self.time_ms, self.overshoot_ms, f"--strict: {self.reason}", self.pace_ms)


def judge_total(time_ms: float | None, limit_ms: float = TRAIN_LIMIT_MS) -> TimeVerdict:
    """A training time without step timings: over the limit is FAIL, however little."""
    if time_ms is None:
        return TimeVerdict(FAIL, None, None, "no training time stated")
    if time_ms <= limit_ms:
        return TimeVerdict(PASS, time_ms, None)
    return TimeVerdict(FAIL, time_ms, time_ms - limit_ms,
                       f"over the {limit_ms / 1000:.0f} s cap by {time_ms - limit_ms:.0f} ms (no step timings to "
                       f"show that only the final step crossed)")


def judge_steps(steps: Sequence[TimedStep], limit_ms: float = TRAIN_LIMIT_MS) -> TimeVerdict:
    """The verdict for one run from its timed step lines (see the module docstring for the rule)."""
    if not steps:
        return TimeVerdict(FAIL, None, None, "no line states the training time")
    final = final_step(list(steps))
    total, last_step = final.time_ms, final.step
    if total <= limit_ms:
        return TimeVerdict(PASS, total, None)
    over = total - limit_ms
    earlier = [s for s in steps if s.step < last_step]
    # A time printed in minutes ("10.0m") is only known to ±3 s: it has crossed only if it is over by more.
    crossed = [s for s in earlier if s.time_ms - s.precision_ms > limit_ms]
    if crossed:
        first = min(crossed, key=lambda s: s.step)
        return TimeVerdict(FAIL, total, over, f"over the cap by {over:.0f} ms and not only on the final step: step "
                                              f"{first.step} was already at {first.time_ms:.0f} ms")
    under = sorted({(s.step, min(s.time_ms, limit_ms)) for s in earlier})
    if not under or under[-1][0] <= 0:
        return TimeVerdict(FAIL, total, over, f"over the cap by {over:.0f} ms, and no step timing under the cap "
                                              f"to measure a step's duration")
    (prev_step, prev_ms) = under[-1]
    below = [point for point in under if point[0] < prev_step]
    if below:
        pace = (prev_ms - below[-1][1]) / (prev_step - below[-1][0])
    else:
        pace = prev_ms / prev_step
    allowance = STEP_ALLOWANCE * pace
    tail_pace = (total - prev_ms) / (last_step - prev_step)
    if over > allowance or tail_pace > allowance:
        why = (f"over the cap by {over:.0f} ms" if over > allowance else
               f"the {last_step - prev_step} step(s) after step {prev_step} ({prev_ms:.0f} ms) took "
               f"{tail_pace:.1f} ms each")
        return TimeVerdict(FAIL, total, over, f"{why}: more than {STEP_ALLOWANCE} steps at the run's pace of "
                                              f"{pace:.1f} ms/step ({allowance:.0f} ms), so not only the final step "
                                              f"crossed", pace)
    return TimeVerdict(WARN, total, over,
                       f"only the final step (step {last_step}) crossed the cap: over by {over:.0f} ms, within "
                       f"{STEP_ALLOWANCE} steps at the run's pace of {pace:.1f} ms/step; the organisers accepted "
                       f"such runs (--strict fails them)", pace)


def worst(verdicts: Sequence[TimeVerdict]) -> TimeVerdict:
    rank = {PASS: 0, WARN: 1, FAIL: 2}
    return max(verdicts, key=lambda v: (rank[v.status], v.time_ms or 0.0))
