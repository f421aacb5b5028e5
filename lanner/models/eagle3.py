"""The EAGLE-3 draft head (Li et al., 2025), in the layout of the public checkpoints.

`fc` fuses the hidden states that enter three of the target's layers ([T, 3 x target hidden]
-> [T, hidden]); one decoder layer whose attention reads the token's embedding and that fused
state side by side ([T, 2 x hidden] into q/k/v); its own final norm and an LM head over a pruned
draft vocabulary, mapped back to the target's ids by `d2t` (target id = draft id + d2t[draft id];
`t2d` marks the target ids the draft can propose). Later draft steps feed the head its own
pre-norm output in place of the fused state. The embedding is the checkpoint's, or the target's
when the checkpoint has none.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from lanner.errors import ConfigError
from lanner.layers.linear import Linear
from lanner.layers.norm import RMSNorm
from lanner.layers.rotary import RotaryEmbedding
from lanner.layers.mlp import GatedMLP
from lanner.models.llama import DecoderAttention, DecoderForCausalLM, DecoderSpec


def aux_layer_ids(config: dict, target_layers: int) -> list[int]:
    """The target layers whose input hidden states the head fuses: the checkpoint's choice, or
    the layers EAGLE-3 trains on by default (2, the middle one, the third from the end)."""
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    ids = list(ids) if ids else [2, target_layers // 2, target_layers - 3]
    if len(ids) != 3 or not all(0 <= i < target_layers for i in ids):
        raise ConfigError(f"EAGLE-3 needs three target layers in [0, {target_layers}), got {ids}")
    return ids


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"speculative model {path!r} is not a folder with a config.json or a config.json")
    with open(file) as f:
        return json.load(f)


class Eagle3Layer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.hidden_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec, 0, input_size=2 * spec.hidden_size)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)

    def attention_input(self, embeds, hidden):
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def forward(self, embeds, hidden, cos, sin):
        q, k, v = self.self_attn.project(self.attention_input(embeds, hidden), cos, sin)
        attn = self.self_attn.attn(q, k, v)
        x = self.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        x, residual = self.post_attention_layernorm(x, hidden)  # the hidden state is the residual stream
        return self.mlp(x), residual


class Eagle3Head(nn.Module):
    packed_modules = DecoderForCausalLM.packed_modules
    checkpoint_buffers = ("d2t", "t2d")

    def __init__(self, spec: DecoderSpec, target_hidden_size: int, target_vocab_size: int, draft_vocab_size: int):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(target_vocab_size, spec.hidden_size, _weight=torch.empty(
            target_vocab_size, spec.hidden_size), _freeze=True)
        self.fc = Linear(3 * target_hidden_size, spec.hidden_size)
        self.midlayer = Eagle3Layer(spec)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, draft_vocab_size)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(target_vocab_size, dtype=torch.bool))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor):
        """(normed output, pre-norm output). `hidden`: the three target states concatenated (a
        first pass) or the head's own pre-norm output of the previous position (later steps)."""
        embeds, hidden, cos, sin = self._inputs(input_ids, positions, hidden)
        x, residual = self.midlayer(embeds, hidden, cos, sin)
        return self.norm(x, residual)

    def fill_kv(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        """Only the layer's KV at these positions (a pass whose outputs nobody reads)."""
        embeds, hidden, cos, sin = self._inputs(input_ids, positions, hidden)
        self.midlayer.self_attn.store_kv(self.midlayer.attention_input(embeds, hidden), cos, sin)

    def _inputs(self, input_ids, positions, hidden):
        cos, sin = self.rotary.cos_sin(positions, self.embed_tokens.weight.dtype)
        if hidden.shape[-1] != self.spec.hidden_size:
            hidden = self.fc(hidden)
        return self.embed_tokens(input_ids), hidden, cos, sin

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.lm_head.weight)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


def checkpoint_names(tensors):
    """Checkpoints name the decoder layer `midlayer.` (EAGLE's) or `layers.0.` (some converters)."""
    for name, tensor in tensors:
        yield ("midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name), tensor
