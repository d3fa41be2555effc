"""The evaluation engine (no HTTP). `evaluate` and `evaluate_model` load lazily: importing the options must not
pull torch into the CLI parser or the HTTP service.
"""

from typing import Any

from service.engine.options import EvalOptions

__all__ = ["EvalOptions", "evaluate", "evaluate_model"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "evaluate_model"):
        from service.engine import run

        return getattr(run, name)
    raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
