"""FineWeb download from the challenge's Hugging Face dataset, with the upstream manifest and paths.

Upstream (`data/cached_challenge_fineweb.py`) reads ``datasets/manifest.json`` from the dataset repo
``willdepueoai/parameter-golf``, then fetches ``datasets/datasets/<variant dir>/fineweb_{split}_{i:06d}.bin`` and the
tokenizer files under ``datasets/tokenizers/``. The local layout is ``OUT/datasets/<variant dir>/`` and
``OUT/tokenizers/``.

Every file lands through a temporary ``.partial`` name and is renamed into place only after its size and, for
shards, its header have been checked, so an interrupted or offline run never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trainer.data.shards import ShardError, read_header
from trainer.data.writer import write_val_manifest

DEFAULT_REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
DEFAULT_REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class DownloadError(RuntimeError):
    """A download that could not complete; the message says what to do about it."""


class Hub(Protocol):
    """Fetches one file of the dataset repo and returns a local path to its bytes."""

    def fetch(self, remote_path: str) -> Path: ...


class HuggingFaceHub:
    def __init__(self, repo_id: str = DEFAULT_REPO_ID) -> None:
        self.repo_id = repo_id

    def fetch(self, remote_path: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, remote_path, repo_type="dataset"))


@dataclass(frozen=True)
class VariantPlan:
    """What to fetch for one tokenizer variant, resolved from the remote manifest."""

    dataset_dir: str  # e.g. "fineweb10B_sp1024"
    train_files: int
    val_files: int
    tokenizer_files: list[str]  # remote paths relative to the remote root, e.g. "tokenizers/fineweb_1024_bpe.model"


def _dataset_dir(variant: str) -> str:
    if variant == "byte260":
        return "fineweb10B_byte260"
    if variant.startswith("sp") and variant[2:].isdigit():
        return f"fineweb10B_{variant}"
    raise DownloadError(f"unknown variant {variant!r}: use sp<VOCAB> (e.g. sp1024) or byte260")


def plan_variant(manifest: dict, variant: str) -> VariantPlan:
    name = _dataset_dir(variant)
    try:
        entry = next(d for d in manifest["datasets"] if d.get("name") == name)
    except (KeyError, TypeError, StopIteration):
        raise DownloadError(f"the remote manifest has no dataset named {name!r}") from None
    stats = entry.get("stats", {})
    tokenizer_name = entry.get("tokenizer_name")
    files: list[str] = []
    for tok in manifest.get("tokenizers", []):
        if tok.get("name") == tokenizer_name:
            files = [p for p in (tok.get("model_path"), tok.get("vocab_path")) if p]
    if tokenizer_name and not files:
        raise DownloadError(f"the remote manifest names tokenizer {tokenizer_name!r} but lists no files for it")
    try:
        return VariantPlan(name, int(stats["files_train"]), int(stats["files_val"]), files)
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"the remote manifest entry for {name!r} has no files_train/files_val stats") from None


def _install(source: Path, target: Path, check: Callable[[Path], None]) -> None:
    """Copy ``source`` to ``target`` via a temporary name, check the copy, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source, partial)
        expected = source.stat().st_size
        actual = partial.stat().st_size
        if actual != expected:
            raise DownloadError(f"{target.name}: copied {actual} bytes, expected {expected}")
        check(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _check_shard(path: Path) -> None:
    try:
        read_header(path)
    except ShardError as exc:
        raise DownloadError(f"downloaded shard is malformed: {exc.problem} ({path.name})") from None


def _check_nonempty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DownloadError(f"downloaded file {path.name} is empty")


def download(out: Path | str, variant: str = "sp1024", train_shards: int = 80, hub: Hub | None = None,
             remote_root: str = DEFAULT_REMOTE_ROOT, log: Callable[[str], None] = print) -> Path:
    """Fetch the manifest, the tokenizer, all val shards and the first ``train_shards`` train shards.

    Returns the local dataset directory. Files already present with a valid header are kept (resumable).
    """
    hub = hub or HuggingFaceHub()
    out = Path(out)

    def fetch(remote: str) -> Path:
        try:
            return hub.fetch(f"{remote_root}/{remote}")
        except DownloadError:
            raise
        except Exception as exc:  # network, auth, missing file: all end the same way for the user
            raise DownloadError(f"could not fetch {remote_root}/{remote}: {type(exc).__name__}: {exc}. "
                                "Check the network (or HF_ENDPOINT / HF_TOKEN); nothing partial was left behind.") \
                from None

    manifest_path = fetch("manifest.json")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise DownloadError(f"remote manifest is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DownloadError(f"remote manifest is not valid JSON: {exc}") from None
    plan = plan_variant(manifest, variant)
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0")
    if train_shards > plan.train_files:
        raise DownloadError(f"{plan.dataset_dir} has {plan.train_files} train shards, {train_shards} requested")

    _install(manifest_path, out / "manifest.json", _check_nonempty)
    for remote in plan.tokenizer_files:
        _install(fetch(remote), out / remote, _check_nonempty)
    dataset_dir = out / "datasets" / plan.dataset_dir
    wanted = [f"fineweb_val_{i:06d}.bin" for i in range(plan.val_files)]
    wanted += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for i, name in enumerate(wanted, 1):
        target = dataset_dir / name
        if target.exists():
            try:
                read_header(target)
                log(f"download: [{i}/{len(wanted)}] {name} already present")
                continue
            except ShardError:
                target.unlink()
        _install(fetch(f"datasets/{plan.dataset_dir}/{name}"), target, _check_shard)
        log(f"download: [{i}/{len(wanted)}] {name}")
    write_val_manifest(dataset_dir, wanted[: plan.val_files])
    return dataset_dir

