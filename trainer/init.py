"""The reference initialisation of the PR #940 model (trainer/model.py), which ``GPT`` applies when it is built
off the meta device. Only training (and tests) start from it: an evaluation builds the model on the meta device
and assigns the artifact's weights, so this module is not counted code (trainer/code_bytes.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.model import GPT, CastedLinear

# The layers the reference initialises to zero: attention out projection, MLP down projection, attention gate.
ZERO_INIT_LAYERS = (".attn.proj", ".mlp.proj", ".attn.attn_gate")


def init_weights(model: GPT) -> None:
    """Reference init: tok_emb N(0, tied_embed_init_std); ZERO_INIT_LAYERS start at zero (the gate's bias at
    attn_gate_bias_init); every other linear with both dims >= 64 is orthogonal, and the remaining "*.proj" (only
    bigram.proj) is scaled by 1/sqrt(2L) as in the non-banked code. Smaller linears keep PyTorch's default init,
    as upstream.

    One deliberate difference, for BigramHash's projection: upstream zero-initialises both BigramHash factors
    (table and projection) in the module, then its ``_init_weights`` orthogonalises and scales the projection
    whenever both its dims are >= 64 (128→512 in PR #940, so there the two inits are the same, which the tests
    check). Below 64 (the demo's 32→128) upstream's projection stays zero, and with both factors zero neither ever
    gets a gradient: the feature would be dead for the whole run. pgolf zero-initialises only the table, so the
    projection keeps PyTorch's default there and the path can learn.
    """
    nn.init.normal_(model.tok_emb.weight, mean=0.0, std=model.config.tied_embed_init_std)
    if model.bigram is not None:
        nn.init.zeros_(model.bigram.embed.weight)
    depth_scale = 1.0 / math.sqrt(2 * model.config.num_layers)
    for name, module in model.named_modules():
        if not isinstance(module, CastedLinear):
            continue
        if name.endswith(ZERO_INIT_LAYERS):
            nn.init.zeros_(module.weight)
            if module.bias is not None:  # the attention gate: open (sigmoid(4) ≈ 0.98) at the start
                nn.init.constant_(module.bias, model.config.attn_gate_bias_init)
        elif min(module.weight.shape) >= 64:
            nn.init.orthogonal_(module.weight, gain=1.0)
            if name.endswith(".proj"):
                with torch.no_grad():
                    module.weight.mul_(depth_scale)
