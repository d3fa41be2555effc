"""Behaviour of the PR #940 model: each §4.2 component against its formula, on small configs (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model import (
    GPT,
    CausalSelfAttention,
    ModelConfig,
    apply_rotary,
    rotary_tables,
)
from trainer.train import parameter_groups

# sum(p.numel() for p in GPT(ModelConfig()).parameters()). Breakdown: 11 blocks × (2,359,296 matrix + 2,056
# scales/mix/q_gain + 2 vr_lambda + 4,104 attn_gate) + tok_emb 524,288 + BigramHash 589,825 (4096×128 embed,
# 128→512 proj, scale) + skip_weights 2,560 + smear 512. Upstream logs never printed it ("about 27.14M").
PR940_PARAMETER_COUNT = 27_137_223

TINY = ModelConfig(
    vocab_size=64,
    num_layers=4,
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    rope_dims=4,
    rope_train_seq_len=16,
    xsa_last_n=4,
    bigram_buckets=32,
    bigram_dim=8,
    bos_id=1,
)



def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def randomised(model: GPT, seed: int = 0) -> GPT:
    """Give every parameter random values: at the reference init the out/down projections and the bigram table
    are zero, which would hide most of the paths under test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def random_ids(shape: tuple[int, ...], vocab: int, seed: int, avoid: int | None = None) -> torch.Tensor:
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    if avoid is not None:
        ids[ids == avoid] = avoid + 1
    return ids


# ---- parameter count and groups -------------------------------------------------------------------------------


def test_pr940_parameter_count_matches_the_constant_and_the_logged_11l_stack():
    with torch.device("meta"):
        model = GPT(ModelConfig())
        # PR #287's 11L stack (BigramHash 2048, no Value Residual, no gate) logged model_params:26829913.
        logged_287 = GPT(ModelConfig(bigram_buckets=2048, value_residual=False, gated_attention=False))
    assert sum(p.numel() for p in model.parameters()) == PR940_PARAMETER_COUNT == 27_137_223
    assert sum(p.numel() for p in logged_287.parameters()) == 26_829_913
    # Reference breakdown: 2,359,296 matrix elements per layer.
    block_matrices = sum(p.numel() for p in parameter_groups(model)["matrix"]) - 128 * 512
    assert block_matrices == 11 * 2_359_296


@pytest.mark.parametrize("config", [ModelConfig(), TINY, tiny(bigram_buckets=0, smear_gate=False, unet_skips=False)])
def test_parameter_groups_partition_all_parameters_exactly_once(config):
    with torch.device("meta"):
        model = GPT(config)
    groups = parameter_groups(model)
    assert set(groups) == {"matrix", "embed", "scalar"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())

    names = {id(p): name for name, p in model.named_parameters()}
    matrix_names = {names[id(p)] for p in groups["matrix"]}
    embed_names = {names[id(p)] for p in groups["embed"]}
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert "blocks.0.attn.c_q.weight" in matrix_names and "blocks.0.mlp.proj.weight" in matrix_names
    assert not any("attn_gate" in n or "resid_mix" in n for n in matrix_names)  # 2-D but control tensors
    assert ("bigram.proj.weight" in matrix_names) == (config.bigram_buckets > 0)
    assert embed_names == {"tok_emb.weight"} | ({"bigram.embed.weight"} if config.bigram_buckets else set())


# ---- initialisation -------------------------------------------------------------------------------------------


