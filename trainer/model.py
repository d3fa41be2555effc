"""The PR #940 transformer (docs/model.md). Weights and learned scales are cast to the activation dtype where they
are used: fp32 on CPU, bf16 under CUDA autocast or when a trainer casts the model, as upstream.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """Stored in the manifest as ``asdict(config)``: every field is a plain int, float or bool."""

    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    # 0.0 is relu². PR #940 documents 0.5 but ran its script's default 0.9 (README "Training"; LEAKY_SLOPE=0.9).
    leaky_relu_slope: float = 0.5
    rope_dims: int = 16
    rope_base: float = 10000.0
    rope_train_seq_len: int = 1024  # upstream NTK quirk: Rotary is built with 1024 hard-coded
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    qk_gain_init: float = 1.5
    xsa_last_n: int = 11
    value_residual: bool = True
    gated_attention: bool = True
    attn_gate_bias_init: float = 4.0
    smear_gate: bool = True
    bigram_buckets: int = 4096  # 0: no BigramHash
    bigram_dim: int = 128
    ln_scale: bool = True
    unet_skips: bool = True
    mask_bos: bool = True
    bos_id: int = 1


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def autocast_for(device: torch.device) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class CastedLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def rotary_tables(seq_len: int, rope_dims: int, base: float, train_seq_len: int, device: torch.device
                  ) -> tuple[Tensor, Tensor]:
    """(seq_len, rope_dims/2) fp32 cos/sin, NTK-rescaled above ``train_seq_len`` as upstream. Rebuilt on every
    forward, never cached: a cache filled under inference_mode would break TTT's autograd after scoring."""
    if seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims))
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half on the first 2·cos.size(-1) dims of x (…, T, head_dim)."""
    rope_dims = 2 * cos.size(-1)
    half = rope_dims // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, x_pass = x[..., :half], x[..., half:rope_dims], x[..., rope_dims:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x_pass), dim=-1)


class BigramHash(nn.Module):
    def __init__(self, buckets: int, bigram_dim: int, model_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(buckets, bigram_dim)
        # The upstream module exists only as a projection when the dims differ.
        self.proj = CastedLinear(bigram_dim, model_dim, bias=False) if bigram_dim != model_dim else None
        self.scale = nn.Parameter(torch.tensor(0.05, dtype=torch.float32))

    def bucket_ids(self, input_ids: Tensor, previous_token_kept: Tensor | None) -> Tensor:
        # Input tokens only, so causal; no previous token (position 0, a masked BOS) uses the reserved last bucket.
        reserved = self.embed.num_embeddings - 1
        tokens = input_ids.to(torch.int32)
        # int32 arithmetic as upstream; `%` is a floor modulo, so a product that wraps past 2^31 (vocabularies
        # above ~59k) still lands in [0, reserved).
        hashed = torch.bitwise_xor(36313 * tokens[..., 1:], 27191 * tokens[..., :-1]) % reserved
        buckets = torch.cat((torch.full_like(tokens[..., :1], reserved), hashed), dim=-1)
        if previous_token_kept is not None:
            buckets = torch.where(previous_token_kept, buckets, torch.full_like(buckets, reserved))
        return buckets.long()

    def forward(self, input_ids: Tensor, previous_token_kept: Tensor | None) -> Tensor:
        h = self.embed(self.bucket_ids(input_ids, previous_token_kept))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: Tensor, previous_token_kept: Tensor | None) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        if previous_token_kept is not None:
            previous = previous * previous_token_kept.unsqueeze(-1).to(x.dtype)
        return (1 - g) * x + g * previous


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA on y (B, H, T, D) with v (B, H_kv, T, D), query heads grouped as in SDPA's enable_gqa."""
    batch, heads, seq_len, head_dim = y.shape
    kv_heads = v.size(1)
    y_grouped = y.reshape(batch, kv_heads, heads // kv_heads, seq_len, head_dim)
    v_unit = F.normalize(v, dim=-1).unsqueeze(2)
    along_v = (y_grouped * v_unit).sum(dim=-1, keepdim=True) * v_unit
    return (y_grouped - along_v).reshape(batch, heads, seq_len, head_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, use_xsa: bool) -> None:
        super().__init__()
        dim = config.model_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = dim // config.num_heads
        kv_dim = config.num_kv_heads * self.head_dim
        self.use_xsa = use_xsa
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        # Every layer carries a (λ0, λ1) pair as upstream, although layer 0 never uses its own (it produces v0);
        # keeping it preserves the reference parameter count and state-dict layout.
        self.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float32)) if config.value_residual else None
        self.attn_gate = CastedLinear(dim, config.num_heads, bias=True) if config.gated_attention else None

    def forward(self, x: Tensor, v0: Tensor | None, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Return (output, this layer's own value tensor before mixing): the caller keeps layer 0's as v0."""
        batch, seq_len, dim = x.shape
        q = self.c_q(x).reshape(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        own_v = v
        if self.vr_lambda is not None and v0 is not None:
            lam = self.vr_lambda.to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q = apply_rotary(rms_norm(q), cos, sin)
        k = apply_rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        # Under autocast the projections are bf16 but the norms may come back fp32; SDPA needs one dtype.
        y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True, enable_gqa=True)
        if self.use_xsa:
            y = exclude_self_value(y, v)
        if self.attn_gate is not None:
            gate = torch.sigmoid(self.attn_gate(x))  # (B, T, H)
            y = y * gate.transpose(1, 2).unsqueeze(-1)
        y = y.transpose(1, 2).reshape(batch, seq_len, dim)
        return self.proj(y), own_v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_mult * config.model_dim
        self.negative_slope = config.leaky_relu_slope
        self.fc = CastedLinear(config.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, config.model_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.negative_slope).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        dim = config.model_dim
        # As upstream, N larger than the depth means every layer (the default 11 stays "all" on smaller models).
        use_xsa = layer_index >= config.num_layers - config.xsa_last_n
        self.attn = CausalSelfAttention(config, use_xsa=use_xsa)
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.ln_scale_factor = 1.0 / math.sqrt(layer_index + 1) if config.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, v0: Tensor | None, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn_out, own_v = self.attn(rms_norm(x) * self.ln_scale_factor, v0, cos, sin)
        x = x + self.attn_scale.to(x.dtype) * attn_out
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale_factor)
        return x, own_v


def _validate(config: ModelConfig) -> None:
    problems = []
    if config.num_layers < 1:
        problems.append(f"num_layers must be >= 1, got {config.num_layers}")
    if config.model_dim % config.num_heads:
        problems.append(f"model_dim {config.model_dim} is not divisible by num_heads {config.num_heads}")
    elif config.num_heads % config.num_kv_heads:
        problems.append(f"num_heads {config.num_heads} is not divisible by num_kv_heads {config.num_kv_heads}")
    else:
        head_dim = config.model_dim // config.num_heads
        if not (4 <= config.rope_dims <= head_dim and config.rope_dims % 2 == 0):
            # 2 is excluded because the NTK exponent rd/(rd−2) is undefined there.
            problems.append(f"rope_dims must be even and in [4, head_dim={head_dim}], got {config.rope_dims}")
    if config.xsa_last_n < 0:
        problems.append(f"xsa_last_n must be >= 0, got {config.xsa_last_n}")
    if config.bigram_buckets == 1 or config.bigram_buckets < 0:
        problems.append(f"bigram_buckets must be 0 (off) or >= 2, got {config.bigram_buckets}")
    if config.bigram_buckets and config.bigram_dim < 1:
        problems.append(f"bigram_dim must be >= 1, got {config.bigram_dim}")
    if config.logit_softcap <= 0:
        problems.append(f"logit_softcap must be > 0, got {config.logit_softcap}")
    if config.mlp_mult < 1:
        problems.append(f"mlp_mult must be >= 1, got {config.mlp_mult}")
    if config.rope_train_seq_len < 1:
        problems.append(f"rope_train_seq_len must be >= 1, got {config.rope_train_seq_len}")
    if not 0 <= config.bos_id < config.vocab_size:
        problems.append(f"bos_id {config.bos_id} is outside the vocabulary [0, {config.vocab_size})")
    if problems:
        raise ValueError("invalid ModelConfig: " + "; ".join(problems))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        dim = config.model_dim
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        self.bigram = BigramHash(config.bigram_buckets, config.bigram_dim, dim) if config.bigram_buckets else None
        self.smear = SmearGate(dim) if config.smear_gate else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.num_encoder_layers = config.num_layers // 2 if config.unet_skips else 0
        self.skip_weights = (nn.Parameter(torch.ones(self.num_encoder_layers, dim, dtype=torch.float32))
                             if self.num_encoder_layers else None)
        if not self.tok_emb.weight.is_meta:  # the artifact reader builds on meta and assigns the stored weights
            from trainer.init import init_weights  # training only: not counted code (trainer/code_bytes.py)

            init_weights(self)

    def input_embeddings(self, input_ids: Tensor) -> Tensor:
        # #1797 ruling (compliance-rules §3.4): at a BOS the previous token belongs to another document, so with
        # mask_bos SmearGate and BigramHash see none there, exactly as at position 0 of a row.
        previous_token_kept = input_ids != self.config.bos_id if self.config.mask_bos else None
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids, previous_token_kept)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, previous_token_kept)
        return x

    def final_hidden(self, input_ids: Tensor) -> Tensor:
        config = self.config
        x0 = self.input_embeddings(input_ids)
        cos, sin = rotary_tables(input_ids.size(1), config.rope_dims, config.rope_base, config.rope_train_seq_len,
                                 input_ids.device)
        x = x0
        v0: Tensor | None = None
        encoder_outputs: list[Tensor] = []
        for index, block in enumerate(self.blocks):
            if index >= self.num_encoder_layers and encoder_outputs:
                skip_weight = self.skip_weights[index - self.num_encoder_layers].to(x.dtype)
                x = x + skip_weight * encoder_outputs.pop()
            x, own_v = block(x, x0, v0, cos, sin)
            if index == 0 and config.value_residual:
                v0 = own_v
            if index < self.num_encoder_layers:
                encoder_outputs.append(x)
        return rms_norm(x)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        """(B, T, vocab) float32 logits after the softcap."""
        x = self.final_hidden(input_ids)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats, fp32 scalar)."""
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")
