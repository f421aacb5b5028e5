"""ForwardBatch: everything one model step needs, built from a SchedulerOutput."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] tokens of all sequences, concatenated
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot of each token; -1: write nothing
    # Per sequence, on the host: the attention backend turns these into device metadata.
    query_lens: list[int]  # tokens computed this step
    seq_lens: list[int]  # tokens in the KV cache after this step (cached prefix + new)
    block_tables: list[list[int]]
    logits_indices: torch.Tensor  # [N] tokens whose logits are needed (sampling, prompt logprobs)
    num_real_tokens: int  # tokens past this are padding
    sampling_rows_are_tokens: bool = False  # logits_indices is 0..num_real_tokens-1 (every token samples)
    verify_rows: bool = False  # a verify step whose every token is a decode row of its own
    # the same count on the device, for kernels that must skip padding rows inside graphs (MoE routing)
    num_real_tokens_device: torch.Tensor | None = None
    # decode rows whose context lengths only the device knows (positions corrected there, when a
    # step was planned before the drafts of the one before it were read back): replaces seq_lens
    device_seq_lens: torch.Tensor | None = None
    # logits_indices padded with row 0 to a multiple of LOGITS_ROW_BUCKET, for the LM head outside
    # graphs: cuBLAS spends ~3 ms of host time the first time it sees a row count (H200, measured)
    padded_logits_indices: torch.Tensor | None = None
    # the attention backend's metadata for this step is in place already (a decode step advanced on
    # the device, executor/advance.py): the runner does not plan it again
    planned: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


def as_decode_rows(positions: list[int], query_lens: list[int], block_tables: list[list[int]]):
    """(query lens, seq lens, block tables) planning each token as a decode row of its own: one
    query that sees its position + 1 keys through its sequence's block table. For any batch this
    is the same causal attention; for steps whose every token samples (decode, verify) it lets
    them replay decode graphs."""
    tables = [table for table, n in zip(block_tables, query_lens) for _ in range(n)]
    return [1] * len(positions), [p + 1 for p in positions], tables


def kv_slots(block_ids: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """The flat KV-cache slot of each position in [start, stop) of a sequence with these blocks;
    -1 (write nothing) past its allocated blocks."""
    if stop - start == 1:  # a decode row
        b = start // block_size
        return [block_ids[b] * block_size + start % block_size if b < len(block_ids) else -1]
    slots = []
    for b in range(start // block_size, min(-(-stop // block_size), len(block_ids))):  # a range per block
        base = b * block_size
        first = block_ids[b] * block_size - base
        slots += range(first + max(start, base), first + min(stop, base + block_size))
    return slots + [-1] * (stop - start - len(slots))


# a chunk of this many tokens or more (without drafts) stages its positions and slots as numpy
# arrays (kv_slot_array), between the lists of the other rows (the runner's and the drafter's
# loops test it inline: a call a request would cost more than the test)
LONG_CHUNK = 64


def kv_slot_array(block_ids: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """kv_slots as an int64 array, computed with numpy: for a prompt chunk's long range, where a
    list of Python ints costs ~5x more (512 slots: ~4 us against ~20, and ~8 more to stage them)."""
    first, last = start // block_size, -(-stop // block_size)
    blocks = np.asarray(block_ids[first:last], dtype=np.int64)
    slots = (blocks[:, None] * block_size + np.arange(block_size)).ravel()[start - first * block_size:]
    if len(slots) >= stop - start:
        return slots[:stop - start]
    return np.concatenate((slots, np.full(stop - start - len(slots), -1, dtype=np.int64)))