def test_reference_initialisation():
    config = ModelConfig(vocab_size=256, num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1, bigram_dim=64)
    torch.manual_seed(0)
    model = GPT(config)
    attn = model.blocks[1].attn
    eye = torch.eye(64)
    assert torch.allclose(attn.c_k.weight @ attn.c_k.weight.T, eye, atol=1e-5)  # 64×128: orthogonal rows
    assert torch.allclose(model.blocks[0].mlp.fc.weight.T @ model.blocks[0].mlp.fc.weight, torch.eye(128), atol=1e-5)
    for zero in (attn.proj.weight, model.blocks[0].mlp.proj.weight, attn.attn_gate.weight, model.bigram.embed.weight):
        assert torch.count_nonzero(zero) == 0
    assert torch.all(attn.attn_gate.bias == 4.0)
    assert torch.all(attn.q_gain == 1.5) and torch.equal(attn.vr_lambda, torch.tensor([0.5, 0.5]))
    proj = model.bigram.proj.weight  # 128×64, orthogonal then scaled by 1/sqrt(2L)
    assert torch.allclose(proj.T @ proj, torch.eye(64) / (2 * config.num_layers), atol=1e-5)
    assert model.bigram.scale.item() == pytest.approx(0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert torch.equal(model.blocks[1].resid_mix, torch.stack((torch.ones(128), torch.zeros(128))))
    assert torch.all(model.skip_weights == 1) and torch.all(model.smear.gate == 0)
    assert [b.ln_scale_factor for b in model.blocks] == [1.0, 1 / math.sqrt(2)]
    assert all(b.attn.use_xsa for b in model.blocks)  # xsa_last_n=11 on a 2-layer model means all layers


# ---- causality and document boundaries ------------------------------------------------------------------------


def test_changing_future_tokens_leaves_earlier_logits_unchanged():
    model = randomised(GPT(TINY)).eval()
    ids = random_ids((2, 24), TINY.vocab_size, seed=1)
    changed = ids.clone()
    changed[:, 11:] = random_ids((2, 13), TINY.vocab_size, seed=2)
    with torch.no_grad():
        a, b = model.forward_logits(ids), model.forward_logits(changed)
    assert torch.allclose(a[:, :11], b[:, :11], atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:], atol=1e-3)  # the probe is sensitive


def _packed(first_document: torch.Tensor, second_document: torch.Tensor, bos: int) -> torch.Tensor:
    return torch.cat((first_document, torch.tensor([bos]), second_document)).unsqueeze(0)


@pytest.mark.parametrize("mask_bos", [True, False])
def test_bos_masking_stops_previous_token_features_at_a_document_boundary(mask_bos):
    config = tiny(mask_bos=mask_bos)
    model = randomised(GPT(config))
    bos = config.bos_id
    doc_a1 = random_ids((9,), config.vocab_size, seed=3, avoid=bos)
    doc_a2 = random_ids((9,), config.vocab_size, seed=4, avoid=bos)
    doc_b = random_ids((12,), config.vocab_size, seed=5, avoid=bos)
    boundary = doc_a1.numel()  # index of B's BOS in the packed row
    with torch.no_grad():
        x0_after_a1 = model.input_embeddings(_packed(doc_a1, doc_b, bos))[0, boundary:]
        x0_after_a2 = model.input_embeddings(_packed(doc_a2, doc_b, bos))[0, boundary:]
        x0_alone = model.input_embeddings(torch.cat((torch.tensor([bos]), doc_b)).unsqueeze(0))[0]
    if mask_bos:
        # Document B's inputs to the first block are the same whatever precedes it, and the same as when B
        # starts its own row: neither SmearGate nor BigramHash carries anything across the BOS.
        assert torch.equal(x0_after_a1, x0_after_a2)
        assert torch.allclose(x0_after_a1, x0_alone, atol=1e-6)
    else:
        # Upstream behaviour: the BOS position sees the previous document's last token (SmearGate and the
        # bigram pair), and through the smear of B's first token the leak reaches one position further.
        assert not torch.allclose(x0_after_a1[0], x0_after_a2[0], atol=1e-3)
        assert not torch.allclose(x0_after_a1[1], x0_after_a2[1], atol=1e-3)
        assert torch.equal(x0_after_a1[2:], x0_after_a2[2:])


def test_bigram_buckets_follow_the_hash_formula():
    model = GPT(tiny(bigram_buckets=1000, mask_bos=True))
    ids = torch.tensor([[5, 3, 1, 7, 900]])
    buckets = model.bigram.bucket_ids(ids, ids != 1)
    reserved = 999
    pair = lambda current, previous: (36313 * current ^ 27191 * previous) % reserved  # noqa: E731
    # Position 0 has no previous token; position 2 is a BOS, whose previous token is masked.
    assert buckets.tolist() == [[reserved, pair(3, 5), reserved, pair(7, 1), pair(900, 7)]]
    assert model.bigram.bucket_ids(ids, None)[0, 2].item() == pair(1, 3)  # unmasked: the pair crosses the BOS


# ---- attention: XSA, Value Residual, gate, GQA ----------------------------------------------------------------


