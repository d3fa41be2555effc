import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from trainer.data.byte_accounting import ByteTables
from trainer.data.shards import read_shard
from trainer.evaluate import bits_per_byte, byte_lookup, target_bytes_torch


@pytest.fixture(scope="module")
def embedded_tokenizer(embedded_data: Path) -> tuple[spm.SentencePieceProcessor, ByteTables]:
    path = embedded_data / "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path)), ByteTables.from_model_file(path)


def test_control_pieces_are_zero_byte_boundaries(embedded_tokenizer) -> None:
    sp, tables = embedded_tokenizer
    for special in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert tables.is_boundary[special] and tables.base_bytes[special] == 0
        assert not tables.has_leading_space[special]
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (1, 2, 0, 3)


def test_byte_fallback_pieces_count_one_byte(embedded_tokenizer) -> None:
    sp, tables = embedded_tokenizer
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert all(tables.base_bytes[i] == 1 and not tables.is_boundary[i] and not tables.has_leading_space[i]
               for i in byte_ids)
    # '<0xE2>' would be 6 bytes if its piece text were counted: the table must not do that.
    assert sp.id_to_piece(byte_ids[0xE2]) == "<0xE2>"


def test_word_mark_pieces(embedded_tokenizer) -> None:
    sp, tables = embedded_tokenizer
    bare = sp.piece_to_id("\u2581")
    assert tables.has_leading_space[bare] and tables.base_bytes[bare] == 0
    word = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and
                len(sp.id_to_piece(i)) > 2 and sp.id_to_piece(i)[1:].isascii())
    assert tables.has_leading_space[word]
    assert tables.base_bytes[word] == len(sp.id_to_piece(word)) - 1


def test_leading_space_not_counted_after_bos_but_counted_after_a_word(embedded_tokenizer) -> None:
    sp, tables = embedded_tokenizer
    word = sp.encode("the")[0]
    spaced = sp.encode("of the")[-1]
    assert tables.has_leading_space[spaced], sp.id_to_piece(spaced)
    after_bos, after_word = tables.target_bytes(np.array([1, word]), np.array([spaced, spaced]))
    assert after_word == after_bos + 1 == tables.base_bytes[spaced] + 1
    bare = sp.piece_to_id("\u2581")
    assert list(tables.target_bytes(np.array([1, word]), np.array([bare, bare]))) == [0, 1]


def test_torch_twin_matches_numpy(embedded_data: Path) -> None:
    tables = ByteTables.from_model_file(embedded_data / "tokenizer.model")
    tokens = read_shard(embedded_data / "embedded_val_000000.bin")[:5000].astype(np.int64)
    t = torch.from_numpy(tokens)
    got = target_bytes_torch(byte_lookup(tables), t[:-1], t[1:]).numpy()
    np.testing.assert_array_equal(got, tables.target_bytes(tokens[:-1], tokens[1:]))


def test_tables_are_padded_to_the_model_vocab(embedded_data: Path) -> None:
    tables = ByteTables.from_model_file(embedded_data / "tokenizer.model", vocab_size=1100)
    assert len(tables.base_bytes) == 1100 and tables.vocab_size == 1024
    assert tables.is_boundary[1024:].all() and not tables.base_bytes[1024:].any()


def test_bits_per_byte_formula() -> None:
    assert bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 3) == pytest.approx(2.0 / (3 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_embedded_manifest_bytes_match_decoded_documents(embedded_data: Path) -> None:
    """The metric's bytes equal the UTF-8 length of each document decoded on its own."""
    sp = spm.SentencePieceProcessor(model_file=str(embedded_data / "tokenizer.model"))
    tables = ByteTables.from_model_file(embedded_data / "tokenizer.model")
    tokens = read_shard(embedded_data / "embedded_val_000000.bin")
    manifest = json.loads((embedded_data / "manifest.json").read_text())
    assert tables.total_bytes(tokens) == manifest["splits"]["val"]["bytes"] == _decoded_bytes(sp, tokens)


def _decoded_bytes(sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    starts = np.flatnonzero(tokens == sp.bos_id())
    ends = list(starts[1:]) + [len(tokens)]
    return sum(len(sp.decode(tokens[s + 1 : e].tolist()).encode("utf-8")) for s, e in zip(starts, ends, strict=True))


@pytest.mark.shared_data
def test_fineweb_val_bytes_equal_decoded_utf8_bytes(fineweb_data: Path, fineweb_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(fineweb_tokenizer))
    tables = ByteTables.from_model_file(fineweb_tokenizer)
    tokens = read_shard(fineweb_data / "fineweb_val_000000.bin", vocab_size=1024)
    assert tokens.size == 628_457
    assert tables.sha256.startswith("4f5e8adb")
    assert sp.id_to_piece(939) == "\u2581" and tables.base_bytes[939] == 0 and tables.has_leading_space[939]
    assert tables.total_bytes(tokens) == _decoded_bytes(sp, tokens)


@pytest.mark.shared_data
def test_stats_cli_on_the_fineweb_sample(fineweb_data: Path, fineweb_tokenizer: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "trainer", "data", "stats", "--data", str(fineweb_data),
                           "--tokenizer", str(fineweb_tokenizer), "--split", "val"],
                          capture_output=True, text=True, check=True, timeout=120)
    stats = json.loads(proc.stdout)
    assert stats["tokens"] == 628_457 and stats["docs"] == 200 and stats["targets"] == 628_456
    assert stats["bytes"] == 1_489_418
