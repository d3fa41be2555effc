"""An offline English corpus built from what every CPython install carries.

Sources: the interpreter's bundled help topics (``pydoc_data.topics``, the language reference prose) and the
docstrings of the pure-Python standard library, read with ``ast`` (nothing is imported or executed). The corpus
is split into documents, shuffled with a fixed seed, tokenised with a SentencePiece BPE tokenizer trained with
the official sp1024 settings, and written as official shards: each document is BOS + tokens, no EOS, and the
first 10% of documents form the validation split (as upstream, validation = the first documents).

The same interpreter always produces the same bytes; the manifest records which interpreter it was.
"""

from __future__ import annotations

import ast
import io
import json
import platform
import random
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.byte_accounting import ByteTables
from trainer.data.val_manifest import tokens_sha256
from trainer.data.writer import write_shard

DATASET_NAME = "embedded_sp1024"
VOCAB_SIZE = 1024
VAL_FRACTION = 0.10
SHUFFLE_SEED = 20240520
MIN_DOC_CHARS = 200
SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo",
                                 "ensurepip", "__pycache__", "pydoc_data"})

# The official sp1024 trainer settings (reference-stack §2.3).
TOKENIZER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "vocab_size": VOCAB_SIZE,
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


def help_topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _docstrings_in_source_order(tree: ast.Module) -> list[str]:
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def stdlib_docstring_documents(stdlib: Path | None = None) -> list[str]:
    """One document per standard-library module: its docstrings in source order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_STDLIB_DIRS or part.startswith("config-") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python 3 / UTF-8
        documents.append("\n\n".join(_docstrings_in_source_order(tree)))
    return documents


def clean_document(text: str) -> str:
    return text.replace("\x00", " ").strip()


def collect_documents() -> list[str]:
    docs = [clean_document(d) for d in help_topic_documents() + stdlib_docstring_documents()]
    docs = [d for d in docs if len(d) >= MIN_DOC_CHARS]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def train_tokenizer(train_docs: list[str]) -> bytes:
    """Train the BPE tokenizer on the train documents (one line per sentence); return the serialised model."""
    import sentencepiece as spm

    lines = [line for doc in train_docs for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    # One thread: the BPE merge order must not depend on scheduling. Writing to memory keeps any output path
    # out of the stored trainer spec, so the model bytes do not depend on where the corpus is built.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, num_threads=1,
                                   shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
                                   **TOKENIZER_SETTINGS)
    return model.getvalue()


def vocab_listing(sp) -> str:
    """The human-readable ``.vocab`` companion: one ``piece<TAB>score`` line per id."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


@dataclass(frozen=True)
class SplitStats:
    files: list[str]
    tokens: int
    docs: int
    bytes: int
    tokens_sha256: str  # trainer.data.val_manifest.tokens_sha256: lets an evaluation prove it scored this split


def encode_split(sp, docs: list[str], bos_id: int) -> np.ndarray:
    ids: list[int] = []
    for doc_ids in sp.encode(docs):
        ids.append(bos_id)
        ids.extend(doc_ids)
    return np.asarray(ids, dtype=np.uint16)


def build_embedded(out: Path | str, log: Callable[[str], None] = print) -> dict:
    """Build the corpus into ``out`` and return its manifest. Deterministic for a given interpreter."""
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = collect_documents()
    n_val = max(1, int(len(docs) * VAL_FRACTION))
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    log(f"embedded: {len(docs)} documents ({sum(map(len, docs))} chars): {len(train_docs)} train, {n_val} val")

    (out / "tokenizer.model").write_bytes(train_tokenizer(train_docs))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    (out / "tokenizer.vocab").write_text(vocab_listing(sp), encoding="utf-8")
    if sp.vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {sp.vocab_size()} pieces, expected {VOCAB_SIZE}")
    tables = ByteTables.from_model_file(out / "tokenizer.model")
    splits = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = encode_split(sp, split_docs, sp.bos_id())
        name = f"embedded_{split}_000000.bin"
        write_shard(out / name, tokens)
        splits[split] = SplitStats([name], int(tokens.size), len(split_docs),
                                   tables.total_bytes(tokens), tokens_sha256(tokens)).__dict__
        log(f"embedded: {split}: {tokens.size} tokens, {splits[split]['bytes']} bytes -> {out / name}")

    manifest = {
        "name": DATASET_NAME,
        "source": {
            "description": "CPython help topics and standard-library docstrings",
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "documents": len(docs),
            "shuffle_seed": SHUFFLE_SEED,
            "val_fraction": VAL_FRACTION,
        },
        "tokenizer": {"file": "tokenizer.model", "sha256": tables.sha256, "vocab_size": sp.vocab_size(),
                      "settings": TOKENIZER_SETTINGS},
        "document_convention": "BOS + tokens, no EOS",
        "splits": splits,
    }
    buf = io.StringIO()
    json.dump(manifest, buf, indent=2, sort_keys=True)
    (out / "manifest.json").write_text(buf.getvalue() + "\n")
    return manifest
