"""`python -m service evaluate` end to end: a real artifact file, real shards and tokenizer, real subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sentencepiece
import torch

from service.engine.options import RECIPES, EvalOptions
from service.engine.run import evaluate
from trainer.code_bytes import counted_code_bytes
from trainer.data.shards import load_validation_tokens
from trainer.data.val_manifest import tokens_sha256
from trainer.data.writer import write_shard, write_val_manifest
from trainer.export import write_artifact
from trainer.model import GPT, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2, bigram_buckets=64,
                   bigram_dim=16, xsa_last_n=2)
# No --seq-len: the engine takes the artifact's training sequence length (TRAIN_SEQ_LEN).
FAST = ["--device", "cpu", "--stride", "64", "--chunk-tokens", "512", "--batch-windows", "8"]
VAL_TOKENS = 1800


@dataclass(frozen=True)
class EvalData:
    data_dir: Path  # a single short val shard
    tokenizer: Path


@pytest.fixture(scope="module")
def eval_data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    """The first tokens of the FineWeb sample's val shard when present, else of the offline embedded corpus."""
    sample = Path(os.environ.get("PGOLF_SHARED_DATA") or REPO_ROOT.parent / "shared/data/fineweb_sample")
    if (sample / "tokenizers/fineweb_1024_bpe.model").is_file():
        source, tokenizer = sample / "datasets/fineweb10B_sp1024", sample / "tokenizers/fineweb_1024_bpe.model"
    else:
        source = request.getfixturevalue("embedded_data")
        tokenizer = source / "tokenizer.model"
    out = tmp_path_factory.mktemp("eval_data")
    write_shard(out / "fineweb_val_000000.bin", load_validation_tokens(source)[:VAL_TOKENS])
    write_val_manifest(out, ["fineweb_val_000000.bin"])  # this short shard *is* the whole val set here
    return EvalData(out, tokenizer)


TRAIN_SEQ_LEN = 128


