import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.download import DownloadError, download
from trainer.data.shards import read_shard
from trainer.data.val_manifest import recorded_val_sha256, tokens_sha256
from trainer.data.writer import write_shard

VARIANT_DIR = "fineweb10B_sp1024"


class DirectoryHub:
    """A local fake of the dataset repo: remote paths map to files under a directory."""

    def __init__(self, root: Path, fail_on: str | None = None) -> None:
        self.root = root
        self.fail_on = fail_on
        self.fetched: list[str] = []

    def fetch(self, remote_path: str) -> Path:
        if self.fail_on and remote_path.endswith(self.fail_on):
            raise ConnectionError("connection reset by peer")
        self.fetched.append(remote_path)
        path = self.root / remote_path
        if not path.exists():
            raise FileNotFoundError(remote_path)
        return path


@pytest.fixture()
def fake_hub(tmp_path: Path) -> Path:
    root = tmp_path / "hub" / "datasets"
    shards = root / "datasets" / VARIANT_DIR
    shards.mkdir(parents=True)
    write_shard(shards / "fineweb_val_000000.bin", np.arange(1, 50, dtype=np.uint16))
    for i in range(3):
        write_shard(shards / f"fineweb_train_{i:06d}.bin", np.full(20 + i, i + 1, dtype=np.uint16))
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model-bytes")
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("vocab")
    manifest = {
        "datasets": [{"name": VARIANT_DIR, "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "hub"


def test_download_lays_out_the_upstream_tree(fake_hub: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    hub = DirectoryHub(fake_hub)
    dataset = download(out, train_shards=2, hub=hub, log=lambda _m: None)
    assert dataset == out / "datasets" / VARIANT_DIR
    assert sorted(p.name for p in dataset.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "manifest.json"]
    # The local manifest records the digest of the val stream as installed (what evaluations compare with).
    assert recorded_val_sha256(dataset) == tokens_sha256(read_shard(dataset / "fineweb_val_000000.bin"))
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model-bytes"
    assert read_shard(dataset / "fineweb_train_000001.bin").tolist() == [2] * 21
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin" in hub.fetched
    assert not list(out.rglob("*.partial"))
    # A second run keeps the complete files and fetches no shard again.
    again = DirectoryHub(fake_hub)
    download(out, train_shards=2, hub=again, log=lambda _m: None)
    assert not [p for p in again.fetched if p.endswith(".bin")]


def test_interrupted_download_leaves_no_partial_file(fake_hub: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match="could not fetch .*fineweb_train_000001.bin.*ConnectionError"):
        download(out, train_shards=3, hub=DirectoryHub(fake_hub, fail_on="fineweb_train_000001.bin"),
                 log=lambda _m: None)
    dataset = out / "datasets" / VARIANT_DIR
    assert sorted(p.name for p in dataset.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert not list(out.rglob("*.partial"))


def test_corrupt_remote_shard_is_refused_and_not_installed(fake_hub: Path, tmp_path: Path) -> None:
    bad = fake_hub / "datasets" / "datasets" / VARIANT_DIR / "fineweb_train_000000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])  # truncated upload on the remote side
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match="malformed: truncated"):
        download(out, train_shards=1, hub=DirectoryHub(fake_hub), log=lambda _m: None)
    assert not (out / "datasets" / VARIANT_DIR / "fineweb_train_000000.bin").exists()
    assert not list(out.rglob("*.partial"))


def test_more_train_shards_than_published_is_refused(fake_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="has 3 train shards, 5 requested"):
        download(tmp_path / "d", train_shards=5, hub=DirectoryHub(fake_hub), log=lambda _m: None)
    with pytest.raises(DownloadError, match="unknown variant"):
        download(tmp_path / "d", variant="gpt2", hub=DirectoryHub(fake_hub), log=lambda _m: None)


def test_cli_offline_exits_nonzero_with_a_clear_message(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "trainer", "data", "download", "--train-shards", "1",
                           "--out", str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "download failed: could not fetch datasets/manifest.json" in proc.stderr
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").rglob("*.bin"))
