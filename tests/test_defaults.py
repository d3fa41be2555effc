"""The evaluation defaults are what the README says, at every entry point: the engine's options, the command line,
the HTTP form (and its OpenAPI schema), and `make demo`, which must not override them."""

from __future__ import annotations

import re
from pathlib import Path

from service.__main__ import build_parser, evaluation_modes
from service.api.schemas import EvaluationOptions
from service.engine.options import (
    PLAIN,
    RECIPES,
    UNTRAINED_CHUNK_TOKENS,
    EvalOptions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def readme_default() -> tuple[str, str]:
    stated = re.search(r"^# The default: score-first TTT \(([\w-]+) recipe\) \+ ([\w-]+) n-gram mixing", README,
                       re.MULTILINE)
    assert stated is not None, "the README no longer states the default evaluation"
    return stated.group(1), stated.group(2)


def test_engine_defaults_are_the_readme_default() -> None:
    recipe, ngram = readme_default()
    options = EvalOptions()
    assert (options.ttt, options.ttt_recipe, options.ngram) == (True, recipe, ngram)
    # The measured table marks the same mode as the default.
    default_rows = [line for line in README.splitlines() if line.startswith("|") and "(default)" in line]
    assert len(default_rows) == 1, default_rows
    assert f"TTT `{recipe}`" in default_rows[0] and f"{ngram} n-gram" in default_rows[0]


def test_command_line_defaults_and_plain() -> None:
    parse = build_parser().parse_args
    default = parse(["evaluate", "model.pgolf", "--data", "d"])
    assert evaluation_modes(default) == {"ttt": EvalOptions.ttt, "ngram": EvalOptions.ngram}
    assert default.ttt_recipe == EvalOptions.ttt_recipe and default.seq_len is None and default.chunk_tokens is None
    assert evaluation_modes(parse(["evaluate", "model.pgolf", "--data", "d", "--plain"])) == PLAIN
    mixed = parse(["evaluate", "model.pgolf", "--data", "d", "--plain", "--ngram", "exact"])
    assert evaluation_modes(mixed) == {"ttt": False, "ngram": "exact"}  # explicit flags win over --plain


def test_http_form_defaults_match_the_engine() -> None:
    form = EvaluationOptions()
    assert (form.ttt, form.ttt_recipe, form.ngram) == (EvalOptions.ttt, EvalOptions.ttt_recipe, EvalOptions.ngram)


def test_sequence_length_and_chunk_follow_the_artifact_and_the_recipe() -> None:
    assert EvalOptions().resolved(train_seq_len=256).seq_len == 256
    assert EvalOptions().resolved().seq_len == 2048  # an artifact without a recorded train_seq_len
    assert EvalOptions(seq_len=512).resolved(train_seq_len=256).seq_len == 512
    assert EvalOptions(ttt_recipe="legal-sgd").resolved().chunk_tokens == RECIPES["legal-sgd"].chunk_tokens
    assert {name: r.chunk_tokens for name, r in RECIPES.items()} == {"legal-sgd": 32_768, "pr940": 131_072}
    assert EvalOptions(ttt_recipe="pr940").resolved().chunk_tokens == 131_072
    assert EvalOptions(**PLAIN).resolved().chunk_tokens == UNTRAINED_CHUNK_TOKENS
    assert EvalOptions(stride=None).resolved(train_seq_len=256).stride == 256  # --non-overlapping


def test_make_demo_runs_the_defaults() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    demo = makefile[makefile.index("\ndemo:"):makefile.index("\ntest:")]
    assert "-m service demo" in demo and "-m verifier check" in demo and "-m verifier compare" in demo
    source = (REPO_ROOT / "service" / "demo.py").read_text(encoding="utf-8")
    assert "PGOLF_EVAL_ARGS" not in source  # nothing overrides the engine's defaults for the demo's upload
    assert not re.search(r"--(?:no-)?ttt|--ngram|--plain", demo)
