"""The finding record shared by the scanner's detectors, and the confidence scale it is graded on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

CONFIDENCES = ("low", "medium", "high")

# What each pattern id means, for the report legend and the README.
PATTERNS = {
    "P1": "target token inside an n-gram lookup key",
    "P2": "only the gold token's probability is mixed",
    "P3": "adaptation on validation tokens before they are scored / rescoring",
    "P4": "calibration or training on validation data",
    "P5": "hard-coded bytes-per-token constant in the bpb denominator",
    "NA": "source the scanner cannot analyse (another language, compiled at run time)",
}


@dataclass(frozen=True)
class Finding:
    pattern: str  # "P1" .. "P5", or "NA" for source that was not analysed
    condition: str  # the rule broken: "C1+C2", "C2", "C3", "C4", "C3/C4", "C1/C4", "data", "metric"
    file: str
    line: int
    code: str  # the source line, stripped
    confidence: str  # "high" | "medium" | "low"
    explanation: str
    origin: str | None = None  # e.g. "lzma+base85 payload exec'd at line 2" when the code came from a wrapper

    def downgraded(self, steps: int, reason: str) -> Finding:
        if steps <= 0:
            return self
        level = max(CONFIDENCES.index(self.confidence) - steps, 0)
        return replace(self, confidence=CONFIDENCES[level], explanation=f"{self.explanation} ({reason})")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def sort_key(self) -> tuple[int, int, str]:
        return -CONFIDENCES.index(self.confidence), self.line, self.pattern
