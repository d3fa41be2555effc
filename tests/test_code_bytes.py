"""Counted code bytes: the import-graph rule, and the proof that the counted files alone evaluate an artifact.

The sufficiency test copies exactly the counted files into an empty directory, starts Python there without the
project on its path (``-S``: no site hooks, so not even the editable install can supply a missing module) and
evaluates a real artifact in every compliant mode; the events must equal, bit for bit, those of the normal run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece
import torch
from test_artifact import assemble, split

from service.engine.options import NGRAM_MODES, TTT_RECIPE_NAMES
from service.judge import judged
from trainer.artifact import SchemaViolation, read_artifact
from trainer.artifact_metadata import read_submission
from trainer.code_bytes import NOT_COUNTED, counted_code_bytes
from trainer.data.shards import load_validation_tokens
from trainer.data.writer import write_shard
from trainer.export import write_artifact
from trainer.model import GPT, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2, bigram_buckets=64,
                   bigram_dim=16, xsa_last_n=2)
VAL_TOKENS = 1500
SMALL_RUN = {"device": "cpu", "seq_len": 128, "stride": 64, "chunk_tokens": 512, "batch_windows": 8}
NON_COMPLIANT_MODES = ("hashed-940",)
TIMING = {"elapsed_s", "phase_seconds"}  # wall-clock fields: the only ones that may differ between the two runs


def _untimed(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in event.items() if k not in TIMING} for event in events]


# Runs evaluations given as JSON on argv[1]; prints their raw engine events and the project modules the process
# loaded (the judge, service/judge.py, is not counted: the test judges both runs' events itself). A failure to
# import is recorded, not raised, so the excluded mode can be shown to need an uncounted file.
DRIVER = r"""
import json, sys
from pathlib import Path
from service.engine.options import EvalOptions
from service.engine.run import evaluate

runs = []
for case in json.loads(sys.argv[1]):
    paths = {k: Path(v) for k, v in case.items() if k in ("artifact", "data_dir", "tokenizer")}
    try:
        events = list(evaluate(EvalOptions(**{**case, **paths})))
    except ImportError as exc:
        events = [{"type": "import_error", "name": exc.name}]
    runs.append(events)
modules = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] in ("trainer", "service")}
print(json.dumps({"runs": runs, "modules": modules}))
"""


@pytest.fixture(scope="module")
def eval_inputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny random-init artifact and a short val shard (FineWeb sample if present, else the embedded corpus)."""
    sample = Path(os.environ.get("PGOLF_SHARED_DATA") or REPO_ROOT.parent / "shared/data/fineweb_sample")
    if (sample / "tokenizers/fineweb_1024_bpe.model").is_file():
        source, tokenizer = sample / "datasets/fineweb10B_sp1024", sample / "tokenizers/fineweb_1024_bpe.model"
    else:
        source = request.getfixturevalue("embedded_data")
        tokenizer = source / "tokenizer.model"
    out = tmp_path_factory.mktemp("sufficiency_inputs")
    write_shard(out / "fineweb_val_000000.bin", load_validation_tokens(source)[:VAL_TOKENS])
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    config = replace(TINY, vocab_size=vocab)
    torch.manual_seed(0)
    training = {"seed": 0, "steps": 0, "world_size": 1, "device": "cpu", "train_time_ms": 0.0, "code_version": "t"}
    write_artifact(out / "tiny.pgolf", GPT(config).state_dict(), config,
                   hashlib.sha256(tokenizer.read_bytes()).hexdigest(), vocab, training,
                   code_bytes=counted_code_bytes())
    broken = tmp_path_factory.mktemp("sufficiency_truncated_shard")  # for the failure path: a shard cut short
    shard = (out / "fineweb_val_000000.bin").read_bytes()
    (broken / "fineweb_val_000000.bin").write_bytes(shard[: len(shard) - 7])
    # The engine reads the training section as an object: one that is not is refused by the counted reader itself.
    with_training(out / "tiny.pgolf", out / "training_not_an_object.pgolf", ["seed", 0])
    return {"artifact": str(out / "tiny.pgolf"), "data_dir": str(out), "tokenizer": str(tokenizer),
            "truncated_data_dir": str(broken), "bad_training": str(out / "training_not_an_object.pgolf")}


def with_training(source: Path, target: Path, training: object) -> None:
    """A copy of an artifact whose manifest's training section is replaced (the payload and its hashes are kept)."""
    manifest, payload = split(source.read_bytes())
    target.write_bytes(assemble({**manifest, "training": training}, payload))