def hand_attention(attn: CausalSelfAttention, x: torch.Tensor, v0: torch.Tensor | None, config: ModelConfig):
    """The attention formulas of reference §4.2 written out with explicit loops over heads and positions."""
    batch, seq_len, _ = x.shape
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.model_dim // config.num_heads
    q = (x @ attn.c_q.weight.T).reshape(batch, seq_len, heads, d)
    k = (x @ attn.c_k.weight.T).reshape(batch, seq_len, kv_heads, d)
    v = (x @ attn.c_v.weight.T).reshape(batch, seq_len, kv_heads, d)
    if v0 is not None:  # Value Residual: v ← λ0·v0 + λ1·v
        v = attn.vr_lambda[0] * v0.transpose(1, 2) + attn.vr_lambda[1] * v
    q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(q.dtype).eps).sqrt()
    k = k / k.pow(2).mean(-1, keepdim=True).add(torch.finfo(k.dtype).eps).sqrt()

    def rotate(vec: torch.Tensor, position: int) -> torch.Tensor:  # rotate-half pairs (i, i + rd/2)
        rd, out = config.rope_dims, vec.clone()
        for i in range(rd // 2):
            angle = position * config.rope_base ** (-2 * i / rd)
            a, b = vec[..., i], vec[..., i + rd // 2]
            out[..., i] = a * math.cos(angle) + b * math.sin(angle)
            out[..., i + rd // 2] = b * math.cos(angle) - a * math.sin(angle)
        return out

    q = torch.stack([rotate(q[:, t], t) for t in range(seq_len)], dim=1) * attn.q_gain[:, None]
    k = torch.stack([rotate(k[:, t], t) for t in range(seq_len)], dim=1)
    y = torch.zeros(batch, seq_len, heads, d)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for t in range(seq_len):
            scores = (q[:, t, h, None, :] * k[:, : t + 1, g]).sum(-1) / math.sqrt(d)
            out = (scores.softmax(-1)[..., None] * v[:, : t + 1, g]).sum(1)
            if attn.use_xsa:
                unit = v[:, t, g] / v[:, t, g].norm(dim=-1, keepdim=True)
                out = out - (out * unit).sum(-1, keepdim=True) * unit
            if attn.attn_gate is not None:
                out = out * torch.sigmoid(x[:, t] @ attn.attn_gate.weight[h] + attn.attn_gate.bias[h])[:, None]
            y[:, t, h] = out
    return y.reshape(batch, seq_len, -1) @ attn.proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [{}, {"value_residual": False}, {"gated_attention": False}, {"xsa_last_n": 0}, {"num_kv_heads": 4}],
)
def test_attention_matches_the_hand_computation(overrides):
    config = tiny(**overrides)
    model = randomised(GPT(config), seed=7)
    attn = model.blocks[2].attn
    x = torch.randn(2, 6, config.model_dim, generator=torch.Generator().manual_seed(8))
    kv_dim = config.num_kv_heads * config.model_dim // config.num_heads
    v0 = torch.randn(2, config.num_kv_heads, 6, kv_dim // config.num_kv_heads) if config.value_residual else None
    cos, sin = rotary_tables(6, config.rope_dims, config.rope_base, config.rope_train_seq_len, x.device)
    with torch.no_grad():
        out, own_v = attn(x, v0, cos, sin)
        expected = hand_attention(attn, x, v0, config)
    assert torch.allclose(out, expected, atol=1e-5)
    # The value returned for Value Residual is the layer's own, unmixed v.
    assert torch.allclose(own_v.transpose(1, 2).reshape(2, 6, -1), x @ attn.c_v.weight.T, atol=1e-6)


@pytest.mark.parametrize("use_xsa", [True, False])
def test_xsa_output_has_no_component_along_the_tokens_own_value(use_xsa):
    config = tiny(xsa_last_n=TINY.num_layers if use_xsa else 0)
    model = randomised(GPT(config), seed=11)
    attn = model.blocks[1].attn
    captured = {}
    attn.proj.register_forward_pre_hook(lambda module, args: captured.update(y=args[0]))
    x = torch.randn(2, 10, config.model_dim)
    v0 = torch.randn(2, config.num_kv_heads, 10, 8)
    cos, sin = rotary_tables(10, config.rope_dims, config.rope_base, config.rope_train_seq_len, x.device)
    with torch.no_grad():
        attn(x, v0, cos, sin)
        own_v = (x @ attn.c_v.weight.T).reshape(2, 10, 2, 8).transpose(1, 2)
        mixed_v = attn.vr_lambda[0] * v0 + attn.vr_lambda[1] * own_v
    y = captured["y"].reshape(2, 10, config.num_heads, 8)  # gated head outputs entering the out projection
    group = config.num_heads // config.num_kv_heads
    unit_v = F.normalize(mixed_v, dim=-1).transpose(1, 2).repeat_interleave(group, dim=2)
    along_own_value = (y * unit_v).sum(-1).abs()
    if use_xsa:
        assert along_own_value.max() < 1e-5 * y.norm(dim=-1).max()
    else:
        assert along_own_value.max() > 0.1 * y.norm(dim=-1).max()


def test_value_residual_feeds_layer_zero_value_to_every_later_layer():
    model = randomised(GPT(TINY), seed=12)
    own_values, received_v0 = [], []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda module, args, output: own_values.append(output[1]))
        block.attn.register_forward_pre_hook(lambda module, args: received_v0.append(args[1]))
    with torch.no_grad():
        model.forward_logits(random_ids((1, 8), TINY.vocab_size, seed=13))
    assert received_v0[0] is None
    assert all(v0 is own_values[0] for v0 in received_v0[1:])

    own_values.clear()
    received_v0.clear()
    no_vr = randomised(GPT(tiny(value_residual=False)), seed=12)
    for block in no_vr.blocks:
        block.attn.register_forward_pre_hook(lambda module, args: received_v0.append(args[1]))
    with torch.no_grad():
        no_vr.forward_logits(random_ids((1, 8), TINY.vocab_size, seed=13))
    assert received_v0 == [None] * TINY.num_layers


# ---- U-Net skips ----------------------------------------------------------------------------------------------


def test_unet_skips_are_popped_lifo_and_the_last_decoder_block_gets_none():
    config = tiny(num_layers=7)  # encoder 3 blocks, decoder 4
    model = randomised(GPT(config), seed=14)
    outputs, inputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output[0]))
        block.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad():
        model.forward_logits(random_ids((2, 8), config.vocab_size, seed=15))
        weights = model.skip_weights
        for decoder_index, block_index in enumerate(range(3, 7)):
            added = inputs[block_index] - outputs[block_index - 1]
            if decoder_index < 3:
                lifo_source = 2 - decoder_index  # deepest encoder output first
                assert torch.allclose(added, weights[decoder_index] * outputs[lifo_source], atol=1e-5)
                if lifo_source != decoder_index:
                    assert not torch.allclose(added, weights[decoder_index] * outputs[decoder_index], atol=1e-3)
            else:
                assert torch.count_nonzero(added) == 0


