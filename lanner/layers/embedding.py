"""The token embedding and the LM head, vocabulary-parallel under tensor parallelism: rank r
holds rows [r * n, (r + 1) * n) of the (padded) vocabulary. The embedding looks up the ids it
holds and the ranks' rows are summed; the head computes its own vocabulary columns and the ranks'
columns are gathered, for the rows that sample only (the caller picks them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lanner.distributed import TP, all_gather_columns, all_reduce
from lanner.layers.linear import matmul


class VocabRows(nn.Module):
    """A [vocab, hidden] weight, of which this rank holds its (padded) share of rows."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.split = TP.size > 1
        self.rows = -(-vocab_size // TP.size)
        self.start = TP.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.gemv, self.gemv_workspace = {}, None  # as Linear's

    def checkpoint_slice(self, param: torch.Tensor, tensor: torch.Tensor, shard=None) -> torch.Tensor:
        return vocab_rows(tensor, self.start, self.rows)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> logits [T, vocab] (the LM head; a tied one is the embedding's)."""
        if not self.split:
            return matmul(hidden, self.weight, self, out=out)
        logits = all_gather_columns(matmul(hidden, self.weight, self))[:, :self.vocab_size]
        return logits if out is None else out.copy_(logits)


class VocabEmbedding(VocabRows):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        held = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(held, local, 0), self.weight) * held[:, None].to(self.weight.dtype)
        return all_reduce(out)


class LMHead(VocabRows):
    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(vocab_size, hidden_size)

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(hidden, out)


def vocab_rows(tensor: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start + rows) of a [vocab, ...] checkpoint tensor, zero past the vocabulary."""
    piece = tensor[start:start + rows]
    return piece if piece.shape[0] == rows else F.pad(piece, (0, 0, 0, rows - piece.shape[0]))