def _run_driver(cases: list[dict], *, isolated_root: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"  # both runs on one thread: bit-identical floats need the same reduction order
    if isolated_root is None:
        command, cwd = [sys.executable, "-c", DRIVER, json.dumps(cases)], REPO_ROOT
    else:
        # -S skips site-packages processing (and with it the editable install's import hook); the installed
        # libraries are put on the path by hand, after the copied code.
        libraries = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        env["PYTHONPATH"] = os.pathsep.join([str(isolated_root), *libraries])
        command, cwd = [sys.executable, "-S", "-c", DRIVER, json.dumps(cases)], isolated_root
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_counted_files_alone_evaluate_an_artifact_bit_identically(tmp_path: Path,
                                                                      eval_inputs: dict[str, str]) -> None:
    code = counted_code_bytes()
    assert "service/judge.py" not in code.files  # the engine measures; the judge is the service's
    isolated = tmp_path / "counted"
    for rel in code.files:
        (isolated / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / rel, isolated / rel)
    compliant = [mode for mode in NGRAM_MODES if mode not in NON_COMPLIANT_MODES]
    inputs = {k: v for k, v in eval_inputs.items() if k not in ("truncated_data_dir", "bad_training")}
    cases = [{**inputs, **SMALL_RUN}]  # the engine's defaults
    cases += [{**inputs, **SMALL_RUN, "ttt": True, "ttt_recipe": recipe, "ngram": mode}
              for recipe in TTT_RECIPE_NAMES for mode in compliant]
    # The failure paths are part of the evaluation: the copy must refuse bad inputs with the same error events.
    failing = [{**inputs, **SMALL_RUN, "data_dir": eval_inputs["truncated_data_dir"]},
               {**inputs, **SMALL_RUN, "tokenizer": str(Path(inputs["data_dir"]) / "missing.model")},
               {**inputs, **SMALL_RUN, "artifact": eval_inputs["bad_training"]}]
    excluded = [{**inputs, **SMALL_RUN, "ngram": mode} for mode in NON_COMPLIANT_MODES]

    normal = _run_driver(cases + failing, isolated_root=None)
    alone = _run_driver(cases + failing + excluded, isolated_root=isolated)

    # The judge decides on both runs' measurements alike: the same verdict, compliant in every compliant mode.
    verdicts = [_untimed(list(judged(run))) for run in normal["runs"]]
    for run in verdicts[: len(cases)]:
        assert run[-1]["type"] == "end" and run[-1]["compliance"]["compliant"], run[-1]
        assert math.isfinite(run[-1]["val_bpb"])
    assert [run[-1]["code"] for run in normal["runs"][len(cases):]] == ["bad_data", "bad_tokenizer",
                                                                        "schema_violation"]
    assert "training must be an object, got list" in normal["runs"][-1][-1]["reason"]
    assert [_untimed(run) for run in alone["runs"][: len(cases) + len(failing)]] == [
        _untimed(run) for run in normal["runs"]]
    assert [_untimed(list(judged(run))) for run in alone["runs"][: len(cases) + len(failing)]] == verdicts
    # The non-compliant mode needs a file that is not counted, so the copy really is all there is.
    assert all(run == [{"type": "import_error", "name": "service.engine.ngram_hashed"}]
               for run in alone["runs"][len(cases) + len(failing):])
    for name, file in alone["modules"].items():
        assert file is not None and Path(file).resolve().is_relative_to(isolated.resolve()), (name, file)
    # And the normal run loaded nothing from the project beyond the counted files.
    loaded = {Path(f).resolve().relative_to(REPO_ROOT).as_posix() for f in normal["modules"].values() if f}
    assert loaded <= set(code.files), sorted(loaded - set(code.files))
    print(f"counted {code.total:,} bytes in {len(code.files)} files; loaded by the normal run: {len(loaded)}; "
          f"counted but not loaded here: {sorted(set(code.files) - loaded)}")


def test_metadata_the_evaluation_skips_is_still_refused_at_upload_and_by_verifier_check(
        tmp_path: Path, eval_inputs: dict[str, str]) -> None:
    """The training section is checked where an artifact enters, not by the counted reader (ruling R2): a bad one
    is refused by the service's upload validator and by ``verifier check`` with the code and message it always had.
    """
    training = {"seed": 0, "steps": 0, "world_size": 0, "device": "cpu", "train_time_ms": 0.0, "code_version": "t"}
    bad = tmp_path / "world_size_0.pgolf"
    with_training(Path(eval_inputs["artifact"]), bad, training)
    message = "training.world_size must be an integer in [1, 65536]"
    assert read_artifact(bad).manifest["training"] == training  # the evaluation's reader: not its business
    with pytest.raises(SchemaViolation, match=re.escape(message)):
        read_submission(bad)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    request = json.dumps({"path": str(bad), "max_file_bytes": 16_000_000}) + "\n"
    helper = subprocess.run([sys.executable, "-m", "service.api.validation"], input=request, capture_output=True,
                            text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert helper.returncode == 0, helper.stderr[-4000:]
    assert json.loads(helper.stdout.splitlines()[-1]) == {"ok": False, "code": "schema_violation", "message": message}

    report = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "verifier", "check", str(bad), "--json", str(report)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    integrity = next(c for c in json.loads(report.read_text())["checks"] if c["name"] == "artifact_integrity")
    assert integrity["status"] == "FAIL" and integrity["figure"] == "refused: schema_violation", integrity
    assert message in integrity["reason"], integrity


# ---- the rule ----------------------------------------------------------------------------------------------


def test_counted_code_bytes_of_this_checkout() -> None:
    code = counted_code_bytes()
    for required in ("service/engine/run.py", "trainer/model.py", "trainer/artifact.py",
                     "trainer/data/byte_accounting.py"):
        assert required in code.files
    assert all(code.files[rel] == (REPO_ROOT / rel).stat().st_size for rel in code.files)
    assert code.total == sum(code.files.values()) and list(code.files) == sorted(code.files)
    never = ("verifier/", "service/api/", "service/__main__.py", "trainer/train.py", "trainer/muon.py",
             "trainer/code_bytes.py", "trainer/export.py", "trainer/data/download.py", "trainer/cli.py",
             "trainer/artifact_metadata.py", "trainer/evaluate.py")
    assert not [rel for rel in code.files if rel.startswith(never)]
    assert not [rel for rel in code.files if rel.removesuffix(".py").replace("/", ".") in NOT_COUNTED]


def _tree(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


BASE_TREE = {
    "trainer/__init__.py": "",
    "trainer/artifact.py": "from typing import TYPE_CHECKING\nfrom trainer.model import GPT\n"
                           "if TYPE_CHECKING:\n    from trainer.code_bytes import CodeBytes\n",
    "trainer/model.py": "π = 3  # non-ASCII: counted in bytes, not characters\n",
    "trainer/code_bytes.py": "",
    "trainer/muon.py": "",
    "trainer/data/__init__.py": "",
    "trainer/data/byte_accounting.py": "import numpy\n",
    "trainer/data/loader.py": "from . import shards\n",
    "trainer/data/shards.py": "",
    "service/__init__.py": "",
    "service/engine/__init__.py": "",
    "service/engine/run.py": "from trainer.data.byte_accounting import ByteTables\n"
                             "def evaluate():\n    from trainer.data.loader import load\n"
                             "    from trainer import artifact\n",
    "service/engine/unused.py": "x = 1\n",
}


def test_counted_code_bytes_follows_imports(tmp_path: Path) -> None:
    _tree(tmp_path, BASE_TREE)
    code = counted_code_bytes(tmp_path)
    assert list(code.files) == [
        "service/__init__.py",
        "service/engine/__init__.py",
        "service/engine/run.py",
        "trainer/__init__.py",
        "trainer/artifact.py",
        "trainer/data/__init__.py",
        "trainer/data/byte_accounting.py",
        "trainer/data/loader.py",
        "trainer/data/shards.py",
        "trainer/model.py",
    ]
    assert code.files["trainer/model.py"] == len("π = 3  # non-ASCII: counted in bytes, not characters\n".encode())
    assert code.total == sum(code.files.values())


def test_not_counted_modules_must_be_imported_lazily(tmp_path: Path) -> None:
    excluded = next(iter(NOT_COUNTED))
    package, _, name = excluded.rpartition(".")
    lazy = f"def make():\n    from {package} import {name}\n"
    _tree(tmp_path, {**BASE_TREE, "service/engine/run.py": BASE_TREE["service/engine/run.py"] + lazy,
                     excluded.replace(".", "/") + ".py": "big = 1\n" * 100})
    assert excluded.replace(".", "/") + ".py" not in counted_code_bytes(tmp_path).files
    _tree(tmp_path, {"service/engine/run.py": f"import {excluded}\n"})
    with pytest.raises(ValueError, match="at module level"):
        counted_code_bytes(tmp_path)


def test_counted_code_bytes_refuses_missing_or_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="service/engine/run.py"):
        counted_code_bytes(tmp_path)
    _tree(tmp_path, {"service/__init__.py": "", "service/engine/__init__.py": "",
                     "service/engine/run.py": "from trainer.model import GPT\n", "trainer/__init__.py": ""})
    with pytest.raises(FileNotFoundError, match="imports trainer.model"):
        counted_code_bytes(tmp_path)
    _tree(tmp_path, {"trainer/model.py": b"# \xff\xfe\n"})
    with pytest.raises(UnicodeDecodeError):
        counted_code_bytes(tmp_path)
