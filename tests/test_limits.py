"""The challenge's limits live in trainer/limits.py only: every consumer reads them there, no module spells them."""

import re
from pathlib import Path

from service.api.settings import Settings
from service.engine.options import EvalOptions
from trainer.config import TrainConfig
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES, TRAIN_LIMIT_SECONDS
from verifier.wallclock import TRAIN_LIMIT_MS

REPO_ROOT = Path(__file__).resolve().parents[1]
# The cap in any spelling a second copy would use: 16_000_000, 16000000, 600_000 (ms).
SECOND_COPY = re.compile(r"\b(?:16_000_000|16000000|600_000|600000)\b")


def test_limits_are_the_challenges() -> None:
    assert SUBMISSION_LIMIT_BYTES == 16_000_000  # decimal bytes, artifact + counted code
    assert TRAIN_LIMIT_SECONDS == EVAL_LIMIT_SECONDS == 600.0
    assert TRAIN_LIMIT_MS == 600_000


def test_defaults_read_the_one_copy(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"")
    settings = Settings.from_env({"PGOLF_DATA_DIR": str(tmp_path), "PGOLF_TOKENIZER": str(tokenizer),
                                  "PGOLF_WORKERS": "0"})
    assert settings.max_artifact_bytes == SUBMISSION_LIMIT_BYTES
    assert settings.eval_limit_seconds == EVAL_LIMIT_SECONDS
    assert EvalOptions().max_seconds == EVAL_LIMIT_SECONDS
    assert TrainConfig().max_wallclock_seconds == TRAIN_LIMIT_SECONDS


def test_no_module_spells_a_limit_itself() -> None:
    offenders = []
    for package in ("trainer", "service", "verifier", "bench"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.name == "limits.py" and path.parent.name == "trainer":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if SECOND_COPY.search(code):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "limits spelled outside trainer/limits.py:\n" + "\n".join(offenders)
