"""Quantisation: encoding choice by name and size, and the reconstruction bounds of each encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.encodings import (
    FP16,
    FP32,
    INT5_ROW,
    INT6_ROW,
    INT8_ROW,
    RAW,
    ROW_QMAX,
    dequantize_tensor,
)
from trainer.model import GPT, ModelConfig
from trainer.quant import (
    BLOCK_CLIP_PERCENTILES,
    QuantError,
    block_index,
    choose_encoding,
    classify,
    quantize_rows,
    quantize_state_dict,
    quantize_tensor,
)

BLOCK_MATRICES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")
MLP_MATRICES = ("mlp.fc.weight", "mlp.proj.weight")



@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These tests do many small tensor ops; on a shared 2-core machine, intra-op threads mostly spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few large outliers, so that clipping actually matters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    outliers = torch.rand(rows, cols, generator=g) < 0.002
    return torch.where(outliers, w * 12, w)


def test_pr940_state_dict_encodings() -> None:
    """Every tensor of the real pr940 model gets the encoding of the reference export (§6.2, gotchas 12-13)."""
    with torch.device("meta"):
        state = GPT(ModelConfig()).state_dict()
    encodings = {name: choose_encoding(name, t) for name, t in state.items()}
    for layer in range(11):
        for suffix in BLOCK_MATRICES + MLP_MATRICES:
            assert encodings.pop(f"blocks.{layer}.{suffix}") == INT6_ROW
    assert encodings.pop("tok_emb.weight") == INT8_ROW
    assert encodings.pop("bigram.embed.weight") == INT8_ROW
    # Everything left is small: bigram.proj (exactly 65,536), attn_gate (4,104, a control name) and the scalars.
    assert encodings.pop("bigram.proj.weight") == FP16
    assert encodings.pop("blocks.0.attn.attn_gate.weight") == FP16
    assert set(encodings.values()) == {FP16}


def test_classification_and_block_index() -> None:
    assert classify("tok_emb.weight") == "embed"
    assert classify("blocks.3.mlp.proj.weight") == "mlp"
    assert classify("blocks.3.attn.c_k.weight") == "attn"
    assert classify("bigram.proj.weight") == "attn"  # upstream quirk: any ".proj." outside an MLP
    assert classify("bigram.embed.weight") == "other"
    assert block_index("blocks.10.attn.c_q.weight") == 10
    assert block_index("bigram.proj.weight") is None


def test_large_control_tensor_is_fp32_and_non_float_is_raw() -> None:
    assert choose_encoding("blocks.0.attn_scale", torch.zeros(65_537)) == FP32
    assert choose_encoding("blocks.0.attn_scale", torch.zeros(65_536)) == FP16  # size check comes first
    assert choose_encoding("blocks.0.mlp.fc.weight", torch.zeros(300, 300), block_encoding=INT5_ROW) == INT5_ROW
    assert choose_encoding("counter", torch.zeros(70_000, dtype=torch.int64)) == RAW


def test_passthrough_round_trips_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    small = torch.randn(4, 100, generator=g)
    control = torch.randn(70_000, generator=g)
    counts = torch.randint(-(2**40), 2**40, (7,), generator=g)
    mask = torch.rand(9, generator=g) > 0.5
    bf16_small = torch.randn(33, generator=g).to(torch.bfloat16)

    assert torch.equal(dequantize_tensor(quantize_tensor("x.weight", small)), small.half().float())
    restored = dequantize_tensor(quantize_tensor("skip_weights", control))
    assert restored.dtype == torch.float32 and torch.equal(restored, control)
    assert torch.equal(dequantize_tensor(quantize_tensor("counts", counts)), counts)
    assert torch.equal(dequantize_tensor(quantize_tensor("mask", mask)), mask)
    restored_bf16 = dequantize_tensor(quantize_tensor("smear.gate", bf16_small))
    assert restored_bf16.dtype == torch.bfloat16 and torch.equal(restored_bf16, bf16_small.half().bfloat16())


@pytest.mark.parametrize(
    ("name", "block_encoding", "encoding"),
    [
        ("blocks.2.mlp.fc.weight", INT6_ROW, INT6_ROW),
        ("blocks.2.attn.c_q.weight", INT5_ROW, INT5_ROW),
        ("tok_emb.weight", INT6_ROW, INT8_ROW),
    ],
)
def test_row_quantisation_within_half_a_step(name: str, block_encoding: str, encoding: str) -> None:
    """Inside the clip range every element is within half a step; outside it, q saturates at ±qmax."""
    w = heavy_tailed(384, 256)
    qt = quantize_tensor(name, w, block_encoding=block_encoding)
    assert qt.encoding == encoding and qt.values.dtype == np.int8
    qmax = ROW_QMAX[encoding]
    q = torch.from_numpy(qt.values.astype(np.int64)).reshape(384, 256)
    scale = torch.from_numpy(qt.scales.astype(np.float64))[:, None]
    assert int(q.abs().max()) <= qmax and bool((scale > 0).all())

    restored = dequantize_tensor(qt).double()
    assert torch.equal(restored, q.double() * scale)  # dequantisation is exactly q * scale[row]
    w64 = w.double()
    clip = qmax * scale
    inside = w64.abs() <= clip
    assert bool(((w64 - restored).abs() <= scale / 2 * (1 + 1e-6))[inside].all())
    assert bool((q.abs() == qmax)[~inside].all())
    if encoding != INT8_ROW:
        assert bool((~inside).any()), "the clip search should clip some outliers in this matrix"


def test_clip_search_picks_the_best_percentile_per_row() -> None:
    """The chosen row error equals the minimum over candidates, row by row, so it never loses to upstream's
    one-percentile-per-matrix choice; and different rows really do pick different percentiles here."""
    rows = heavy_tailed(64, 512, seed=3)
    rows[0] = torch.linspace(-1, 1, 512)  # no outliers: clipping only hurts, the max (1.0) must win

    def row_errors(percentiles: tuple[float, ...]) -> torch.Tensor:
        q, scales = quantize_rows(rows, 31, percentiles)
        restored = torch.from_numpy(q).float() * torch.from_numpy(scales).float()[:, None]
        return ((restored - rows) ** 2).sum(dim=1)

    chosen_err = row_errors(BLOCK_CLIP_PERCENTILES)
    per_candidate_err = torch.stack([row_errors((p,)) for p in BLOCK_CLIP_PERCENTILES])
    assert torch.allclose(chosen_err, per_candidate_err.min(dim=0).values, rtol=0, atol=0)
    assert len(set(per_candidate_err.argmin(dim=0).tolist())) > 1
    assert chosen_err.sum() <= per_candidate_err.sum(dim=1).min()


def test_zero_rows_quantise_to_zero_with_positive_scales() -> None:
    qt = quantize_tensor("blocks.0.mlp.proj.weight", torch.zeros(512, 1536))
    assert not qt.values.any() and bool((qt.scales > 0).all())
    assert torch.equal(dequantize_tensor(qt), torch.zeros(512, 1536))


def test_state_dict_int5_blocks_only_touch_block_matrices() -> None:
    state = {
        "blocks.0.mlp.fc.weight": heavy_tailed(300, 256, seed=4),
        "blocks.1.mlp.fc.weight": heavy_tailed(300, 256, seed=5),
        "blocks.1.attn_scale": torch.ones(256),
        "tok_emb.weight": heavy_tailed(300, 256, seed=6),
    }
    encoded = quantize_state_dict(state, int5_blocks=[1])
    assert [qt.encoding for qt in encoded] == [INT6_ROW, INT5_ROW, FP16, INT8_ROW]
    restored = {qt.name: dequantize_tensor(qt) for qt in encoded}
    assert list(restored) == list(state) and all(restored[n].shape == state[n].shape for n in state)


def test_unencodable_tensors_are_refused() -> None:
    bad = heavy_tailed(300, 256)
    bad[3, 7] = float("nan")
    with pytest.raises(QuantError, match="non-finite"):
        quantize_tensor("blocks.0.mlp.fc.weight", bad)
    with pytest.raises(QuantError, match="fp16 range"):
        quantize_tensor("smear.gate", torch.full((8,), 1e6))
    with pytest.raises(QuantError, match="fp16 range"):
        quantize_tensor("blocks.0.mlp.fc.weight", torch.full((300, 300), 1e7))