def test_without_unet_skips_blocks_are_plainly_sequential():
    model = randomised(GPT(tiny(unet_skips=False)), seed=16)
    assert model.skip_weights is None
    outputs, inputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output[0]))
        block.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad():
        model.forward_logits(random_ids((1, 8), TINY.vocab_size, seed=17))
    assert all(inputs[i] is outputs[i - 1] for i in range(1, TINY.num_layers))


# ---- RoPE ----------------------------------------------------------------------------------------------------


def test_partial_rope_rotates_only_the_first_dims_and_preserves_norms():
    cos, sin = rotary_tables(12, 16, 10000.0, 1024, torch.device("cpu"))
    x = torch.randn(2, 3, 12, 64)
    rotated = apply_rotary(x, cos, sin)
    assert torch.equal(rotated[..., 16:], x[..., 16:])
    assert torch.allclose(rotated[:, :, 0], x[:, :, 0])  # angle 0 at position 0
    assert not torch.allclose(rotated[:, :, 1:, :16], x[:, :, 1:, :16], atol=1e-3)
    pair_norm = lambda t: t[..., :8].pow(2) + t[..., 8:16].pow(2)  # noqa: E731  (dims i and i+8 rotate together)
    assert torch.allclose(pair_norm(rotated), pair_norm(x), atol=1e-5)
    # Relative: the score between positions depends only on their distance.
    q, k = torch.randn(64), torch.randn(64)
    rq = apply_rotary(q.expand(12, 64), cos, sin)
    rk = apply_rotary(k.expand(12, 64), cos, sin)
    assert torch.allclose(rq[5] @ rk[2], rq[9] @ rk[6], atol=1e-4)


