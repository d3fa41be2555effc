"""``python -m verifier compare ARTIFACT --data DIR``: one artifact evaluated both ways, honest and claimed.

The honest side is the engine's compliant default (``EvalOptions()``: score-first TTT + the default n-gram mode);
the claimed side is PR #940's method as the engine reproduces it (``service.compare.CLAIMED_OPTIONS``: the
target-keyed hashed-940 cache, never a valid score). Both evaluations run here, one after the other, and their
reports are kept (``honest.ndjson``, ``claimed.ndjson``); ``--honest-report``/``--claimed-report`` reuse reports
already made of this artifact instead (``make demo`` passes the two it evaluated over HTTP).

Then the verifier's black-box probes (``verifier.probe``) judge C1–C4 for both methods, with the artifact's model,
and the side-by-side table (``comparison.md``, ``comparison.json``) and the per-chunk bpb picture
(``comparison.png``, ``comparison.svg``) are written to ``--out``. Exit 0 when both evaluations finished and the
honest side is compliant; 1 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.compare import CLAIMED_OPTIONS, ComparisonError, compare_reports, render_markdown, render_plot, summarize
from trainer.limits import EVAL_LIMIT_SECONDS
from verifier.logs import LogError
from verifier.logs import read_eval_events as read_report

HONEST_LABEL = "compliant default"
CLAIMED_LABEL = "claimed (hashed-940)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="evaluate one artifact honestly and as the seed's method claims; table and picture",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT")
    parser.add_argument("--data", type=Path, required=True, help="directory holding the *_val_*.bin shards")
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece model of the data (default DATA/tokenizer.model)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="where the table and picture go")
    parser.add_argument("--honest-report", type=Path, help="reuse this NDJSON report as the honest side")
    parser.add_argument("--claimed-report", type=Path, help="reuse this NDJSON report as the claimed side")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-seconds", type=float, default=EVAL_LIMIT_SECONDS, help="budget of each evaluation")
    parser.add_argument("--no-probes", action="store_true",
                        help="skip the C1-C4 probes (the table then shows the engine's self-checks)")
    parser.set_defaults(run=run)


def evaluate_to_report(args: argparse.Namespace, overrides: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    from service.engine.options import EvalOptions
    from service.engine.run import evaluate
    from service.judge import judged

    options = EvalOptions(artifact=args.artifact, data_dir=args.data, tokenizer=args.tokenizer, device=args.device,
                          max_seconds=args.max_seconds, **overrides)
    events = []
    with path.open("w", encoding="utf-8") as out:
        for event in judged(evaluate(options)):
            out.write(json.dumps(event) + "\n")
            events.append(event)
            if event["type"] == "chunk":
                print(f"  chunk {event['index']}: chunk_bpb {event['chunk_bpb']:.4f} running_bpb "
                      f"{event['running_bpb']:.4f} elapsed {event['elapsed_s']:.1f}s", flush=True)
    return events


def probe_verdicts(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    from verifier.probe import condition_verdicts, load_probe_inputs, probe_mode

    inputs = load_probe_inputs(args.artifact, args.data, args.tokenizer)
    honest, _ = probe_mode("default", inputs)
    claimed, _ = probe_mode("claimed", inputs)
    return condition_verdicts(honest), condition_verdicts(claimed)


def run(args: argparse.Namespace) -> int:
    for path in (args.artifact, args.honest_report, args.claimed_report):
        if path is not None and not path.is_file():
            print(f"compare: {path} is not a file", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sides = {}
    for label, report, overrides, name in ((HONEST_LABEL, args.honest_report, {}, "honest"),
                                           (CLAIMED_LABEL, args.claimed_report, CLAIMED_OPTIONS, "claimed")):
        if report is not None:
            print(f"== {label}: {report}", flush=True)
            try:
                sides[name] = read_report(report)
            except (OSError, LogError) as exc:
                print(f"compare: cannot read {report}: {exc}", file=sys.stderr)
                return 2
        else:
            print(f"== {label}: evaluating {args.artifact} -> {args.out / f'{name}.ndjson'}", flush=True)
            sides[name] = evaluate_to_report(args, overrides, args.out / f"{name}.ndjson")
    probes: tuple[dict[str, str] | None, dict[str, str] | None] = (None, None)
    if not args.no_probes:
        print("== C1-C4 probes of both methods with the artifact's model", flush=True)
        try:
            probes = probe_verdicts(args)
        except (OSError, ValueError) as exc:
            print(f"compare: the probes could not run ({exc}); showing the engine's self-checks", file=sys.stderr)
    try:
        comparison = compare_reports(summarize(sides["honest"], HONEST_LABEL, probes[0]),
                                     summarize(sides["claimed"], CLAIMED_LABEL, probes[1]))
    except ComparisonError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    table = render_markdown(comparison)
    paths = {"table": args.out / "comparison.md", "json": args.out / "comparison.json",
             "png": args.out / "comparison.png", "svg": args.out / "comparison.svg"}
    paths["table"].write_text(table, encoding="utf-8")
    paths["json"].write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    paths["png"].write_bytes(render_plot(comparison, "png"))
    paths["svg"].write_bytes(render_plot(comparison, "svg"))
    print("\n" + table)
    for kind, path in paths.items():
        print(f"comparison {kind}: {path}")
    honest, claimed = comparison["sides"]
    finished = honest["status"] == "end" and claimed["status"] == "end"
    return 0 if finished and honest["compliant"] is True else 1
