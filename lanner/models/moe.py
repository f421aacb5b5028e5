"""The MoE shapes of Hugging Face configs: which layers are sparse and how they route."""
from __future__ import annotations

from typing import Any

from lanner.errors import UnsupportedModel
from lanner.layers.moe.block import MoESpec
from lanner.layers.moe.router import RouterSpec


def _num_experts(cfg: Any) -> int:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return 0


def _router(cfg: Any, **kw: Any) -> RouterSpec:
    try:
        return RouterSpec(num_experts=_num_experts(cfg), top_k=cfg.num_experts_per_tok, **kw)
    except ValueError as e:
        raise UnsupportedModel(f"MoE routing of this config: {e}") from e


def qwen3_moe_spec(cfg: Any) -> MoESpec | None:
    """Qwen3-MoE: softmax top-k (renormalised with norm_topk_prob); layer i is sparse unless it
    is in mlp_only_layers, when (i + 1) is a multiple of decoder_sparse_step."""
    num = _num_experts(cfg)
    skip, step = set(getattr(cfg, "mlp_only_layers", None) or ()), getattr(cfg, "decoder_sparse_step", 1) or 1
    sparse = tuple(i for i in range(cfg.num_hidden_layers) if num and i not in skip and (i + 1) % step == 0)
    if not sparse:
        return None
    router = _router(cfg, scoring="softmax", renormalize=bool(getattr(cfg, "norm_topk_prob", False)))
    return MoESpec(router, cfg.moe_intermediate_size, 0, sparse)


def deepseek_moe_spec(cfg: Any) -> MoESpec:
    """DeepSeek-V3: sigmoid scores, grouped top-k with the correction bias (read when the
    checkpoint has it; zeros, which choose as no bias does, when it has not), routed_scaling_factor,
    shared experts; layers from first_k_dense_replace on are sparse. DeepSeek-V2's routings
    (softmax scores, 'greedy', 'group_limited_greedy') and layer frequencies are refused."""
    method, scoring = getattr(cfg, "topk_method", "noaux_tc"), getattr(cfg, "scoring_func", "sigmoid")
    if method != "noaux_tc" or scoring != "sigmoid":
        raise UnsupportedModel(f"MoE routing topk_method={method!r}, scoring_func={scoring!r}: only DeepSeek-V3's "
                               "(noaux_tc, sigmoid) is supported")
    if (getattr(cfg, "moe_layer_freq", 1) or 1) != 1:
        raise UnsupportedModel(f"moe_layer_freq={cfg.moe_layer_freq}: only every layer from first_k_dense_replace "
                               "on is supported")
    router = _router(cfg, scoring="sigmoid", renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
                     num_groups=getattr(cfg, "n_group", None) or 1, topk_groups=getattr(cfg, "topk_group", None) or 1,
                     scaling=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0), correction_bias=True,
                     float32_logits=True)
    shared = cfg.moe_intermediate_size * (getattr(cfg, "n_shared_experts", 0) or 0)
    first = getattr(cfg, "first_k_dense_replace", 0) or 0
    return MoESpec(router, cfg.moe_intermediate_size, shared, tuple(range(first, cfg.num_hidden_layers)))