def test_rope_ntk_quirk_rescales_the_base_beyond_the_train_length():
    at_train_length = rotary_tables(1024, 16, 10000.0, 1024, torch.device("cpu"))[0]
    at_2048 = rotary_tables(2048, 16, 10000.0, 1024, torch.device("cpu"))[0]
    effective_base = 10000.0 * 2 ** (16 / 14)  # ≈ 22,081 (reference §4.2)
    assert effective_base == pytest.approx(22081, abs=1)
    i = torch.arange(8, dtype=torch.float64)
    assert torch.allclose(at_2048[1].double(), torch.cos(effective_base ** (-2 * i / 16)), atol=1e-6)
    assert torch.allclose(at_train_length[1].double(), torch.cos(10000.0 ** (-2 * i / 16)), atol=1e-6)


# ---- switches, dtypes, inference mode -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, absent",
    [
        ({"xsa_last_n": 0}, None),
        ({"value_residual": False}, "vr_lambda"),
        ({"gated_attention": False}, "attn_gate"),
        ({"smear_gate": False}, "smear"),
        ({"bigram_buckets": 0}, "bigram"),
        ({"ln_scale": False}, None),
        ({"unet_skips": False}, "skip_weights"),
        ({"leaky_relu_slope": 0.0}, None),
        ({"rope_dims": 8}, None),  # full RoPE: head_dim 8
        ({"mask_bos": False}, None),
    ],
)
def test_each_component_can_be_switched_off(overrides, absent):
    model = randomised(GPT(tiny(**overrides)), seed=18)
    if absent is not None:
        assert not any(absent in name for name, _ in model.named_parameters())
    ids = random_ids((2, 20), TINY.vocab_size, seed=19)  # 20 > rope_train_seq_len: NTK path
    loss = model(ids, ids.roll(-1, dims=1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if name != "blocks.0.attn.vr_lambda")
    if overrides.get("ln_scale") is False:
        assert all(block.ln_scale_factor == 1.0 for block in model.blocks)
    if "xsa_last_n" in overrides:
        assert not any(block.attn.use_xsa for block in model.blocks)


def test_mlp_uses_leaky_relu_squared():
    for slope in (0.5, 0.0):
        mlp = randomised(GPT(tiny(leaky_relu_slope=slope)), seed=20).blocks[0].mlp
        x = torch.randn(3, TINY.model_dim)
        h = x @ mlp.fc.weight.T
        expected = torch.where(h > 0, h, slope * h).square() @ mlp.proj.weight.T
        assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_loss_is_mean_cross_entropy_of_softcapped_logits():
    model = randomised(GPT(tiny(logit_softcap=2.0)), seed=21)
    ids = random_ids((2, 9), TINY.vocab_size, seed=22)
    targets = ids.roll(-1, dims=1)
    with torch.no_grad():
        logits = model.forward_logits(ids)
        hidden = model.final_hidden(ids)
        expected_logits = 2.0 * torch.tanh(hidden @ model.tok_emb.weight.T / 2.0)
        loss = model(ids, targets)
    assert logits.dtype == torch.float32 and logits.shape == (2, 9, TINY.vocab_size)
    assert logits.abs().max() <= 2.0
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1)).item(), rel=1e-6)


def test_training_after_inference_mode_scoring_keeps_autograd_working():
    # Score-first TTT scores under inference_mode and then trains the same model (reference §7.3 pitfall).
    model = randomised(GPT(TINY), seed=23)
    ids = random_ids((1, 20), TINY.vocab_size, seed=24)
    with torch.inference_mode():
        model.forward_logits(ids)
    loss = model(ids, ids.roll(-1, dims=1))
    loss.backward()
    assert model.blocks[0].attn.c_q.weight.grad is not None


def test_runs_under_bf16_autocast_and_returns_fp32_logits():
    model = randomised(GPT(TINY), seed=25)
    ids = random_ids((2, 12), TINY.vocab_size, seed=26)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.forward_logits(ids)
        loss = model(ids, ids.roll(-1, dims=1))
    loss.backward()
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():
        reference = model.forward_logits(ids)
    assert torch.allclose(logits, reference, atol=0.15)  # bf16 activations, same function


@pytest.mark.parametrize(
    "overrides",
    [{"rope_dims": 2}, {"rope_dims": 10}, {"xsa_last_n": -1}, {"num_kv_heads": 3},
     {"bigram_buckets": 1}, {"bos_id": 64}],
)
def test_invalid_configs_are_refused(overrides):
    with pytest.raises(ValueError, match="invalid ModelConfig"):
        GPT(tiny(**overrides))
