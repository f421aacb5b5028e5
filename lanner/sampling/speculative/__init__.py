"""Proposers of speculative drafts: one interface, one file per method.

- Host proposers (`ngram`) draft from a request's token ids before each step.
- Model proposers (`draft_model`, `eagle3`, `mtp`) are networks with their own KV cache that the
  model runner runs on the device right after each target step (lanner/executor/drafter.py):
  a first pass over the step's tokens (which also fills the draft's KV over prompts), then k-1
  single-token steps. Their drafts come back with the step's sampled tokens.

Every proposer drafts greedily (no probabilities), so verification compares drafts with the
target's own samples (lanner/sampling/rejection.py) and the output is exactly the target's.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lanner.config import SpeculativeConfig
from lanner.core.request import Request
from lanner.errors import ConfigError


class Proposer(ABC):
    method: ClassVar[str]

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.k = config.num_speculative_tokens

    @abstractmethod
    def drafts(self, req: Request, k: int) -> list[int]:
        """Up to k drafts to follow the request's tokens, for the step about to be scheduled."""


@dataclass
class DraftContext:
    """What a model proposer loads its network against."""
    target: nn.Module
    target_path: str
    tokenizer: Any | None
    load_format: str
    dtype: torch.dtype
    device: torch.device
    seed: int


class ModelProposer(Proposer):
    # 1: a draft LM reads token p at position p; 0: a head reads token p+1 beside the target's
    # hidden state at position p (EAGLE, MTP)
    shift: ClassVar[int] = 0
    # what the target hands the draft: nothing, its final (normed) hidden state, or the hidden
    # states entering three of its layers (EAGLE-3)
    target_hidden: ClassVar[str | None] = None

    def drafts(self, req: Request, k: int) -> list[int]:
        proposed, req.proposed_token_ids = req.proposed_token_ids, []
        return proposed[:k]

    aux_layers: list[int] | None = None  # with target_hidden "aux": which layers' inputs, in order

    @abstractmethod
    def load(self, ctx: DraftContext) -> nn.Module:
        """The draft network: forward(input_ids, positions, hidden) -> (normed, carried hidden),
        fill_kv(input_ids, positions, hidden) (only the KV the forward writes), compute_logits(normed),
        to_target_ids(ids), and `spec` (the shape of its KV cache)."""

    def model_path(self, target_path: str) -> str:
        """The config's `model` (a folder, a repo id, or a config.json with load_format dummy),
        or the head shipped beside the embedded model."""
        from lanner import default_model
        from lanner.models.hub import resolve_model_path

        if self.config.model is not None:
            return resolve_model_path(self.config.model, None, None)
        shipped = default_model.SHIPPED_PROPOSERS.get(self.method)
        if shipped is not None and os.path.realpath(target_path) == os.path.realpath(default_model.DEFAULT_MODEL):
            return shipped
        raise ConfigError(f"speculative method {self.method!r} needs \"model\" in speculative_config (a folder, "
                          "repo id or config.json); only the embedded lanner-tiny has a default")


def make_proposer(config: SpeculativeConfig) -> Proposer:
    from lanner.sampling.speculative.draft_model import DraftModelProposer
    from lanner.sampling.speculative.eagle3 import Eagle3Proposer
    from lanner.sampling.speculative.mtp import MtpProposer
    from lanner.sampling.speculative.ngram import NgramProposer

    methods = {cls.method: cls for cls in (NgramProposer, DraftModelProposer, Eagle3Proposer, MtpProposer)}
    return methods[config.method](config)


def build_on(device: torch.device, dtype: torch.dtype, make):
    """Construct a module on `device` with `dtype` as the default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)
