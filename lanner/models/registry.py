"""Which Hugging Face architectures lanner runs, and how their configs map to a model."""
from __future__ import annotations

from typing import Any

from torch import nn

from lanner.errors import UnsupportedModel
from lanner.models.llama import DecoderForCausalLM, DecoderSpec
from lanner.models.moe import qwen3_moe_spec


def llama_flags(cfg: Any) -> dict:
    bias = getattr(cfg, "attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=getattr(cfg, "mlp_bias", False))


def _qwen2_flags(cfg: Any) -> dict:
    return dict(qkv_bias=True)


def _qwen3_flags(cfg: Any) -> dict:
    bias = getattr(cfg, "attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)


def _qwen3_moe_flags(cfg: Any) -> dict:
    return dict(_qwen3_flags(cfg), moe=qwen3_moe_spec(cfg))


ARCHITECTURES = {
    "LlamaForCausalLM": llama_flags,
    "Qwen2ForCausalLM": _qwen2_flags,
    "Qwen3ForCausalLM": _qwen3_flags,
    "Qwen3MoeForCausalLM": _qwen3_moe_flags,
}


def _rope(cfg: Any) -> tuple[float, dict | None]:
    params = getattr(cfg, "rope_parameters", None)  # transformers >= 5
    if params and "rope_theta" in params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(params["rope_theta"]), scaling
    return float(getattr(cfg, "rope_theta", 10000.0)), getattr(cfg, "rope_scaling", None)


def architecture_of(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise UnsupportedModel(f"unsupported architecture {archs or '(none given)'}; "
                           f"supported: {', '.join(ARCHITECTURES)}")


def build_model(hf_config: Any) -> nn.Module:
    """An uninitialised model for `hf_config`, on the current default device and dtype."""
    return DecoderForCausalLM(decoder_spec(hf_config, ARCHITECTURES[architecture_of(hf_config)](hf_config)))


def decoder_spec(hf_config: Any, flags: dict) -> DecoderSpec:
    """The decoder shape of a Llama-family config (a target, a draft model or a draft head)."""
    theta, scaling = _rope(hf_config)
    heads = hf_config.num_attention_heads
    spec = DecoderSpec(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        **flags,
    )
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedModel("sliding-window attention is not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {hf_config.hidden_act!r} is not supported (only silu)")
    return spec
