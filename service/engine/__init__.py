"""The evaluation engine: sliding-window scoring, score-first TTT, n-gram mixing, streamed events (no HTTP)."""

from service.engine.options import EvalOptions
from service.engine.run import evaluate, evaluate_model

__all__ = ["EvalOptions", "evaluate", "evaluate_model"]
