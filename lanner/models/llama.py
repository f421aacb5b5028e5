"""The Llama family decoder: Llama 2/3, Qwen2 (q/k/v bias) and Qwen3 (q/k
RMSNorm per head). One module, with the differences as flags of DecoderSpec."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lanner.layers.attention import Attention
from lanner.layers.linear import Linear, MergedLinear
from lanner.layers.norm import RMSNorm
from lanner.layers.rotary import RotaryEmbedding, apply_rotary


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = MergedLinear(spec.hidden_size, [q_size, kv_size, kv_size], bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.attn = Attention(layer_idx, scale=spec.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, q_size + kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if x.is_cuda:  # one fused kernel for the q and k heads (adjacent in qkv): norm (Qwen3) and rotary
            from lanner.kernels.fused import norm_rope

            qk = qkv[:, :q_size + kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
            eps = self.q_norm.eps if self.qk_norm else 0.0
            qk = norm_rope(qk, cos, sin, self._qk_norm_weight(), eps, second_weight_from=self.num_heads)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = qkv[:, :q_size].view(T, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(T, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v).reshape(T, -1))

    def _qk_norm_weight(self) -> torch.Tensor | None:
        """q_norm and k_norm weights stacked [2, head_dim], made once after the weights are loaded."""
        if not self.qk_norm:
            return None
        if getattr(self, "_qk_weight", None) is None:
            self._qk_weight = torch.stack([self.q_norm.weight.detach(), self.k_norm.weight.detach()])
        return self._qk_weight


class DecoderMLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_up_proj = MergedLinear(spec.hidden_size, [spec.intermediate_size] * 2, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if x.is_cuda:
            from lanner.kernels.fused import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = DecoderMLP(spec)

    def forward(self, x, residual, cos, sin):
        x, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=torch.empty(
            spec.vocab_size, spec.hidden_size), _freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids, cos, sin):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.norm(x, residual)[0]


class DecoderForCausalLM(nn.Module):
    # checkpoint name -> (our parameter, shard index) for the merged projections
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden]; logits are a separate call so graphs can capture the trunk alone."""
        cos, sin = self.rotary.cos_sin(positions, self.model.embed_tokens.weight.dtype)
        return self.model(input_ids, cos, sin)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if out is not None:
            return torch.mm(hidden, weight.t(), out=out)
        return F.linear(hidden, weight)
