"""Prompt lookup: draft the tokens that followed the last occurrence of the text's own ending.

Code edits, summaries and chat over a document repeat long stretches of their context; when the
last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) occurred before, the
tokens that followed that occurrence are a good guess for what comes next. The longest ending
that recurs wins, and among its occurrences the most recent one. Drafts are greedy (no
probabilities), so verification compares them with the target's own samples
(lanner/sampling/rejection.py). Runs on the host over token ids: no model, no device memory.
"""
from __future__ import annotations

import torch

from lanner.core.request import Request
from lanner.sampling.speculative import Proposer


class NgramProposer(Proposer):
    method = "ngram"
    window = 8192  # only the last `window` tokens are searched: a bounded cost per step

    def __init__(self, config):
        super().__init__(config)
        self.num_speculative_tokens = config.num_speculative_tokens
        self.prompt_lookup_min, self.prompt_lookup_max = config.prompt_lookup_min, config.prompt_lookup_max

    def drafts(self, req: Request, k: int) -> list[int]:
        return self.propose(req.all_token_ids, k)

    def propose(self, token_ids: list[int], k: int | None = None) -> list[int]:
        """Up to k (default num_speculative_tokens) draft tokens to follow `token_ids`; [] when
        no ending of length prompt_lookup_min or more occurred before."""
        k = self.num_speculative_tokens if k is None else k
        history = torch.tensor(token_ids[-self.window:], dtype=torch.long)
        size = history.numel()
        for n in range(min(self.prompt_lookup_max, size - 1), self.prompt_lookup_min - 1, -1):
            # windows of length n with a token after them (which leaves out the ending itself)
            windows = history[:size - 1].unfold(0, n, 1)
            starts = (windows == history[size - n:]).all(dim=1).nonzero()
            if starts.numel():
                follow = int(starts[-1]) + n
                return history[follow:follow + k].tolist()
        return []
