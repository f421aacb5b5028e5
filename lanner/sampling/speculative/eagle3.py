"""EAGLE-3 heads (`eagle3`): a one-layer head over three of the target's hidden states
(lanner/models/eagle3.py), in the public checkpoints' layout, with a pruned draft vocabulary."""
from __future__ import annotations

from torch import nn

from lanner.errors import ConfigError
from lanner.models.eagle3 import Eagle3Head, aux_layer_ids, checkpoint_names, read_config
from lanner.models.loader import init_dummy_weights, iter_checkpoint, load_weights
from lanner.models.registry import decoder_spec, llama_flags
from lanner.sampling.speculative import DraftContext, ModelProposer, build_on


class Eagle3Proposer(ModelProposer):
    method = "eagle3"
    target_hidden = "aux"

    def load(self, ctx: DraftContext) -> nn.Module:
        from transformers import AutoConfig

        path = self.model_path(ctx.target_path)
        raw = read_config(path)
        target = ctx.target.spec
        vocab = raw.get("vocab_size", target.vocab_size)
        if vocab != target.vocab_size:
            raise ConfigError(f"EAGLE-3 head {path!r} is for a vocabulary of {vocab} tokens, the target has "
                              f"{target.vocab_size}")
        cfg = AutoConfig.for_model("llama", **{k: v for k, v in raw.items() if k != "model_type"})
        spec = decoder_spec(cfg, llama_flags(cfg))
        if spec.num_layers != 1:
            raise ConfigError(f"EAGLE-3 head {path!r}: num_hidden_layers must be 1, got {spec.num_layers}")
        self.aux_layers = aux_layer_ids(raw, target.num_layers)
        head = build_on(ctx.device, ctx.dtype, lambda: Eagle3Head(
            spec, raw.get("target_hidden_size", target.hidden_size), target.vocab_size,
            raw.get("draft_vocab_size", target.vocab_size)))
        if ctx.load_format == "dummy":
            init_dummy_weights(head, ctx.seed)  # d2t stays 0: the draft vocabulary is the first ids
        else:
            loaded = load_weights(head, checkpoint_names(iter_checkpoint(path)), optional=("embed_tokens.weight",))
            if "embed_tokens.weight" not in loaded:
                head.embed_tokens = ctx.target.model.embed_tokens
        return head.eval()
