"""Two gloo processes evaluate exactly what one process does: shared windows, summed scores, averaged TTT
gradients, identical n-gram state on every rank."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from test_engine_scoring import STRONG_SGD, options, repetitive_tokens, terminal, tiny_model, tiny_tables

from service.engine.dist import DistContext
from service.engine.options import RECIPES
from service.engine.run import evaluate_model
from service.judge import judged

# (name, options, recipe): chunk 72 leaves a ragged 8-target sequence in every TTT span, so the gradient
# weighting across ranks is exercised with unequal shares.
CASES = {
    "plain+smoothed": (options(chunk_tokens=50, batch_windows=3, ngram="smoothed"), None),
    "ttt-strong": (options(chunk_tokens=72, ttt=True), STRONG_SGD),
    "ttt-pr940+exact": (options(chunk_tokens=72, ttt=True, ngram="exact"), RECIPES["pr940"]),
}
TOKENS = 300


def _worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        tokens = repetitive_tokens(TOKENS, seed=4)
        results = {}
        for name, (opts, recipe) in CASES.items():
            events = list(judged(evaluate_model(tiny_model(), tokens, tiny_tables(), opts,
                                                dist=DistContext(rank=rank, world_size=world_size),
                                                ttt_recipe=recipe)))
            results[name] = events
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        torch_dist.barrier()  # no rank tears gloo down while its peer still uses it
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_equal_one_process(case: str, two_process_results: list[dict]) -> None:
    torch.set_num_threads(1)
    opts, recipe = CASES[case]
    tokens = repetitive_tokens(TOKENS, seed=4)
    single = list(judged(evaluate_model(tiny_model(), tokens, tiny_tables(), opts, ttt_recipe=recipe)))
    expected = terminal(single)
    assert expected["type"] == "end" and expected["compliance"]["compliant"]
    for rank_events in (r[case] for r in two_process_results):
        got = terminal(rank_events)
        assert got["type"] == "end", got
        assert got["targets_scored"] == expected["targets_scored"] == TOKENS - 1
        assert got["bytes"] == expected["bytes"]
        assert got["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-6)
        assert got["compliance"]["scored_once"] and got["compliance"]["score_before_update"]
        assert got["compliance"]["trace_digest"] == expected["compliance"]["trace_digest"]
        chunks = [e for e in rank_events if e["type"] == "chunk"]
        expected_chunks = [e for e in single if e["type"] == "chunk"]
        assert [c["target_range"] for c in chunks] == [c["target_range"] for c in expected_chunks]
        for a, b in zip(chunks, expected_chunks, strict=True):
            assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)
        assert rank_events[0]["config"]["world_size"] == 2


def test_ttt_comparison_is_sensitive() -> None:
    """The strong TTT case moves the score far beyond the 1e-6 tolerance, so a wrong reduction would show."""
    torch.set_num_threads(1)
    tokens = repetitive_tokens(TOKENS, seed=4)
    adapted_options, recipe = CASES["ttt-strong"]
    plain = terminal(list(judged(evaluate_model(tiny_model(), tokens, tiny_tables(),
                                                replace(adapted_options, ttt=False)))))
    adapted = terminal(list(judged(evaluate_model(tiny_model(), tokens, tiny_tables(), adapted_options,
                                                  ttt_recipe=recipe))))
    assert abs(adapted["val_bpb"] - plain["val_bpb"]) > 1e-3 * plain["val_bpb"]


def test_ranks_come_from_torchrun_and_the_device_from_local_rank_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second node on the global RANK (8, 9, …) is no device index: without LOCAL_RANK the evaluation
    refuses to start instead of picking cuda:RANK."""
    from service.engine.dist import ranks_from_env
    from service.engine.options import EvalOptions
    from service.engine.run import evaluate

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_from_env() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(ValueError, match="LOCAL_RANK unset: launch with torchrun"):
        ranks_from_env()
    [event] = list(evaluate(EvalOptions(device="cpu")))
    assert event["type"] == "error" and event["code"] == "bad_options" and "torchrun" in event["reason"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks_from_env() == (9, 16, 1)
