"""The cost model's FLOP derivation (bench/cost_model.py) against torch's own FLOP counter, config by config."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from trainer.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cost_model", REPO_ROOT / "bench/cost_model.py")
cost_model = importlib.util.module_from_spec(_spec)
sys.modules["cost_model"] = cost_model  # dataclasses look their module up there
_spec.loader.exec_module(cost_model)

TINY = ModelConfig(num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2, bigram_buckets=64,
                   bigram_dim=16, xsa_last_n=3, rope_dims=8)


@pytest.mark.parametrize("config", [
    TINY,
    replace(TINY, gated_attention=False, bigram_buckets=0, num_kv_heads=4, mlp_mult=3),
    replace(TINY, bigram_dim=64, value_residual=False, unet_skips=False),
    ModelConfig(),  # pr940 itself: 27,137,223 parameters, 11 layers, d 512
], ids=["tiny", "no-gate-no-bigram-mha", "bigram-at-model-dim", "pr940"])
def test_derived_flops_equal_torchs_counter(config: ModelConfig) -> None:
    seq_len = 256 if config != ModelConfig() else 2048
    derived = cost_model.flops_per_token(config, seq_len, causal=False)
    forward, backward = cost_model.counted_flops_per_token(config, seq_len)
    assert derived.forward == pytest.approx(forward, rel=1e-9)
    assert 2 * derived.forward == pytest.approx(backward, rel=1e-9)


def test_pr940_figures_of_docs_performance() -> None:
    flops = cost_model.flops_per_token(ModelConfig(), 2048, frozen_blocks=2)
    assert round(flops.dense) == 53_174_272 and round(flops.attention) == 23_079_936
    assert round(flops.train / 1e6, 2) == 228.76 and round(flops.ttt() / 1e6, 1) == 219.3
