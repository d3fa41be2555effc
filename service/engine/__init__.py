"""The evaluation engine: sliding-window scoring, score-first TTT, n-gram mixing, streamed events (no HTTP).

`evaluate` and `evaluate_model` load lazily: the options are plain data, and importing them must not pull torch
into processes that only describe or queue evaluations (the CLI parser, the HTTP service).
"""

from typing import Any

from service.engine.options import EvalOptions

__all__ = ["EvalOptions", "evaluate", "evaluate_model"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "evaluate_model"):
        from service.engine import run

        return getattr(run, name)
    raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
