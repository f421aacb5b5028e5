"""A smaller language model as the proposer (`draft_model`): any model lanner loads that shares
the target's tokenizer (lanner-tiny-draft for lanner-tiny). It keeps its own KV cache over the
same block tables as the target and reads token p at position p; its k drafts are its argmax."""
from __future__ import annotations

import torch
from torch import nn

from lanner.errors import ConfigError
from lanner.models.loader import load_model
from lanner.sampling.speculative import DraftContext, ModelProposer


class DraftLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.spec = model.spec

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None):
        return self.model(input_ids, positions), None

    def fill_kv(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        self.model(input_ids, positions)  # every layer's KV: the whole trunk

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(normed)

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class DraftModelProposer(ModelProposer):
    method = "draft_model"
    shift = 1

    def load(self, ctx: DraftContext) -> nn.Module:
        path = self.model_path(ctx.target_path)
        draft = load_model(path, path, ctx.load_format, ctx.dtype, ctx.device, ctx.seed)
        vocab, target_vocab = draft.model.spec.vocab_size, ctx.target.spec.vocab_size
        if vocab != target_vocab:
            raise ConfigError(f"draft model {path!r} has a vocabulary of {vocab} tokens, the target {target_vocab}: "
                              "a draft model must share the target's tokenizer")
        if draft.tokenizer is not None and ctx.tokenizer is not None and \
                draft.tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
            raise ConfigError(f"draft model {path!r} has another tokenizer than the target's")
        return DraftLM(draft.model)
