"""`python -m trainer …`: data preparation and training."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _data_download(args: argparse.Namespace) -> int:
    from trainer.data.download import DownloadError, download

    try:
        path = download(args.out, variant=args.variant, train_shards=args.train_shards)
    except DownloadError as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 2
    print(f"download: complete -> {path}")
    return 0


def _data_build_embedded(args: argparse.Namespace) -> int:
    from trainer.data.embedded import build_embedded

    build_embedded(args.out)
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from trainer.data.shards import ShardError
    from trainer.data.stats import resolve_tokenizer, split_stats

    try:
        stats = split_stats(args.data, resolve_tokenizer(args.data, args.tokenizer), args.split)
    except (ShardError, FileNotFoundError) as exc:
        print(f"stats failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.config import ALL_FIELDS, ConfigError, resolve_config
    from trainer.data.stats import resolve_tokenizer
    from trainer.train import train

    overrides = {name: getattr(args, name) for name in ALL_FIELDS if getattr(args, name, None) is not None}
    try:
        config = resolve_config(args.preset, overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        tokenizer = resolve_tokenizer(args.data, args.tokenizer)
    except FileNotFoundError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    summary = train(config, Path(args.data), tokenizer, Path(args.out))
    if summary and not (summary["within_train_time_limit"] and summary["artifact"]["within_size_limit"]):
        return 3  # the run completed but is past a challenge limit: say so in the exit status too
    return 0


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from trainer.config import ALL_FIELDS, PRESETS, parse_value

    tr = commands.add_parser("train", allow_abbrev=False,
                             help="train a model (one process or under torchrun), export its artifact",
                             description="Every configuration field can also be set by its reference "
                                         "environment variable (NUM_LAYERS=11, MATRIX_LR=0.025, ...).")
    tr.add_argument("--preset", default="pr940", choices=sorted(PRESETS))
    tr.add_argument("--data", required=True, help="directory holding *_train_*.bin / *_val_*.bin shards")
    tr.add_argument("--tokenizer", help="SentencePiece .model (default: the one named in DATA/manifest.json)")
    tr.add_argument("--out", required=True, help="output directory: model.pgolf, train.log, summary.json")
    fields = tr.add_argument_group("configuration overrides")
    for name in ALL_FIELDS:
        fields.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="V",
                            type=lambda raw, n=name: parse_value(n, raw))
    tr.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="download, build or inspect data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    dl = data_commands.add_parser("download", help="download FineWeb shards from the challenge's HF dataset")
    dl.add_argument("--variant", default="sp1024", help="sp<VOCAB> or byte260 (default sp1024)")
    dl.add_argument("--train-shards", type=int, default=80, help="train shards of 100M tokens (default 80)")
    dl.add_argument("--out", default="data", help="output root (default ./data)")
    dl.set_defaults(func=_data_download)
    emb = data_commands.add_parser("build-embedded", help="build the offline corpus from CPython's own text")
    emb.add_argument("--out", required=True)
    emb.set_defaults(func=_data_build_embedded)
    st = data_commands.add_parser("stats", help="token/doc/byte statistics of a split (JSON)")
    st.add_argument("--data", required=True, help="directory holding *_train_*.bin / *_val_*.bin shards")
    st.add_argument("--tokenizer", help="SentencePiece .model (default: the one named in DIR/manifest.json)")
    st.add_argument("--split", default="val", choices=("train", "val"))
    st.set_defaults(func=_data_stats)
    _add_train_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
