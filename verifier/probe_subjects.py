"""What the compliance probes run: an evaluator on a token stream, observed from outside its scoring loop.

A *subject* takes a token stream and returns a ``ProbeRun``: the NLL it committed for every target position,
how many times it scored each, the full-vocabulary distribution it committed to before scoring a few sampled
positions, and the order in which it scored ranges and updated state. The probes in ``verifier.probe`` judge
conditions C1–C4 from these runs alone, so anything that fills a ``ProbeRun`` can be probed; the tests plug in
deliberately broken evaluators that way.

``EngineSubject`` adapts this project's evaluation engine (``service.engine.run.evaluate_model``). The engine
exposes no hooks for this, so the adapter swaps three names in ``service.engine.run`` for the duration of one
run, each delegating to the original:

* ``score_chunk``: records every chunk's per-position NLL and scored counts (both rows of its sums), and, just
  before a chunk is scored, the distribution at each sampled position: the model's softmax over the window that
  scores it, passed through the mixer's ``full_distribution`` when there is a mixer;
* ``make_mixer``: wraps the mixer so that every ``commit`` (n-gram state update) is recorded, and lets a probe
  substitute its own mixer;
* ``TTTUpdater``: records every ``train`` call (test-time training update) with the target range it trains on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from service.engine import run as engine_run
from service.engine.ngram import NgramMixer
from service.engine.options import EvalOptions, TTTRecipe
from service.engine.scoring import ChunkScores, autocast_for
from service.engine.ttt import TTTUpdater
from service.engine.windows import Chunk, WindowPlan
from service.judge import judged
from trainer.data.byte_accounting import ByteTables
from trainer.model import GPT, ModelConfig

MixerFactory = Callable[[str, int], NgramMixer | None]


@dataclass(frozen=True)
class OrderEvent:
    """Something the evaluator did to target positions [lo, hi): scored them, or updated state with them."""

    kind: str  # "score" | "update"
    lo: int
    hi: int
    what: str  # for messages: "chunk 2", "ttt on chunk 1", "n-gram commit"


@dataclass
class ProbeRun:
    nll: np.ndarray  # (N,) float64 NLL committed per target position (summed over repeats); NaN if never scored
    times_scored: np.ndarray  # (N,) int64
    distributions: dict[int, np.ndarray] = field(default_factory=dict)  # position -> (V,) float64
    order: list[OrderEvent] = field(default_factory=list)
    outcome: str = "end"  # "end", or why the evaluation stopped


class ProbeSubject(Protocol):
    """An evaluator the probes can run; ``sample_positions`` asks for the distributions committed there."""

    def run(self, tokens: np.ndarray, sample_positions: Sequence[int] = ()) -> ProbeRun: ...


# ----------------------------------------------------------------------------------------------------------------
# The evaluation engine as a subject


@dataclass
class EngineSubject:
    model: nn.Module
    tables: ByteTables
    options: EvalOptions
    mixer_factory: MixerFactory | None = None  # replaces the engine's make_mixer (None: the engine's own)
    ttt_recipe: TTTRecipe | None = None  # replaces the named recipe of options.ttt_recipe
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def run(self, tokens: np.ndarray, sample_positions: Sequence[int] = ()) -> ProbeRun:
        recorder = _EngineRecorder(len(tokens), frozenset(sample_positions))
        model = copy.deepcopy(self.model)  # test-time training changes the weights: every run starts equal
        with recorder.instrumented(self.mixer_factory):
            # Judged like every other consumer's stream: a non-finite figure ends the run as an error event.
            events = list(judged(engine_run.evaluate_model(model, tokens, self.tables, self.options,
                                                           device=self.device, ttt_recipe=self.ttt_recipe)))
        terminal = events[-1]
        outcome = "end" if terminal["type"] == "end" else (
            f"{terminal['type']}: {terminal.get('code', '')} {terminal.get('reason', '')}".strip())
        return recorder.result(outcome)


@contextlib.contextmanager
def _swapped(module: ModuleType, **replacements: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class _EngineRecorder:
    def __init__(self, num_tokens: int, sample_positions: frozenset[int]) -> None:
        self.nll = np.zeros(num_tokens, np.float64)
        self.times_scored = np.zeros(num_tokens, np.int64)
        self.sample_positions = sample_positions
        self.distributions: dict[int, np.ndarray] = {}
        self.order: list[OrderEvent] = []

    def instrumented(self, mixer_factory: MixerFactory | None) -> contextlib.AbstractContextManager[None]:
        real_score_chunk = engine_run.score_chunk
        real_make_mixer = engine_run.make_mixer

        def score_chunk(model: Any, tokens: np.ndarray, windows: WindowPlan, chunk: Chunk,
                        **kwargs: Any) -> ChunkScores:
            for position in sorted(p for p in self.sample_positions if chunk.target_lo <= p < chunk.target_hi):
                self.distributions[position] = committed_distribution(model, tokens, windows, position,
                                                                      kwargs["mixer"], kwargs["device"])
            scores = real_score_chunk(model, tokens, windows, chunk, **kwargs)
            sums = scores.sums.detach().cpu().numpy()
            self.nll[chunk.target_lo : chunk.target_hi] += sums[0]
            self.times_scored[chunk.target_lo : chunk.target_hi] += np.rint(sums[1]).astype(np.int64)
            self.order.append(OrderEvent("score", chunk.target_lo, chunk.target_hi, f"chunk {chunk.index}"))
            return scores

        def make_mixer(mode: str, vocab_size: int) -> NgramMixer | None:
            inner = (mixer_factory or real_make_mixer)(mode, vocab_size)
            return None if inner is None else _RecordingMixer(inner, self.order)

        updater = functools.partial(_RecordingUpdater, order=self.order)
        return _swapped(engine_run, score_chunk=score_chunk, make_mixer=make_mixer, TTTUpdater=updater)

    def result(self, outcome: str) -> ProbeRun:
        nll = self.nll.copy()
        nll[self.times_scored == 0] = np.nan
        return ProbeRun(nll, self.times_scored.copy(), dict(self.distributions), list(self.order), outcome)


def committed_distribution(model: Any, tokens: np.ndarray, windows: WindowPlan, position: int,
                           mixer: NgramMixer | None, device: torch.device) -> np.ndarray:
    """The distribution over the vocabulary for target ``position``, from the model state about to score it.

    The model's softmax at the window that scores the position (the engine's sliding-window plan), in the
    engine's precision, then the mixer's whole mixed vector when a mixer is active.
    """
    window = int(np.searchsorted(windows.score_from, position, side="right")) - 1
    start, end = int(windows.starts[window]), int(windows.ends[window])
    inputs = torch.from_numpy(np.asarray(tokens[start:end], dtype=np.int64))[None].to(device)
    with torch.inference_mode():
        with autocast_for(device):
            logits = model.forward_logits(inputs)
        logprobs = torch.log_softmax(logits[0, position - 1 - start].float(), dim=-1)
        if mixer is None:
            return logprobs.double().exp().cpu().numpy()
        return mixer.full_distribution(position, tokens, logprobs).to(torch.float64).cpu().numpy()


class _RecordingMixer:
    """Delegates everything to the engine's mixer and records each commit as a state update."""

    def __init__(self, inner: NgramMixer, order: list[OrderEvent]) -> None:
        self._inner = inner
        self._order = order

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self, tokens: np.ndarray | torch.Tensor, upto: int) -> None:
        start = max(self._inner.committed_upto, 1)
        if upto > start:  # folds tokens[start:upto] into the state: the targets start .. upto − 1
            self._order.append(OrderEvent("update", start, upto, "n-gram commit"))
        self._inner.commit(tokens, upto)


class _RecordingUpdater(TTTUpdater):
    """The engine's TTT updater, recording the target range of every training call before it trains."""

    def __init__(self, *args: Any, order: list[OrderEvent], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order = order

    def train(self, span: Any, chunk_index: int) -> tuple[int, int]:
        self._order.append(OrderEvent("update", span.token_lo + 1, span.token_hi, f"ttt on chunk {chunk_index}"))
        return super().train(span, chunk_index)


# ----------------------------------------------------------------------------------------------------------------
# Models and streams for probing without a submission


def random_model(vocab_size: int, seed: int = 0) -> GPT:
    """A small randomly initialised GPT with every component of the stack.

    The weights are perturbed away from the initialisation: its zero-initialised output projections make every
    prediction uniform, and probes of a model that ignores its input would prove nothing.
    """
    config = ModelConfig(vocab_size=vocab_size, num_layers=3, model_dim=64, num_heads=2, num_kv_heads=1,
                         mlp_mult=2, rope_dims=8, bigram_buckets=64, bigram_dim=16, xsa_last_n=3)
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def random_stream(num_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=num_tokens).astype(np.uint16)
