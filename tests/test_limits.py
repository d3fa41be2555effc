"""The challenge's limits live in trainer/limits.py only: every consumer reads them there, no module spells them."""

import ast
import re
from pathlib import Path

from service.api.settings import Settings
from service.engine.options import EvalOptions
from trainer.config import TrainConfig
from trainer.limits import EVAL_LIMIT_SECONDS, SUBMISSION_LIMIT_BYTES, TRAIN_LIMIT_MS, TRAIN_LIMIT_SECONDS

REPO_ROOT = Path(__file__).resolve().parents[1]
# The cap in any spelling a second copy would use: 16_000_000, 16000000, 600_000 (ms) in code; in the text of a
# message, 16,000,000 and 600 s (a message that spells the limit is wrong the day the limit changes).
SECOND_COPY = re.compile(r"\b(?:16_000_000|16000000|600_000|600000)\b")
SECOND_COPY_IN_TEXT = re.compile(r"16,000,000|\b600(?:\.0)? ?s\b")


def message_texts(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal and f-string piece in ``source``, docstrings left out (prose)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


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


def test_the_text_pattern_sees_messages_not_prose() -> None:
    source = '''"""Under 600 s and 16,000,000 bytes (a docstring: prose)."""
# a comment: 600 s
REASON = f"over 600 s by {1:.3f} s, limit 16,000,000"
'''
    found = [match for _, text in message_texts(source) for match in SECOND_COPY_IN_TEXT.findall(text)]
    assert found == ["600 s", "16,000,000"]


def test_no_module_spells_a_limit_itself() -> None:
    offenders = []
    for package in ("trainer", "service", "verifier", "bench"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.name == "limits.py" and path.parent.name == "trainer":
                continue
            source = path.read_text(encoding="utf-8")
            for number, line in enumerate(source.splitlines(), 1):
                code = line.split("#", 1)[0]
                if SECOND_COPY.search(code):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
            offenders += [f"{path.relative_to(REPO_ROOT)}:{number}: {text!r}" for number, text in message_texts(source)
                          if SECOND_COPY_IN_TEXT.search(text)]
    assert not offenders, "limits spelled outside trainer/limits.py:\n" + "\n".join(offenders)
