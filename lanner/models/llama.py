"""The Llama family decoder: Llama 2/3, Qwen2 (q/k/v bias) and Qwen3 (q/k
RMSNorm per head). One module, with the differences as flags of DecoderSpec."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lanner.distributed import TP
from lanner.errors import ConfigError
from lanner.kernels.fused_reference import Norm, apply_rotary
from lanner.layers.attention import Attention
from lanner.layers.embedding import LMHead, VocabEmbedding
from lanner.layers.linear import Linear, MergedLinear, fuses
from lanner.layers.mlp import GatedMLP
from lanner.layers.moe.block import MoEBlock, MoESpec
from lanner.layers.moe.strategies import MoERuntime
from lanner.layers.norm import RMSNorm
from lanner.layers.rotary import RotaryEmbedding


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
    moe: MoESpec | None = None  # sparse MoE MLPs in moe.sparse_layers (Qwen3-MoE)
    # tensor parallelism: how many distinct KV-head slices the ranks hold (fewer than the ranks
    # when there are fewer KV heads than ranks: then each slice is replicated)
    kv_shards: int = 1


def shard_spec(spec: DecoderSpec) -> DecoderSpec:
    """This rank's shape under tensor parallelism (lanner/distributed.py): its query heads, its
    KV heads (one replicated head when there are fewer KV heads than ranks), its MLP and expert
    features. The vocabulary stays whole: the head's logits are gathered."""
    if TP.size == 1:
        return spec
    kv = spec.num_kv_heads
    if kv % TP.size and TP.size % kv:
        raise ConfigError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({TP.size}): one must divide the "
                          f"other")
    moe = spec.moe
    if moe is None and TP.expert_parallel:
        raise ConfigError("enable_expert_parallel is given, but this model has no MoE layers")
    if moe is not None:  # expert parallelism keeps whole experts (MoEBlock picks this rank's)
        experts = moe.intermediate_size if TP.expert_parallel else TP.split(moe.intermediate_size,
                                                                             "moe_intermediate_size")
        moe = replace(moe, intermediate_size=experts,
                      shared_intermediate_size=TP.split(moe.shared_intermediate_size, "shared experts' size"))
    return replace(spec, num_heads=TP.split(spec.num_heads, "num_attention_heads"), num_kv_heads=max(kv // TP.size, 1),
                   kv_shards=min(kv, TP.size), intermediate_size=TP.split(spec.intermediate_size, "intermediate_size"),
                   moe=moe)


@dataclass
class PieceBuffers:
    """The tensors that cross the boundaries of the split forward (see run_piece), for N tokens:
    allocated once at the largest capture size, and sliced to a graph's size with `rows`."""
    cos: torch.Tensor  # [N, head_dim]
    sin: torch.Tensor
    residual: torch.Tensor  # [N, hidden]
    qkv: torch.Tensor  # [N, (heads + 2 kv_heads) * head_dim]: the fused projection; v is read from it
    qk: torch.Tensor  # [N, (heads + kv_heads) * head_dim]: q and k after norm and rotary
    attn_out: torch.Tensor  # [N, heads * head_dim]; rows of padding tokens stay zero
    hidden: torch.Tensor  # [N, hidden]: the final norm's output

    @classmethod
    def allocate(cls, spec: DecoderSpec, num_tokens: int, dtype: torch.dtype, device: torch.device) -> PieceBuffers:
        def empty(width: int) -> torch.Tensor:
            return torch.zeros(num_tokens, width, dtype=dtype, device=device)

        d = spec.head_dim
        return cls(empty(d), empty(d), empty(spec.hidden_size), empty((spec.num_heads + 2 * spec.num_kv_heads) * d),
                   empty((spec.num_heads + spec.num_kv_heads) * d), empty(spec.num_heads * d), empty(spec.hidden_size))

    def rows(self, n: int) -> PieceBuffers:
        return PieceBuffers(*(t[:n] for t in vars(self).values()))


class DecoderAttention(nn.Module):
    optional_checkpoint_buffers = ("k_scale", "v_scale")

    def __init__(self, spec: DecoderSpec, layer_idx: int, input_size: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        kv_index = TP.rank * spec.kv_shards // TP.size  # several ranks share a replicated KV slice
        # input_size: EAGLE-3's layer attends over the embedding and a hidden state side by side
        self.qkv_proj = MergedLinear(input_size or spec.hidden_size, [q_size, kv_size, kv_size], bias=spec.qkv_bias,
                                     shard_indices=[TP.rank, kv_index, kv_index] if TP.size > 1 else None)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias, parallel="row")
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.attn = Attention(layer_idx, scale=spec.head_dim ** -0.5)
        # a checkpoint's fp8 KV-cache scales (K / k_scale, V / v_scale are stored), if it has them; float32
        # (the model's bf16 would round a calibrated scale), and no state_dict entry of lanner's making
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bufs: PieceBuffers | None = None,
                norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normed for Qwen3, rotated) and v of the tokens in x; with `bufs`, written into
        its static qkv and qk tensors (the outputs of a graph piece); `norm`: x is the input of that
        RMSNorm, which the projection's GEMV applies (DecoderLayer.pre_attention)."""
        T = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x, out=None if bufs is None else bufs.qkv, norm=norm)
        v = qkv[:, q_size + kv_size:].view(T, self.num_kv_heads, self.head_dim)
        qk_out = None if bufs is None else bufs.qk.view(T, heads, self.head_dim)
        # q and k heads are adjacent in qkv: one pass normalises (Qwen3) and rotates both, and on the GPU
        # writes k and v into the KV cache when the attention backend lets it (one kernel fewer a layer)
        qk = self._norm_rope(qkv[:, :q_size + kv_size].view(T, heads, self.head_dim), cos, sin, self.num_heads, qk_out,
                             v=v)
        return qk[:, :self.num_heads], qk[:, self.num_heads:], v

    def store_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Only k and v of the tokens in x, written into the KV cache (a drafter's pass whose
        outputs nobody reads: its q, attention and everything after are skipped)."""
        T, q_size = x.shape[0], self.num_heads * self.head_dim
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[q_size:]
        kv = F.linear(x, self.qkv_proj.weight[q_size:], bias).view(T, 2 * self.num_kv_heads, self.head_dim)
        k = self._norm_rope(kv[:, :self.num_kv_heads], cos, sin, 0)
        self.attn.store(k, kv[:, self.num_kv_heads:])

    def _norm_rope(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_k_head: int,
                   out: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H, head_dim] q heads then, from `first_k_head`, k heads: per-head norm (Qwen3's
        q_norm and k_norm) and rotary; into `out` when given. With `v`, the kernel also stores
        k and v if the attention backend takes that (Attention.kv_store_target)."""
        if heads.is_cuda:  # one fused kernel
            from lanner.kernels.fused import norm_rope

            eps = self.q_norm.eps if self.qk_norm else 0.0
            target = None if v is None else self.attn.kv_store_target()
            return norm_rope(heads, cos, sin, self._qk_norm_weight(), eps, second_weight_from=first_k_head, out=out,
                             kv_store=None if target is None else (v, *target))
        q, k = heads[:, :first_k_head], heads[:, first_k_head:]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = torch.empty_like(heads) if out is None else out
        out[:, :first_k_head] = apply_rotary(q, cos, sin)
        out[:, first_k_head:] = apply_rotary(k, cos, sin)
        return out

    def _qk_norm_weight(self) -> torch.Tensor | None:
        """q_norm and k_norm weights stacked [2, head_dim], made once after the weights are loaded."""
        if not self.qk_norm:
            return None
        if getattr(self, "_qk_weight", None) is None:
            self._qk_weight = torch.stack([self.q_norm.weight.detach(), self.k_norm.weight.detach()])
        return self._qk_weight


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, moe_runtime: MoERuntime | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.moe is not None and layer_idx in spec.moe.sparse_layers:
            slot = spec.moe.sparse_layers.index(layer_idx)
            self.mlp = MoEBlock(spec.moe, spec.hidden_size, moe_runtime, slot)
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)
        # a static [tokens, hidden] buffer (set by an EAGLE-3 drafter) that receives the hidden
        # state entering this layer, inside graphs too
        self.aux_out: torch.Tensor | None = None
        # the projections after the norms: where the GEMV runs, it applies the norm as it loads x
        self.self_attn.qkv_proj.input_kind = "normed"
        if isinstance(self.mlp, GatedMLP):
            self.mlp.gate_up_proj.input_kind = "normed"

    def forward(self, x, residual, cos, sin):
        q, k, v, residual = self.pre_attention(x, residual, cos, sin)
        return self.post_attention(self.self_attn.attn(q, k, v), residual)

    def pre_attention(self, x, residual, cos, sin, bufs: PieceBuffers | None = None):
        """Norm (adding x into the residual) and q, k, v; the first layer's residual is x."""
        norm = self.input_layernorm
        if fuses(self.self_attn.qkv_proj, x):  # the norm inside the projection's GEMV
            fused = Norm.of(norm.weight, norm.eps, x, residual)
            qkv = self.self_attn.project(x, cos, sin, bufs, fused)
            residual = fused.residual_after(x)
        else:
            x, residual = (norm(x), x) if residual is None else norm(x, residual)
            qkv = self.self_attn.project(x, cos, sin, bufs)
        if self.aux_out is not None:
            self.aux_out[:residual.shape[0]].copy_(residual)
        return *qkv, residual

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        x = self.self_attn.o_proj(attn_out.reshape(attn_out.shape[0], -1))
        norm = self.post_attention_layernorm
        if isinstance(self.mlp, GatedMLP) and fuses(self.mlp.gate_up_proj, x):
            fused = Norm.of(norm.weight, norm.eps, x, residual)
            return self.mlp(x, fused), fused.residual_after(x)
        x, residual = norm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        # shared by the MoE layers: the executor choice, the step's real token count, the routing record
        self.moe_runtime = MoERuntime() if spec.moe is not None else None
        self.layers = nn.ModuleList(DecoderLayer(spec, i, self.moe_runtime) for i in range(spec.num_layers))
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
        self.whole_spec = spec  # the model's shape; `spec` is this rank's shard of it
        self.spec = spec = shard_spec(spec)
        self.model = DecoderModel(spec)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = LMHead(spec.hidden_size, spec.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden]; logits are a separate call so graphs can capture the trunk alone."""
        cos, sin = self.rotary.cos_sin(positions, self.model.embed_tokens.weight.dtype)
        return self.model(input_ids, cos, sin)

    # ---- the forward split at attention, for piecewise CUDA graphs ----------------------

    @property
    def num_pieces(self) -> int:
        return self.spec.num_layers + 1

    def run_piece(self, j: int, input_ids: torch.Tensor, positions: torch.Tensor, bufs: PieceBuffers) -> None:
        """Piece j of the forward, which reads and writes only static tensors (so a CUDA graph
        can capture it): piece 0 embeds the tokens and projects layer 0's q, k, v; piece j in
        1..L-1 finishes layer j-1 from its attention output and projects layer j's q, k, v;
        piece L finishes the last layer and applies the final norm. Attention runs between."""
        layers = self.model.layers
        if j == 0:
            cos, sin = self.rotary.cos_sin(positions, self.model.embed_tokens.weight.dtype)
            bufs.cos.copy_(cos)
            bufs.sin.copy_(sin)
            if not self.model.embed_tokens.split:
                torch.index_select(self.model.embed_tokens.weight, 0, input_ids, out=bufs.residual)
            else:  # the ranks' rows summed
                bufs.residual.copy_(self.model.embed_tokens(input_ids))
            layers[0].pre_attention(bufs.residual, None, bufs.cos, bufs.sin, bufs)
            return
        x, residual = layers[j - 1].post_attention(bufs.attn_out, bufs.residual)
        if j == len(layers):
            bufs.hidden.copy_(self.model.norm(x, residual)[0])
            return
        *_, residual = layers[j].pre_attention(x, residual, bufs.cos, bufs.sin, bufs)
        if residual is not bufs.residual:  # a fused norm's x + residual (Norm.added) is a tensor of its own
            bufs.residual.copy_(residual)

    def attend(self, j: int, bufs: PieceBuffers) -> None:
        """Layer j's attention between pieces j and j+1 (inside forward_context), into bufs.attn_out."""
        spec = self.spec
        T = bufs.qk.shape[0]
        qk = bufs.qk.view(T, spec.num_heads + spec.num_kv_heads, spec.head_dim)
        v = bufs.qkv[:, (spec.num_heads + spec.num_kv_heads) * spec.head_dim:].view(T, spec.num_kv_heads, spec.head_dim)
        self.model.layers[j].self_attn.attn(qk[:, :spec.num_heads], qk[:, spec.num_heads:], v,
                                            out=bufs.attn_out.view(T, spec.num_heads, spec.head_dim))

    def forward_pieces(self, input_ids: torch.Tensor, positions: torch.Tensor, bufs: PieceBuffers,
                       run_piece=None) -> torch.Tensor:
        """The forward as pieces and attention calls; `run_piece(j)` (a graph replay) replaces
        the eager piece. Returns bufs.hidden."""
        for j in range(self.num_pieces):
            if run_piece is None:
                self.run_piece(j, input_ids, positions, bufs)
            else:
                run_piece(j)
            if j < self.spec.num_layers:
                self.attend(j, bufs)
        return bufs.hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        head = self.model.embed_tokens.logits if self.lm_head is None else self.lm_head
        return head(hidden, out)