def write_tiny_artifact(path: Path, tokenizer_sha256: str, vocab_size: int) -> Path:
    """A randomly initialised tiny GPT with an output vocabulary of ``vocab_size``, as a real artifact file."""
    config = replace(TINY, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    training = {"seed": 0, "steps": 0, "world_size": 1, "device": "cpu", "train_time_ms": 0.0,
                "code_version": "test", "train_seq_len": TRAIN_SEQ_LEN}
    write_artifact(path, model.state_dict(), config, tokenizer_sha256, vocab_size, training,
                   code_bytes=counted_code_bytes())
    return path


@pytest.fixture(scope="module")
def artifact(eval_data: EvalData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sha = hashlib.sha256(eval_data.tokenizer.read_bytes()).hexdigest()
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(eval_data.tokenizer)).vocab_size()
    return write_tiny_artifact(tmp_path_factory.mktemp("artifact") / "tiny.pgolf", sha, vocab)


def evaluate_cli(*args: str | Path, launcher: tuple[str, ...] = ()) -> tuple[int, list[dict], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, "-m", "service", "evaluate", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, events, done.stderr


def test_evaluate_plain_streams_start_chunks_end_and_the_classic_line(eval_data: EvalData, artifact: Path) -> None:
    status, events, stderr = evaluate_cli(artifact, "--data", eval_data.data_dir, "--tokenizer", eval_data.tokenizer,
                                          *FAST, "--plain")
    assert status == 0, stderr
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and set(types[1:-1]) == {"chunk"}
    start, end = events[0], events[-1]
    assert (start["config"]["ttt"], start["config"]["ngram"]) == (False, "off")  # --plain: the reference's score
    assert start["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert start["targets"] == VAL_TOKENS - 1 and start["chunks"] == len(events) - 2
    assert start["config"]["model_config"]["model_dim"] == TINY.model_dim
    assert (start["config"]["seq_len"], start["config"]["seq_len_source"]) == (
        TRAIN_SEQ_LEN, "artifact training.train_seq_len")
    digest = tokens_sha256(load_validation_tokens(eval_data.data_dir))
    assert start["val_tokens_sha256"] == start["validation_manifest_sha256"] == digest
    assert end["targets_scored"] == VAL_TOKENS - 1 and end["bytes"] == start["bytes"]
    assert end["compliance"]["compliant"] and end["compliance"]["scored_once"]
    assert end["compliance"]["full_validation_set"] is True
    line = re.search(r"^final_int6_sliding_window_exact val_loss:(\S+) val_bpb:(\S+)$", stderr, re.MULTILINE)
    assert line is not None, stderr
    assert (line.group(1), line.group(2)) == (f"{end['val_loss']:.8f}", f"{end['val_bpb']:.8f}")


TTT_NGRAM = ("--ttt", "--ttt-recipe", "legal-sgd", "--ngram", "exact")


@pytest.fixture(scope="module")
def ttt_ngram_run(eval_data: EvalData, artifact: Path) -> tuple[int, list[dict], str]:
    return evaluate_cli(artifact, "--data", eval_data.data_dir, "--tokenizer", eval_data.tokenizer, *FAST, *TTT_NGRAM)


def test_evaluate_defaults_to_ttt_and_ngram_and_marks_a_prefix(eval_data: EvalData, artifact: Path) -> None:
    status, events, stderr = evaluate_cli(artifact, "--data", eval_data.data_dir, "--tokenizer", eval_data.tokenizer,
                                          "--device", "cpu", "--max-tokens", "700")
    assert status == 0, stderr
    start, end = events[0], events[-1]
    defaults = EvalOptions()
    assert (start["config"]["ttt"], start["config"]["ttt_recipe"], start["config"]["ngram"]) == (
        True, defaults.ttt_recipe, defaults.ngram)
    assert start["config"]["chunk_tokens"] == RECIPES[defaults.ttt_recipe].chunk_tokens
    assert end["compliance"]["compliant"] and end["compliance"]["full_validation_set"] is False
    assert start["val_tokens_sha256"] != start["validation_manifest_sha256"]
    # A prefix is not a submission score: the classic line is withheld and the marked line says why.
    assert "final_int6_sliding_window_exact" not in stderr
    assert re.search(r"^not_a_submission_score val_loss:\S+ val_bpb:\S+ because: not the full validation set",
                     stderr, re.MULTILINE), stderr


def test_evaluate_with_ttt_and_exact_ngram(ttt_ngram_run: tuple[int, list[dict], str]) -> None:
    status, events, stderr = ttt_ngram_run
    assert status == 0, stderr
    end = events[-1]
    assert end["type"] == "end" and end["compliance"]["compliant"]
    assert end["compliance"]["ttt"]["recipe"] == "legal-sgd" and end["compliance"]["ngram"]["mode"] == "exact"
    assert "final_int6_sliding_window_exact" in stderr
    chunks = [e for e in events if e["type"] == "chunk"]
    assert all(c["trained_range"] == c["target_range"] for c in chunks[:-1]) and chunks[-1]["trained_range"] is None


@pytest.mark.slow  # three interpreter starts
def test_torchrun_two_processes_print_once_and_agree(eval_data: EvalData, artifact: Path,
                                                     ttt_ngram_run: tuple[int, list[dict], str]) -> None:
    _, single, _ = ttt_ngram_run
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    status, pair, stderr = evaluate_cli(artifact, "--data", eval_data.data_dir, "--tokenizer", eval_data.tokenizer,
                                        *FAST, *TTT_NGRAM, launcher=launcher)
    assert status == 0, stderr
    assert [e["type"] for e in pair] == [e["type"] for e in single]  # rank 0 alone prints
    assert pair[0]["config"]["world_size"] == 2
    assert pair[-1]["val_bpb"] == pytest.approx(single[-1]["val_bpb"], rel=1e-6)
    assert pair[-1]["compliance"]["trace_digest"] == single[-1]["compliance"]["trace_digest"]
    assert stderr.count("final_int6_sliding_window_exact") == 1


def test_evaluate_refuses_an_artifact_of_another_tokenizer(eval_data: EvalData, tmp_path: Path) -> None:
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(eval_data.tokenizer)).vocab_size()
    mismatched = write_tiny_artifact(tmp_path / "other.pgolf", hashlib.sha256(b"another tokenizer").hexdigest(), vocab)
    status, events, stderr = evaluate_cli(mismatched, "--data", eval_data.data_dir, "--tokenizer",
                                          eval_data.tokenizer, *FAST)
    assert status == 1
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["code"] == "tokenizer_mismatch" and events[0]["targets_scored"] == 0
    assert "tokenizer_mismatch" in stderr and "sha256" in stderr


# The remaining refusals through the Python API (same code path as the CLI, without a process start each).


def api_events(artifact: Path, data_dir: Path, tokenizer: Path) -> list[dict]:
    options = EvalOptions(artifact=artifact, data_dir=data_dir, tokenizer=tokenizer, device="cpu", seq_len=128,
                          stride=64, chunk_tokens=512)
    return list(evaluate(options))


def test_evaluate_refuses_a_model_for_another_vocabulary(eval_data: EvalData, tmp_path: Path) -> None:
    sha = hashlib.sha256(eval_data.tokenizer.read_bytes()).hexdigest()
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(eval_data.tokenizer)).vocab_size()
    larger = write_tiny_artifact(tmp_path / "larger.pgolf", sha, vocab + 24)  # same tokenizer hash, wrong size
    events = api_events(larger, eval_data.data_dir, eval_data.tokenizer)
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["code"] == "tokenizer_mismatch" and "vocabulary" in events[0]["reason"]


def test_evaluate_reports_unreadable_inputs(eval_data: EvalData, artifact: Path, tmp_path: Path) -> None:
    events = api_events(artifact, tmp_path, eval_data.tokenizer)  # no val shard there
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "bad_data"
    garbage = tmp_path / "garbage.pgolf"
    garbage.write_bytes(os.urandom(2048))
    events = api_events(garbage, eval_data.data_dir, eval_data.tokenizer)
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "bad_magic"
    events = api_events(tmp_path / "missing.pgolf", eval_data.data_dir, eval_data.tokenizer)
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "bad_artifact"
    events = api_events(artifact, eval_data.data_dir, tmp_path / "missing.model")
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "bad_tokenizer"
