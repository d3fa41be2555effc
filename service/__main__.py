"""Command line of the service package: ``python -m service evaluate ARTIFACT --data DIR ...``.

Each subcommand is one ``add_*_parser`` function (its arguments, with ``handler`` set to the ``run_*`` function
that is its body), listed in ``SUBCOMMANDS``; ``serve`` (the HTTP API) comes from service/api/cli.py, ``worker``
(an evaluation machine of a cluster) from service/api/worker.py.

``evaluate`` streams the engine's events, judged (``service.judge.judged``: strict JSON, the terminal event's
``compliance`` verdict), as NDJSON on stdout, one flushed line per event (rank 0 only under torchrun). Exit
status: 0 after ``end``, 3 after ``timeout``, 1 after ``error`` (whose reason also goes to stderr). After ``end``
the reference's classic ``final_int6_sliding_window_exact`` line goes to stderr, for a compliant full-validation
sliding-window run only (any other run gets a ``not_a_submission_score`` line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The evaluation's clock starts here, before torch and the engine are imported (only lazily, in run_evaluate): the
# 600 s evaluation limit counts everything the evaluator process does, and importing torch alone takes seconds.
PROCESS_STARTED = time.perf_counter()

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 3


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    from service.engine.options import NGRAM_MODES, PLAIN, TTT_RECIPE_NAMES, EvalOptions

    defaults = EvalOptions()
    parser = subparsers.add_parser("evaluate", help="score an artifact on the validation shards (NDJSON events)")
    parser.add_argument("artifact", type=Path, help="submission artifact: a .pgolf file, or an upstream .ptz")
    parser.add_argument("--code", type=Path, default=None,
                        help="upstream .ptz only: the submission's train_gpt.py, read statically for the model "
                             "config (ignored, with a note, for .pgolf)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="upstream .ptz only: a setting of the submission's run command (NUM_LAYERS=11 ...); "
                             "repeatable")
    parser.add_argument("--data", type=Path, required=True, help="directory holding the *_val_*.bin shards")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="SentencePiece model of the data (default: DATA/tokenizer.model)")
    parser.add_argument("--ttt", action=argparse.BooleanOptionalAction, default=None,
                        help=f"score-first test-time training between chunks (default: {defaults.ttt})")
    parser.add_argument("--ttt-recipe", choices=TTT_RECIPE_NAMES, default=defaults.ttt_recipe,
                        help=f"(default: {defaults.ttt_recipe})")
    parser.add_argument("--ngram", choices=NGRAM_MODES, default=None,
                        help=f"n-gram mixing (default: {defaults.ngram}); hashed-940 reproduces the upstream "
                             "scoring and is never compliant")
    parser.add_argument("--plain", action="store_true",
                        help=f"the plain sliding-window score the reference reports: {PLAIN} unless --ttt/--ngram "
                             "say otherwise")
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds,
                        help="wall-clock budget; the run stops cleanly between chunks with a timeout event")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="context length (default: the artifact's training sequence length)")
    parser.add_argument("--stride", type=int, default=defaults.stride)
    parser.add_argument("--non-overlapping", action="store_true",
                        help="score non-overlapping windows (stride = seq-len) instead of sliding ones")
    parser.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens,
                        help="tokens per chunk (default: the TTT recipe's reference chunk, pr940 131072, legal-sgd "
                             "32768; 131072 without TTT)")
    parser.add_argument("--batch-windows", type=int, default=defaults.batch_windows)
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="evaluate only this many leading tokens (a preview, reported as not full-val)")
    parser.set_defaults(handler=run_evaluate)


def evaluation_modes(args: argparse.Namespace) -> dict[str, object]:
    """ttt and ngram from --ttt/--ngram, else from --plain, else the defaults."""
    from service.engine.options import PLAIN, EvalOptions

    base = PLAIN if args.plain else {"ttt": EvalOptions.ttt, "ngram": EvalOptions.ngram}
    return {"ttt": base["ttt"] if args.ttt is None else args.ttt,
            "ngram": base["ngram"] if args.ngram is None else args.ngram}


def run_evaluate(args: argparse.Namespace) -> int:
    from service.engine.options import EvalOptions
    from service.engine.run import evaluate
    from service.judge import judged

    options = EvalOptions(
        artifact=args.artifact, data_dir=args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
        stride=None if args.non_overlapping else args.stride, chunk_tokens=args.chunk_tokens,
        batch_windows=args.batch_windows, ttt_recipe=args.ttt_recipe, max_seconds=args.max_seconds,
        device=args.device, max_tokens=args.max_tokens, code=args.code, env=tuple(args.env),
        **evaluation_modes(args))
    speaks = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints
    status = EXIT_ERROR
    start: dict = {}
    try:
        for event in judged(evaluate(options, started=PROCESS_STARTED)):
            if event["type"] == "start":
                start = event
            if speaks:
                sys.stdout.write(json.dumps(event, allow_nan=False) + "\n")
                sys.stdout.flush()
            if event["type"] == "end":
                status = EXIT_OK
                if speaks:
                    print(final_score_line(start, event), file=sys.stderr, flush=True)
                    if event["compliance"]["ngram"]["mode"] == "tilt":  # upstream's tilt counters, in its format
                        print(tilt_log_line(event["compliance"]["ngram"]["stats"]), file=sys.stderr, flush=True)
            elif event["type"] == "timeout":
                status = EXIT_TIMEOUT
            elif event["type"] == "error":
                status = EXIT_ERROR
                if speaks:
                    print(f"evaluate: {event['code']}: {event['reason']}", file=sys.stderr, flush=True)
        _leave_process_group(wait_for_peers=status != EXIT_ERROR)
    finally:
        _leave_process_group(wait_for_peers=False)
    return status


def tilt_log_line(stats: dict[str, int | float]) -> str:
    """Upstream's accepted-log line (`ngram_tilt:hints total=… gated=… …`) for a run's summed tilt counters."""
    from service.engine.ngram import TILT_STATS

    counts = " ".join(f"{name}={int(stats.get(name, 0))}" for name in TILT_STATS[1:6])
    return f"ngram_tilt:hints total={int(stats.get('total', 0))} {counts}"


CLASSIC_SCORE_LINE = "final_int6_sliding_window_exact"


def final_score_line(start: dict, end: dict) -> str:
    """The reference's final score line (reference §11), which log parsers and leaderboards read, but only for a
    run that is a submission score: compliant, a sliding-window evaluation, over the full validation set. Any
    other run gets a line that says what it is not, so no parser can take it for a score."""
    compliance = end.get("compliance") or {}
    figures = f"val_loss:{end['val_loss']:.8f} val_bpb:{end['val_bpb']:.8f}"
    reasons = []
    if compliance.get("compliant") is not True:
        reasons.append(f"not compliant (ngram={compliance.get('ngram', {}).get('mode')})")
    if compliance.get("full_validation_set") is not True:
        reasons.append("not the full validation set (its tokens do not hash to the data manifest's val sha256)")
    if compliance.get("sliding_window") is not True:
        config = start.get("config") or {}
        reasons.append(f"not a sliding-window evaluation (stride {config.get('stride')} = seq_len "
                       f"{config.get('seq_len')})")
    if not reasons:
        return f"{CLASSIC_SCORE_LINE} {figures}"
    return f"not_a_submission_score {figures} because: {'; '.join(reasons)}"


def _leave_process_group(wait_for_peers: bool) -> None:
    """Tear down torchrun's process group. After a normal finish every rank first meets at a barrier: a rank that
    destroys its gloo group while a peer is still using it can abort ("terminate called without an active
    exception"). After an exception there is no barrier, since a peer may already be gone."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        if wait_for_peers:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


from service.api.auth import add_token_parser  # noqa: E402
from service.api.cli import add_serve_parser  # noqa: E402  (registered beside evaluate; light import)
from service.api.worker import add_worker_parser  # noqa: E402
from service.demo import add_demo_parser  # noqa: E402

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_evaluate_parser, add_serve_parser, add_worker_parser, add_demo_parser, add_token_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
