"""A multi-token-prediction layer in DeepSeek-V3's layout, over a Llama-family target.

The layer predicts the token after next from the next token's embedding and the target's
hidden state at the current position: `enorm` and `hnorm` normalise the two, `eh_proj` fuses
them ([T, 2 x hidden] -> [T, hidden]), one decoder layer of the target's kind runs over the
result, and `shared_head.norm` then the target's own LM head give the logits. The embedding and
the head are the target's. In a checkpoint the layer is `model.layers.{num_hidden_layers}.*`
(after the target's layers; `num_nextn_predict_layers` in config.json says it is there). Further
draft steps feed the layer its own pre-norm output in place of the target's state.
"""
from __future__ import annotations

import torch
from torch import nn

from lanner.errors import UnsupportedModel
from lanner.layers.linear import Linear
from lanner.layers.norm import RMSNorm
from lanner.models.llama import DecoderForCausalLM, DecoderLayer, DecoderSpec


class MtpLayer(DecoderLayer):
    packed_modules = DecoderForCausalLM.packed_modules

    def __init__(self, spec: DecoderSpec, target: DecoderForCausalLM):
        if spec.moe is not None:  # DeepSeek-V3's MTP layer is sparse too; lanner has no such target yet
            raise UnsupportedModel("an MTP layer over a mixture-of-experts target is not supported yet")
        super().__init__(spec, 0)
        self.spec = spec
        self.enorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.hnorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.eh_proj = Linear(2 * spec.hidden_size, spec.hidden_size)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self._target = (target,)  # shared embedding, rotary and head; not this module's parameters

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor):
        """(normed output, pre-norm output) given the target's (or the previous step's) hidden state."""
        x, cos, sin = self._fused_input(input_ids, positions, hidden)
        x, residual = DecoderLayer.forward(self, x, None, cos, sin)
        return self.shared_head.norm(x, residual)

    def fill_kv(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        """Only the layer's KV at these positions (a pass whose outputs nobody reads)."""
        x, cos, sin = self._fused_input(input_ids, positions, hidden)
        self.self_attn.store_kv(self.input_layernorm(x), cos, sin)

    def _fused_input(self, input_ids, positions, hidden):
        target = self._target[0]
        embed = target.model.embed_tokens(input_ids)
        # position 0 has no earlier token whose state could predict it (vLLM zeroes it likewise)
        embed = embed * (positions != 0).to(embed.dtype).unsqueeze(-1)
        cos, sin = target.rotary.cos_sin(positions, embed.dtype)
        return self.eh_proj(torch.cat([self.enorm(embed), self.hnorm(hidden)], dim=-1)), cos, sin

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(normed)

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


def layer_tensors(tensors, layer: int):
    """The MTP layer's own tensors from a checkpoint (prefix stripped); the shared embedding and
    head, which DeepSeek's checkpoints repeat inside the layer, are left out."""
    prefix = f"model.layers.{layer}."
    for name, tensor in tensors:
        if name.startswith(prefix):
            name = name[len(prefix):]
            if not name.startswith(("embed_tokens.", "shared_head.head.")):
                yield name, tensor
