import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

from trainer.data.embedded import TOKENIZER_SETTINGS, build_embedded
from trainer.data.shards import read_shard


def test_build_is_byte_identical_across_runs_and_directories(embedded_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "elsewhere"
    build_embedded(again, log=lambda _m: None)
    names = sorted(p.name for p in embedded_data.iterdir())
    assert names == ["embedded_train_000000.bin", "embedded_val_000000.bin", "manifest.json",
                     "tokenizer.model", "tokenizer.vocab"]
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (embedded_data / name).read_bytes() == (again / name).read_bytes(), name


def test_tokenizer_has_the_official_settings(embedded_data: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(embedded_data / "tokenizer.model"))
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(1024)) == 256
    assert sp.encode("2024") == [sp.piece_to_id(c) for c in "2024"]  # split digits
    assert not sp.id_to_piece(sp.encode("Hello")[0]).startswith("\u2581")  # no dummy prefix
    assert TOKENIZER_SETTINGS["normalization_rule_name"] == "nmt_nfkc"


def test_documents_are_bos_plus_tokens_without_eos(embedded_data: Path) -> None:
    manifest = json.loads((embedded_data / "manifest.json").read_text())
    for split in ("train", "val"):
        tokens = read_shard(embedded_data / f"embedded_{split}_000000.bin", vocab_size=1024)
        assert tokens[0] == 1
        assert int(np.count_nonzero(tokens == 1)) == manifest["splits"][split]["docs"]
        assert not np.any(tokens == 2)
        assert tokens.size == manifest["splits"][split]["tokens"]
    assert manifest["splits"]["train"]["tokens"] > 500_000  # enough to train the demo model on
    assert manifest["splits"]["val"]["docs"] >= 20


def test_stats_cli_reports_the_manifest_figures(embedded_data: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer", "data", "stats", "--data", str(embedded_data)],
                          capture_output=True, text=True, check=True, timeout=120)
    stats = json.loads(proc.stdout)
    val = json.loads((embedded_data / "manifest.json").read_text())["splits"]["val"]
    assert (stats["tokens"], stats["docs"], stats["bytes"]) == (val["tokens"], val["docs"], val["bytes"])
    assert stats["targets"] == stats["tokens"] - 1
    assert stats["bytes_per_token"] == stats["bytes"] / stats["targets"]


def test_stats_cli_refuses_a_malformed_shard(tmp_path: Path, embedded_data: Path) -> None:
    (tmp_path / "x_val_000000.bin").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "trainer", "data", "stats", "--data", str(tmp_path),
                           "--tokenizer", str(embedded_data / "tokenizer.model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "x_val_000000.bin: truncated header" in proc.stderr
